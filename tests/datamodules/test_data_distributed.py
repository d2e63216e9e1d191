"""Two data-parallel ranks (gloo, forked CPU processes): disjoint data per rank, and an exact resume of both.

Lightning writes checkpoints from rank 0 only, so the datamodule gathers every rank's stream position into its
``state_dict``; this test fails if rank 1 resumed from rank 0's position (or from the start).
"""

import itertools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

N = 4


class Recorder(L.LightningModule):
    """Saves the batches each rank trains on to ``{out}-rank{r}.pt`` at the end of fit."""

    def __init__(self, vocab_size: int, out: str) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.out = out
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        return self.embed(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_fit_end(self) -> None:
        torch.save(self.seen, f"{self.out}-rank{self.global_rank}.pt")


def _fit(dm, tmp_path, tag, max_steps, ckpt_path=None, save_every=None):
    callbacks = [ModelCheckpoint(tmp_path / tag, "{step}", every_n_train_steps=save_every)] if save_every else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=max_steps,
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Recorder(dm.vocab_size, str(tmp_path / tag)), datamodule=dm, ckpt_path=ckpt_path)
    return [torch.load(tmp_path / f"{tag}-rank{r}.pt") for r in range(2)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.distributed
def test_two_ranks_read_disjoint_data_and_resume_exactly(make_dm, tmp_path):
    def dm():
        return make_dm(num_workers=2, shuffle_buffer=4)

    a = _fit(dm(), tmp_path, "a", 2 * N)
    b = _fit(dm(), tmp_path, "b", N, save_every=N)
    ckpt = tmp_path / "b" / f"step={N}.ckpt"
    assert sorted(torch.load(ckpt, weights_only=True)["PretrainDataModule"]["ranks"]) == [0, 1]
    b_resumed = _fit(dm(), tmp_path, "b2", 2 * N, ckpt_path=ckpt)

    for rank in range(2):
        assert _same(a[rank], b[rank] + b_resumed[rank])
        explicit = make_dm(num_workers=2, shuffle_buffer=4, rank=rank, world_size=2)
        assert _same(a[rank], list(itertools.islice(explicit.train_dataloader(), 2 * N)))
    assert not any(torch.equal(x, y) for x, y in zip(a[0], a[1], strict=True))
