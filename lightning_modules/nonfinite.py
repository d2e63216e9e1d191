"""Non-finite losses and gradients: skip the optimizer step on the device, stop with the step's number.

Without a host sync per step: the gradient norm (the same on every rank, since it is computed over the reduced
gradients) decides on the device whether the update is applied, through torch's ``found_inf`` protocol (the one
``GradScaler`` uses): optimizers that set ``_step_supports_amp_scaling`` (torch's Adam/AdamW/SGD with
``fused=True``) skip the update and their step count in-kernel when ``found_inf`` is 1, so the weights and moments
stay those of the last good step. Counts stay on the device too; they are read (one host sync, plus a 2-element
all-reduce with several ranks) at logging steps and before every checkpoint is written, so a checkpoint is never
written from a state that took a non-finite step. More than ``max_skips`` bad steps stop the run with
``NonFiniteError``, naming the first. An optimizer without the protocol cannot skip: then ``max_skips`` must be 0
and the run stops at the next check, before any checkpoint of the damaged weights.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

_NONE = 2**62  # "no bad step yet", larger than any step


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm more often than allowed."""


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``optimizer.found_inf`` (torch's fused optimizers, GradScaler's protocol)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class NonFiniteGuard:
    """Count non-finite training steps on the device, skip their updates, and stop after ``max_skips`` of them.

    Args:
        max_skips: Bad steps tolerated (skipped) over the run; one more stops it. 0 stops at the first.
    """

    def __init__(self, max_skips: int = 0) -> None:
        if max_skips < 0:
            raise ValueError(f"model.max_nonfinite_skips={max_skips} must be >= 0 (0: stop at the first)")
        self.max_skips = max_skips
        self._loss_finite: torch.Tensor | None = None  # over the micro-batches of the current step
        self._stats: torch.Tensor | None = None  # int64 (bad steps, -first bad step, last bad step)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise a ``ValueError`` if skipping is asked of an optimizer that cannot skip on the device."""
        if self.max_skips and not skips_on_device(optimizer):
            raise ValueError(
                f"model.max_nonfinite_skips={self.max_skips} needs an optimizer that can skip a step on the device; "
                f"{type(optimizer).__name__} cannot: use torch.optim.AdamW with fused: true, or max_nonfinite_skips 0"
            )

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss (no host sync)."""
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, step: int) -> None:
        """After the gradient norm, before ``optimizer.step`` (which runs next): skip the update if it is not finite.

        ``step`` is the number of the step being taken (1-based), for the message.
        """
        if isinstance(grad_norm, DTensor):  # FSDP2/EP gradients: the norm over all shards, the same on every rank
            grad_norm = grad_norm.full_tensor()
        skip = ~torch.isfinite(grad_norm.detach())
        if skips_on_device(optimizer):
            optimizer.grad_scale = None
            optimizer.found_inf = skip.float()
        bad = skip if self._loss_finite is None else skip | ~self._loss_finite.to(skip.device)
        self._loss_finite = None
        if self._stats is None:
            self._stats = torch.tensor([0, -_NONE, -1], dtype=torch.int64, device=skip.device)
        count, neg_first, last = self._stats.unbind()
        # (count, -first, last): one MAX reduction over the ranks gives the largest count, the earliest first and
        # the latest last bad step. The skips themselves agree already: every rank has the same gradient norm.
        first = torch.where(bad & (neg_first == -_NONE), -step, neg_first)
        self._stats = torch.stack([count + bad.long(), first, torch.where(bad, step, last)])

    @property
    def bad_steps(self) -> torch.Tensor:
        """Bad steps so far, on the device (for logging without a sync)."""
        return torch.zeros((), dtype=torch.int64) if self._stats is None else self._stats[0]

    def check(self) -> None:
        """Read the counts (one host sync; a collective with several ranks: call on all) and stop if over budget.

        Raises:
            NonFiniteError: naming the bad steps (the first, the last, how many).
        """
        if self._stats is None:
            return
        stats = self._stats.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        count, neg_first, last = stats.tolist()
        if count > self.max_skips:
            steps = f"step {-neg_first}" if count == 1 else f"{count} steps from step {-neg_first} to {last}"
            raise NonFiniteError(
                f"training diverged: the loss or gradient norm was not finite at {steps} "
                f"(model.max_nonfinite_skips={self.max_skips}); no "
                "checkpoint was written from it. Resume from the last checkpoint with a lower "
                "model.optimizer.init_args.lr, or allow skips with model.max_nonfinite_skips"
            )
