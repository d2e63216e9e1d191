"""The DeepSeek-V3 learning-rate schedule (section 4.2 of the report), counted in optimizer steps.

The report: linear warm-up to 2.2e-4 over the first 2K steps, constant until 10T tokens, cosine decay to
2.2e-5 over 4.3T tokens, constant 2.2e-5, and 7.3e-6 for the last 167B tokens. Tokens convert to steps
through the global batch size; the schedule here takes steps, so a YAML states them once.

::

    lr/peak
    1.0 |    ______________
        |   /              '-.
        |  /                  '-.
    r   | /                      '--------______  (r = final_lr_ratio, then tail_lr_ratio)
        +--------------------------------------------> step
          warmup   decay_start   +decay_steps   tail_start
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_ratio(
    step: int,
    warmup_steps: int,
    decay_start: int,
    decay_steps: int,
    final_lr_ratio: float,
    tail_start: int | None = None,
    tail_lr_ratio: float | None = None,
) -> float:
    """Multiplier on the peak LR at optimizer step ``step`` (0-based: the LR used by the step-th update)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if tail_start is not None and step >= tail_start:
        return tail_lr_ratio
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start) / max(decay_steps, 1), 1.0)
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupStableCosineLR(LambdaLR):
    """Linear warm-up, constant peak, cosine decay to ``final_lr_ratio`` x peak, optional constant tail.

    The peak LR is the optimizer's ``lr``. Step it every optimizer step (``interval: step``; the LitModule
    sets this).

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Steps of linear warm-up from peak/warmup_steps to the peak (report: 2000).
        decay_start: Step at which the cosine decay begins (report: the step reaching 10T tokens);
            must be >= warmup_steps.
        decay_steps: Length of the cosine decay in steps (report: 4.3T tokens' worth); after it the LR
            stays at ``final_lr_ratio`` x peak.
        final_lr_ratio: LR at the end of the decay over the peak (report: 2.2e-5 / 2.2e-4 = 0.1).
        tail_start: Optional step from which the LR is ``tail_lr_ratio`` x peak (report: 7.3e-6 for the last
            167B tokens).
        tail_lr_ratio: Ratio of the tail (report: 7.3e-6 / 2.2e-4 = 0.0332); required with ``tail_start``.
        last_epoch: Index of the last step, for resuming (-1 starts fresh); Lightning restores the state.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 2000,
        decay_start: int = 2000,
        decay_steps: int = 10000,
        final_lr_ratio: float = 0.1,
        tail_start: int | None = None,
        tail_lr_ratio: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        _check_schedule(warmup_steps, decay_start, decay_steps, final_lr_ratio, tail_start, tail_lr_ratio)
        self.warmup_steps, self.decay_start, self.decay_steps = warmup_steps, decay_start, decay_steps
        self.final_lr_ratio, self.tail_start, self.tail_lr_ratio = final_lr_ratio, tail_start, tail_lr_ratio
        super().__init__(optimizer, self._ratio, last_epoch=last_epoch)

    def _ratio(self, step: int) -> float:
        return lr_ratio(
            step,
            self.warmup_steps,
            self.decay_start,
            self.decay_steps,
            self.final_lr_ratio,
            self.tail_start,
            self.tail_lr_ratio,
        )

    def state_dict(self) -> dict:
        # LambdaLR would try to save the bound method; the schedule is fully described by the plain fields.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)


def _check_schedule(
    warmup_steps: int,
    decay_start: int,
    decay_steps: int,
    final_lr_ratio: float,
    tail_start: int | None,
    tail_lr_ratio: float | None,
) -> None:
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"warmup_steps ({warmup_steps}) and decay_steps ({decay_steps}) must be >= 0")
    if decay_start < warmup_steps:
        raise ValueError(f"decay_start ({decay_start}) must be >= warmup_steps ({warmup_steps})")
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio must be in [0, 1] (report: 0.1), got {final_lr_ratio}")
    if (tail_start is None) != (tail_lr_ratio is None):
        raise ValueError("set both tail_start and tail_lr_ratio for a final constant phase, or neither")
    if tail_start is not None and tail_start < decay_start:
        raise ValueError(f"tail_start ({tail_start}) must be >= decay_start ({decay_start})")
