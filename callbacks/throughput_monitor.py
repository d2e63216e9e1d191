"""Training throughput and model FLOPs utilisation (MFU) to the loggers and the progress bar."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.optimizer_step import OptimizerStepTracker

# Dense bf16 FLOP/s by the vendor datasheets (no sparsity) that Lightning's table lacks: torch names the H200 SXM
# plainly "NVIDIA H200", which get_available_flops does not match (it knows "h200 sxm1"/"h200 nvl1", and with the
# datasheet's with-sparsity figures, twice the dense ones). First match wins.
DATASHEET_BF16_FLOPS = {"h200 nvl": 835.5e12, "h200": 989.5e12}
# Dense bf16 matmul FLOP/s measured in this project (8192^3 products on random data, 770-791 TFLOP/s on one H200
# SXM), by exact device name: the second MFU, against what a device of that kind reaches in practice.
MEASURED_BF16_FLOPS = {"nvidia h200": 791e12}


def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device).lower() if device.type == "cuda" else None


def datasheet_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ONE ``device`` by its datasheet, the denominator torchtitan, Megatron and papers use.

    ``DATASHEET_BF16_FLOPS`` for what Lightning lacks, else Lightning's ``get_available_flops``; None on a CPU or a
    device neither knows.
    """
    name = _device_name(device)
    if name is None:
        return None
    found = next((flops for key, flops in DATASHEET_BF16_FLOPS.items() if key in name), None)
    return found if found is not None else get_available_flops(device, torch.bfloat16)


def measured_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 matmul FLOP/s measured in this project on a device of this kind (an H200: 791e12), or None."""
    return MEASURED_BF16_FLOPS.get(_device_name(device))


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


def data_parallel_size(trainer: Trainer) -> int:
    """Ranks that read their own batch: the strategy's ``distributed_sampler_kwargs`` (``DeepSeekV3Strategy``'s
    ``dp`` mesh dimension, without pipeline peers), else the world size."""
    kwargs = trainer.distributed_sampler_kwargs
    return kwargs["num_replicas"] if kwargs else trainer.world_size


class ThroughputMonitor(Callback):
    """Log tokens/s, step time and MFU every ``log_every_n_steps`` optimizer steps.

    Wall time is read only on logging steps, after one device synchronisation there, so training steps are never
    held up; the first optimizer step (warm-up, compilation) and validation are left out of the timing. Tokens
    count the data-parallel ranks, each of which reads its own batch: ``data_parallel_size(trainer)`` x local tokens
    (under expert or pipeline parallelism the world size is larger).

    Metrics: ``perf/tokens_per_s`` (global), ``perf/step_time_s`` (mean seconds per optimizer step),
    ``perf/mfu`` = ``config.flops_per_token(S)`` x tokens/s / (peak x world size), the fraction of all the devices'
    dense bf16 datasheet peak used by the model's matmuls and attention (the usual MFU), and
    ``perf/mfu_measured_peak``, the same over the matmul rate measured on such a device (``MEASURED_BF16_FLOPS``),
    where one is known. tokens/s and MFU also go to the progress bar.

    Args:
        log_every_n_steps: Interval in optimizer steps; ``None`` = the Trainer's ``log_every_n_steps``.
        peak_flops: Peak FLOP/s of ONE device for ``perf/mfu``. ``None``: the datasheet's dense bf16 peak of the
            device present (``datasheet_peak_flops``: 989.5e12 on an H100/H200 SXM); MFU is not logged on a CPU or
            an unknown device unless given.
        measured_peak_flops: FLOP/s of ONE device for ``perf/mfu_measured_peak``. ``None``: this project's
            measurement for the device present (791e12 on an H200), else that metric is not logged.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        peak_flops: float | None = None,
        measured_peak_flops: float | None = None,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps <= 0:
            raise ValueError(f"log_every_n_steps must be a positive number of steps or None, got {log_every_n_steps}")
        for name, value in (("peak_flops", peak_flops), ("measured_peak_flops", measured_peak_flops)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (FLOP/s of one device) or None, got {value}")
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self.measured_peak_flops = measured_peak_flops
        self._tracker = OptimizerStepTracker()
        self._reset_window()
        self._t_last: float | None = None
        self._started = False
        self._peaks: dict[str, float | None] = {}

    def _reset_window(self) -> None:
        self._tokens, self._steps, self._elapsed = 0, 0, 0.0

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        self._peaks = {
            "perf/mfu": self.peak_flops or datasheet_peak_flops(device),
            "perf/mfu_measured_peak": self.measured_peak_flops or measured_peak_flops(device),
        }
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
        tokens_per_s = self._tokens * data_parallel_size(trainer) / self._elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s, "perf/step_time_s": self._elapsed / self._steps}
        config = getattr(getattr(pl_module, "model", None), "config", None)
        for name, peak in self._peaks.items():
            if peak is not None and config is not None:
                metrics[name] = config.flops_per_token(seq_len) * tokens_per_s / (peak * trainer.world_size)
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
