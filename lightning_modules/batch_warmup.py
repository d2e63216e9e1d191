"""Batch-size warm-up as a ramp of gradient-accumulation steps, driven by the tokens seen.

The report (section 4.2) raises the batch from 3072 to 15360 sequences over the first 469B tokens, then
keeps it. Here the global batch is ``data.batch_size x data-parallel ranks x accumulation``; this callback ramps
the accumulation linearly in tokens seen (``DeepSeekV3LitModule.tokens_seen``) from ``start`` to ``end``
micro-batches over ``ramp_tokens``, then keeps ``end``.

Lightning closes an accumulation window when its in-epoch batch counter is a multiple of
``trainer.accumulate_grad_batches``, and scales each micro-batch loss by ``1 / accumulate_grad_batches``. So
the callback only changes the value at a window boundary whose counter is a multiple of the new value: a change
may wait a few steps, but windows are never cut short and every loss is scaled by its own window's size.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class BatchSizeWarmup(Callback):
    """Ramp gradient accumulation from ``start`` to ``end`` micro-batches over the first ``ramp_tokens`` tokens.

    Args:
        start: Micro-batches per optimizer step at first (report: 3072 sequences / micro-batch x ranks).
        end: Micro-batches per optimizer step after the ramp (report: 15360 sequences' worth).
        ramp_tokens: Training tokens over which the accumulation grows linearly (report: 469B).
    """

    def __init__(self, start: int = 1, end: int = 5, ramp_tokens: int = 469_000_000_000) -> None:
        if start < 1 or end < start:
            raise ValueError(f"BatchSizeWarmup needs 1 <= start <= end, got start={start}, end={end}")
        if ramp_tokens < 0:
            raise ValueError(f"BatchSizeWarmup.ramp_tokens must be >= 0, got {ramp_tokens}")
        self.start, self.end, self.ramp_tokens = start, end, ramp_tokens
        self._current = start  # restored on resume, so a pending change waits for the same boundary

    def target(self, tokens: int) -> int:
        """Accumulation wanted after ``tokens`` training tokens."""
        if tokens >= self.ramp_tokens:
            return self.end
        return self.start + (self.end - self.start) * tokens // self.ramp_tokens

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "BatchSizeWarmup sets the accumulation itself; leave trainer.accumulate_grad_batches at 1 "
                f"(got {trainer.accumulate_grad_batches})"
            )
        if not hasattr(pl_module, "tokens_seen"):
            raise ValueError("BatchSizeWarmup reads pl_module.tokens_seen (kept by DeepSeekV3LitModule)")
        trainer.accumulate_grad_batches = self._next(pl_module, _done(trainer), self._current)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        done = _done(trainer) - 1  # Lightning counts this batch as ready before the hook
        if done % trainer.accumulate_grad_batches == 0:  # a window starts with this batch
            trainer.accumulate_grad_batches = self._next(pl_module, done, trainer.accumulate_grad_batches)
        self._current = trainer.accumulate_grad_batches

    def _next(self, pl_module: LightningModule, done: int, current: int) -> int:
        wanted = self.target(pl_module.tokens_seen)
        return wanted if done % wanted == 0 else current

    def state_dict(self) -> dict[str, Any]:
        return {"accumulation": self._current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._current = state_dict["accumulation"]


def _done(trainer: Trainer) -> int:
    """Micro-batches counted in this epoch (the counter Lightning's accumulation check uses)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready
