"""BestAndLastCheckpoint: last.ckpt holds the newest step whatever the monitored metric did; top-k as Lightning."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from callbacks import BestAndLastCheckpoint


class ScriptedValLoss(pl.LightningModule):
    """One weight; validation ``k`` logs ``val_losses[k]``, so which checkpoint is best is known in advance."""

    def __init__(self, val_losses: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.val_losses = val_losses
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return (self.w - batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/loss", self.val_losses[self.validations])
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.ones(100, 1), batch_size=1)

    def val_dataloader(self):
        return DataLoader(torch.ones(1, 1), batch_size=1)


def _fit(tmp_path, checkpoint, max_steps, val_check_interval=10, val_losses=(10.8, 7.55, 8.48)):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ScriptedValLoss(list(val_losses)))
    return trainer


def _step(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_last_is_the_newest_step_after_a_worse_validation(tmp_path):
    """The issue's repro: val/loss 10.80, 7.55, 8.48 at steps 10/20/30; Lightning's last.ckpt stays at step 20."""
    kwargs = {"filename": "{step}", "monitor": "val/loss", "save_top_k": 1}
    _fit(tmp_path, ModelCheckpoint(tmp_path / "lightning", save_last=True, **kwargs), max_steps=30)
    assert _step(tmp_path / "lightning" / "last.ckpt") == 20  # what goes wrong with ModelCheckpoint alone

    ours = BestAndLastCheckpoint(dirpath=tmp_path / "ours", last_every_n_train_steps=0, **kwargs)
    _fit(tmp_path, ours, max_steps=30)
    assert _step(tmp_path / "ours" / "last.ckpt") == 30
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["last.ckpt", "step=20.ckpt"]  # top-1 as before
    assert ours.best_model_score == pytest.approx(7.55)


def test_last_is_written_every_n_steps_and_at_the_end(tmp_path, monkeypatch):
    checkpoint = BestAndLastCheckpoint(dirpath=tmp_path, last_every_n_train_steps=4, monitor="val/loss")
    written, save = [], pl.Trainer.save_checkpoint

    def recording_save(trainer, path, *args, **kwargs):
        written.append((trainer.global_step, str(path)))
        return save(trainer, path, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", recording_save)
    _fit(tmp_path, checkpoint, max_steps=10, val_check_interval=6, val_losses=(1.0,))
    last = str(tmp_path / "last.ckpt")
    # every 4 steps, after the validation at step 6 (not yet saved), at the end (step 10); once per step at most
    assert [step for step, path in written if path == last] == [4, 6, 8, 10]
    assert _step(last) == 10


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_new_run_replaces_last_instead_of_writing_last_v1(tmp_path):
    for max_steps in (3, 5):
        _fit(tmp_path, BestAndLastCheckpoint(dirpath=tmp_path, last_every_n_train_steps=0), max_steps=max_steps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert _step(tmp_path / "last.ckpt") == 5


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="last_every_n_train_steps=-1 must be >= 0"):
        BestAndLastCheckpoint(last_every_n_train_steps=-1)
    with pytest.raises(ValueError, match="leave save_last out"):
        BestAndLastCheckpoint(save_last=False)
