"""tokens_seen, the one count every schedule reads: it counts data-parallel ranks, drives the LR, the MTP weight,
the bias freeze and the batch ramp through the dsv3 CLI, and an interrupted run resumes onto the same schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader

from lightning_modules import BatchSizeWarmup, DeepSeekV3LitModule
from lightning_modules.cli import DSV3CLI
from lightning_modules.module import data_parallel_size
from tests.lightning_modules.conftest import ROOT, SMALL_MODEL, TINY_YAML


class ThreeReplicas(SingleDeviceStrategy):
    """One process that reports three data-parallel replicas (as a mesh strategy whose world is larger would)."""

    @property
    def distributed_sampler_kwargs(self) -> dict:
        return {"num_replicas": 3, "rank": 0}


def test_tokens_seen_counts_data_parallel_ranks_not_the_world(one_thread):
    module = DeepSeekV3LitModule(overrides=SMALL_MODEL)
    trainer = Trainer(strategy=ThreeReplicas(torch.device("cpu")), max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(torch.randint(0, 4096, (8, 9)), batch_size=2))
    assert module.tokens_seen == 2 * 3 * (2 * 8)  # steps x replicas x (B x S)
    stub = type("T", (), {"strategy": object(), "world_size": 4})()  # a strategy without sampler kwargs
    assert data_parallel_size(stub) == 4


class RecordSteps(Callback):
    """Per optimizer step: what the schedules gave it (logged by the LitModule) and the loss parts."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps or trainer.global_step == self.start:
            return  # a micro-batch that did not close a window
        keys = ("lr", "train/mtp_loss_weight", "train/loss", "train/ce_loss", "train/mtp_loss", "train/balance_loss")
        self.steps[trainer.global_step] = {k: trainer.callback_metrics[k].item() for k in keys}
        self.steps[trainer.global_step]["tokens_seen"] = pl_module.tokens_seen
        self.steps[trainer.global_step]["accumulation"] = trainer.accumulate_grad_batches
        biases = [m.gate.e_score_correction_bias for m in pl_module.model.moe_layers()]
        self.steps[trainer.global_step]["bias"] = torch.stack(biases).clone()


# Micro-batches of 2 x 32 = 64 tokens; the batch ramps to 2 micro-batches once 128 tokens are seen, so the steps
# start at 0, 64, 128, 256, 384, 512 tokens. LR: peak after 1 warm-up step, cosine over tokens 192 -> 448 to 0.1;
# MTP weight 0.1 from 256 tokens; bias updates while tokens_seen <= 384 (steps 1-4).
SCHEDULES = [
    "--model.lr_scheduler.init_args.warmup_steps=1",
    "--model.lr_scheduler.init_args.decay_start_tokens=192",
    "--model.lr_scheduler.init_args.decay_tokens=256",
    "--model.mtp_loss_weight_after_tokens",
    json.dumps({256: 0.1}),
    "--trainer.callbacks.init_args.every_n_train_steps=3",
    "--trainer.callbacks.init_args.save_top_k=-1",
    "--trainer.deterministic=true",
]
STARTS = [0, 64, 128, 256, 384, 512]


def _fit(args: list[str]) -> tuple[DSV3CLI, RecordSteps]:
    recorder = RecordSteps()
    callbacks = [recorder, BatchSizeWarmup(start=1, end=2, ramp_tokens=128)]
    return DSV3CLI(args=["fit", *args], trainer_defaults={"callbacks": callbacks}), recorder


def _with_frozen_bias(args: list[str], tmp_path) -> list[str]:
    """``args`` with the base bias callback frozen after 384 tokens (a config right after tiny.yaml)."""
    with open(ROOT / "configs" / "base" / "callbacks.yaml") as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("ExpertBiasBalancing"):
            cb["init_args"]["freeze_after_tokens"] = 384
    path = tmp_path / "freeze.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    at = args.index(TINY_YAML) + 1
    return [*args[:at], "--config", str(path), *args[at:]]


def test_schedules_follow_tokens_seen_and_resume_onto_them(small, tmp_path):
    args = _with_frozen_bias(small(max_steps=6, val_check_interval=3, log_every_n_steps=1) + SCHEDULES, tmp_path)
    full, full_rec = _fit(args)
    steps = full_rec.steps
    assert [steps[s]["accumulation"] for s in range(1, 7)] == [1, 1, 2, 2, 2, 2]
    assert [steps[s]["tokens_seen"] for s in range(1, 7)] == [*STARTS[1:], 640]
    peak = 3e-3
    for step, start in zip(range(1, 7), STARTS, strict=True):
        s = steps[step]
        progress = min(max(start - 192, 0) / 256, 1.0)
        assert s["lr"] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))), step
        weight = 0.1 if start >= 256 else 0.3
        assert s["train/mtp_loss_weight"] == pytest.approx(weight), step
        total = s["train/ce_loss"] + weight * s["train/mtp_loss"] + s["train/balance_loss"]
        assert s["train/loss"] == pytest.approx(total, rel=1e-5), step
    moved = [not torch.equal(steps[s]["bias"], steps[s - 1]["bias"]) for s in range(2, 7)]
    assert moved == [True, True, True, False, False]  # updates while tokens_seen <= 384: steps 1-4
    # Resume from the step-3 checkpoint: the same schedules from the same position, the same losses and biases.
    mid = next((tmp_path / "ckpt").glob("step000003*.ckpt"))
    resumed, resumed_rec = _fit([*args, "--ckpt_path", str(mid)])
    assert sorted(resumed_rec.steps) == [4, 5, 6]
    for step in (4, 5, 6):
        got, want = resumed_rec.steps[step], steps[step]
        assert torch.equal(got.pop("bias"), want["bias"]) and got == {k: v for k, v in want.items() if k != "bias"}
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for name, tensor in full_state.items():
        assert torch.equal(resumed_state[name], tensor), name
