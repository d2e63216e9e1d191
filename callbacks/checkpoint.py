"""``BestAndLastCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_top_k=k, save_last=True)`` rewrites ``last.ckpt`` only when it
saves a top-k checkpoint, i.e. when the monitored score improved: after a worse validation, ``--ckpt_path last``
silently goes back to the best step. Here the top-k files work as in Lightning, and ``last.ckpt`` has triggers of
its own: every ``last_every_n_train_steps`` optimizer steps, after every validation at a step not yet saved, at the
end of fit, and when ``Preemption`` stops the run. It is written at most once per step, always under the same
name (a new run in the directory replaces it; Lightning would write ``last-v1.ckpt`` beside it), through the
trainer's CheckpointIO (``AtomicCheckpointIO`` under ``dsv3``: replaced whole or not at all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """The best ``save_top_k`` checkpoints by ``monitor`` (as ``ModelCheckpoint``) and an always-current ``last.ckpt``.

    Args:
        last_every_n_train_steps: Write ``last.ckpt`` every this many optimizer steps (0: only after validations
            and at the end). Bounds the work a crash without warning (SIGKILL, a lost node) can cost.
        **kwargs: ``ModelCheckpoint`` arguments (``dirpath``, ``filename``, ``monitor``, ``save_top_k``, ...);
            ``save_last`` is always true.
    """

    def __init__(self, last_every_n_train_steps: int = 100, **kwargs: Any) -> None:
        if last_every_n_train_steps < 0:
            raise ValueError(
                f"last_every_n_train_steps={last_every_n_train_steps} must be >= 0 (0: last.ckpt only after "
                "validation and at the end)"
            )
        if kwargs.pop("save_last", True) is not True:
            raise ValueError("BestAndLastCheckpoint always writes last.ckpt: leave save_last out")
        super().__init__(save_last=True, **kwargs)
        self.last_every_n_train_steps = last_every_n_train_steps
        self._last_step_written: int | None = None

    @property
    def last_path(self) -> Path:
        """``<dirpath>/last.ckpt`` (the dirpath is resolved when the trainer sets the callback up)."""
        return Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def save_last_now(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` for the current step unless it holds it already (a collective: call on every rank)."""
        if self._last_step_written != trainer.global_step and self._fitting(trainer):
            self.last_model_path = str(self.last_path)  # overwrite in place: no "-v1" version of last
            super()._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_step_written = trainer.global_step

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        """Lightning's own trigger (after a top-k save only) is replaced by the ones of this class."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        every = self.last_every_n_train_steps
        if every and trainer.global_step % every == 0:
            self.save_last_now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.save_last_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_last_now(trainer)

    @staticmethod
    def _fitting(trainer: Trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run
