"""Training throughput and model FLOPs utilisation (MFU) to the loggers and the progress bar."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.optimizer_step import OptimizerStepTracker

# Dense bf16 matmul FLOP/s measured on one H200 in this project (the datasheet says 989.5e12).
H200_BF16_PEAK_FLOPS = 791e12


def batch_tokens(batch: Any) -> tuple[int, int]:
    """(trained tokens, sequence length) of a batch, from shapes only.

    A (B, S+1) tensor (the datamodule's packed rows: inputs ``[:, :-1]``, labels ``[:, 1:]``) trains B*S tokens
    of length S; a dict with ``input_ids`` (B, S) trains B*S.
    """
    if isinstance(batch, torch.Tensor) and batch.dim() == 2:
        return batch.shape[0] * (batch.shape[1] - 1), batch.shape[1] - 1
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        bsz, seqlen = batch["input_ids"].shape[:2]
        return bsz * seqlen, seqlen
    raise ValueError(
        f"ThroughputMonitor counts tokens of (B, S+1) tensor batches or dicts with 'input_ids'; got {type(batch)}"
    )


class ThroughputMonitor(Callback):
    """Log tokens/s, step time and MFU every ``log_every_n_steps`` optimizer steps.

    Wall time is read only on logging steps, after one device synchronisation there, so training steps are never
    held up; the first optimizer step (warm-up, compilation) and validation are left out of the timing. Tokens
    count every rank: ``trainer.world_size`` x local tokens (data-parallel ranks each read their own batch).

    Metrics: ``perf/tokens_per_s`` (global), ``perf/step_time_s`` (mean seconds per optimizer step), and
    ``perf/mfu`` = ``config.flops_per_token(S)`` x tokens/s / (``peak_flops`` x world size), the fraction of the
    devices' peak used by the model's matmuls and attention. tokens/s and MFU also go to the progress bar.

    Args:
        log_every_n_steps: Interval in optimizer steps; ``None`` = the Trainer's ``log_every_n_steps``.
        peak_flops: Peak FLOP/s of ONE device. ``None``: 791e12 (bf16 dense, measured on an H200) on CUDA; on
            other devices MFU is not logged unless given.
    """

    def __init__(self, log_every_n_steps: int | None = None, peak_flops: float | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps <= 0:
            raise ValueError(f"log_every_n_steps must be a positive number of steps or None, got {log_every_n_steps}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 (FLOP/s of one device) or None, got {peak_flops}")
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self._tracker = OptimizerStepTracker()
        self._reset_window()
        self._t_last: float | None = None
        self._started = False

    def _reset_window(self) -> None:
        self._tokens, self._steps, self._elapsed = 0, 0, 0.0

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _peak(self, pl_module: LightningModule) -> float | None:
        if self.peak_flops is None and pl_module.device.type == "cuda":
            return H200_BF16_PEAK_FLOPS
        return self.peak_flops

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tracker.reset(trainer)
        self._reset_window()
        self._t_last, self._started = None, False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens, seq_len = batch_tokens(batch)
        self._tokens += tokens
        if self._tracker.stepped(trainer):
            self._steps += 1
            if not self._started:  # the clock starts after the first step
                self._started, self._t_last = True, self._now(pl_module)
                self._reset_window()
            elif trainer.global_step % (self.log_every_n_steps or trainer.log_every_n_steps) == 0:
                self._log(trainer, pl_module, seq_len)

    def _log(self, trainer: Trainer, pl_module: LightningModule, seq_len: int) -> None:
        now = self._now(pl_module)
        self._elapsed += now - self._t_last
        self._t_last = now
        tokens_per_s = self._tokens * trainer.world_size / self._elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s, "perf/step_time_s": self._elapsed / self._steps}
        peak, config = self._peak(pl_module), getattr(getattr(pl_module, "model", None), "config", None)
        if peak is not None and config is not None:
            metrics["perf/mfu"] = config.flops_per_token(seq_len) * tokens_per_s / (peak * trainer.world_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # Lightning keeps progress-bar values until they are logged again: no per-step log (a host-to-device copy).
        for name in ("perf/tokens_per_s", "perf/mfu"):
            if name in metrics:
                pl_module.log(name, metrics[name], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._reset_window()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t_last is not None:  # pause the clock during validation within fit
            self._elapsed += self._now(pl_module) - self._t_last
            self._t_last = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._started and self._t_last is None:
            self._t_last = self._now(pl_module)
