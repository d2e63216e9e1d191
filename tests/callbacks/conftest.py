"""Fixtures of the callback tests: a minimal LightningModule around DeepSeekV3 and a fixed-token dataloader."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from callbacks import MoECounts
from models import DeepSeekV3, DeepSeekV3Config


class TinyLitModule(pl.LightningModule):
    """Forward with labels, the model's total loss, AdamW, ``moe_counts``: the part of the LitModule the callbacks
    rely on."""

    def __init__(self, config: DeepSeekV3Config, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = DeepSeekV3(config)
        self.moe_counts = MoECounts(self.model)  # what the MoE callbacks read
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def token_loader(config: DeepSeekV3Config, n_batches: int, batch_size: int = 4, seq_len: int = 16, seed: int = 0):
    """(B, S+1) int64 batches of random tokens, in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, config.vocab_size, (n_batches * batch_size, seq_len + 1), generator=generator)
    return DataLoader(
        TensorDataset(rows), batch_size=batch_size, shuffle=False, collate_fn=lambda b: torch.stack([r[0] for r in b])
    )


def make_trainer(tmp_path, callbacks, max_steps: int, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer."""
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every callback test runs on one intra-op thread (the root conftest's ``one_thread``)."""


@pytest.fixture
def lit_factory():
    return TinyLitModule


@pytest.fixture
def loader_factory():
    return token_loader


@pytest.fixture
def trainer_factory():
    return make_trainer


def _gloo_rank(rank: int, world_size: int, rdzv: str, out: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=world_size)
    try:
        torch.save(worker(rank, *args), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(tmp_path, worker, *args, world_size: int = 2) -> list:
    """``worker(rank, *args)`` on ``world_size`` gloo CPU processes; returns what each rank's call returned.

    fork, not spawn: the children inherit the imported modules instead of importing torch and lightning again.
    """
    rdzv = f"file://{tmp_path}/rdzv"
    mp.start_processes(
        _gloo_rank, args=(world_size, rdzv, str(tmp_path), worker, args), nprocs=world_size, start_method="fork"
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
