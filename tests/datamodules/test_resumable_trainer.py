"""Exact resume under a real ``lightning.Trainer``: prefetching, workers and validation do not shift the data.

Run A trains 2N steps, checkpointing at step N; run B trains N steps, then a new trainer resumes B's checkpoint to
2N. B's batches followed by the resumed ones must be A's batches exactly, and resuming A's own mid-run checkpoint
(taken while workers and Lightning had already fetched batches beyond step N) must replay A's second half.
"""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

N = 6


class Recorder(L.LightningModule):
    """A one-layer bigram model that records every batch it trains and validates on."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        self.train_batches: list[torch.Tensor] = []
        self.val_batches: list[torch.Tensor] = []

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.embed(batch[:, :-1])  # (B, S, V)
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.train_batches.append(batch.clone())
        return self._loss(batch)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_batches.append(batch.clone())
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, tmp_path, max_steps, ckpt_path=None, save_every=None, accumulate=1):
    model = Recorder(dm.vocab_size)
    callbacks = []
    if save_every:
        callbacks.append(ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=save_every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        val_check_interval=4,  # an endless stream needs an integer interval
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("workers,accumulate", [(0, 1), (2, 1), (0, 2)])
def test_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_run(make_dm, tmp_path, workers, accumulate):
    def dm():
        return make_dm(num_workers=workers, val_fraction=0.2, val_batches=2, shuffle_buffer=4, fim_rate=0.3)

    a = _fit(dm(), tmp_path / "a", 2 * N, save_every=N, accumulate=accumulate)
    b = _fit(dm(), tmp_path / "b", N, save_every=N, accumulate=accumulate)
    b_resumed = _fit(dm(), tmp_path / "b2", 2 * N, ckpt_path=tmp_path / "b" / f"step={N}.ckpt", accumulate=accumulate)
    a_resumed = _fit(dm(), tmp_path / "a2", 2 * N, ckpt_path=tmp_path / "a" / f"step={N}.ckpt", accumulate=accumulate)

    assert len(a.train_batches) == 2 * N * accumulate
    assert _same(a.train_batches, b.train_batches + b_resumed.train_batches)
    assert _same(a.train_batches[N * accumulate :], a_resumed.train_batches)
    assert a.val_batches and _same(a.val_batches[:2], b_resumed.val_batches[:2])  # one fixed validation set


class HookedRecorder(Recorder):
    """A module with its own ``on_before_batch_transfer``, which the datamodule's must not displace."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.hook_calls = 0

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.hook_calls += self.trainer.training
        return batch


@pytest.mark.filterwarnings("ignore:You have overridden `on_before_batch_transfer` in both")
def test_checkpoint_holds_the_consumed_position(make_dm, tmp_path):
    model = HookedRecorder(make_dm().vocab_size)
    checkpoint = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=N)
    trainer = L.Trainer(accelerator="cpu", max_steps=N, callbacks=[checkpoint], logger=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=make_dm(num_workers=2, val_fraction=0.2, val_batches=2))
    state = torch.load(tmp_path / f"step={N}.ckpt", weights_only=True)["PretrainDataModule"]
    assert state["ranks"][0]["batches"] == N  # not N + 1 (Lightning's prefetch) nor more (workers' prefetch)
    assert state["ranks"][0]["next_stream"] == N % 2
    assert model.hook_calls == N  # every training batch still reached the module's own hook
