"""The DeepSeek-V3 schedules (section 4.2 of the report), driven by the tokens seen.

The report states its schedules in tokens: the LR warms up linearly to 2.2e-4 over the first 2K steps, stays
constant until 10T tokens, decays (cosine) to 2.2e-5 over 4.3T tokens, stays at 2.2e-5 for 333B tokens and is
7.3e-6 for the last 167B; the MTP loss weight is 0.3 for the first 10T tokens, then 0.1; the bias update speed
is 0.001 until 14.3T tokens, then 0. While the batch ramps up (3072 -> 15360 sequences over 469B tokens) steps
and tokens are not proportional, so a schedule in steps would start the decay near 9.7T tokens, not 10T.

The one count they all read is ``DeepSeekV3LitModule.tokens_seen`` (global training tokens, summed over the
data-parallel ranks, saved in every checkpoint): this LR scheduler gets it at every step from the LitModule
(``step(tokens_seen)``); the MTP weight (``mtp_loss_weight_after_tokens``), the bias callback's
``freeze_after_tokens`` and ``BatchSizeWarmup.ramp_tokens`` read it too.

::

    lr/peak
    1.0 |    ______________
        |   /              '-.
        |  /                  '-.
    r   | /                      '--------______  (r = final_lr_ratio, then tail_lr_ratio)
        +--------------------------------------------> tokens seen
     warmup_steps  decay_start_tokens  +decay_tokens  tail_start_tokens
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def lr_ratio(
    step: int,
    tokens: int,
    warmup_steps: int,
    decay_start_tokens: int,
    decay_tokens: int,
    final_lr_ratio: float,
    tail_start_tokens: int | None = None,
    tail_lr_ratio: float | None = None,
) -> float:
    """Multiplier on the peak LR for optimizer step ``step`` (0-based) after ``tokens`` training tokens."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if tail_start_tokens is not None and tokens >= tail_start_tokens:
        return tail_lr_ratio
    if tokens < decay_start_tokens:
        return 1.0
    progress = min((tokens - decay_start_tokens) / max(decay_tokens, 1), 1.0)
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def value_after_tokens(initial: float, after_tokens: dict[int, float] | None, tokens: int) -> float:
    """A piecewise-constant schedule: ``initial``, then ``after_tokens[t]`` once ``tokens >= t``."""
    value = initial
    for start in sorted(after_tokens or {}):
        if tokens >= start:
            value = after_tokens[start]
    return value


class WarmupStableCosineLR(LRScheduler):
    """Linear warm-up over steps, then constant peak, cosine decay and an optional tail, placed in tokens.

    The peak LR is the optimizer's ``lr``. ``DeepSeekV3LitModule`` steps it after every optimizer step with its
    ``tokens_seen`` (``interval: step``, set by the LitModule); a bare ``step()`` keeps the last token count.

    Args:
        optimizer: The wrapped optimizer.
        warmup_steps: Steps of linear warm-up from peak/warmup_steps to the peak (report: 2000).
        decay_start_tokens: Tokens seen at which the cosine decay begins (report: 10T).
        decay_tokens: Length of the cosine decay in tokens (report: 4.3T); after it the LR stays at
            ``final_lr_ratio`` x peak.
        final_lr_ratio: LR at the end of the decay over the peak (report: 2.2e-5 / 2.2e-4 = 0.1).
        tail_start_tokens: Optional tokens seen from which the LR is ``tail_lr_ratio`` x peak (report: 7.3e-6
            for the last 167B of 14.8T tokens, from 14.633T).
        tail_lr_ratio: Ratio of the tail (report: 7.3e-6 / 2.2e-4 = 0.0332); required with ``tail_start_tokens``.
        last_epoch: Index of the last step, for resuming (-1 starts fresh); Lightning restores the state.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 2000,
        decay_start_tokens: int = 10_000_000_000_000,
        decay_tokens: int = 4_300_000_000_000,
        final_lr_ratio: float = 0.1,
        tail_start_tokens: int | None = None,
        tail_lr_ratio: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps, self.final_lr_ratio = warmup_steps, final_lr_ratio
        self.decay_start_tokens, self.decay_tokens = decay_start_tokens, decay_tokens
        self.tail_start_tokens, self.tail_lr_ratio = tail_start_tokens, tail_lr_ratio
        _check_schedule(*self._phases())
        self.tokens_seen = 0
        super().__init__(optimizer, last_epoch)

    def step(self, tokens_seen: int | None = None) -> None:  # type: ignore[override]
        """Advance one optimizer step; ``tokens_seen`` = training tokens consumed so far (all ranks)."""
        if tokens_seen is not None:
            self.tokens_seen = int(tokens_seen)
        super().step()

    def ratio(self) -> float:
        """The current LR over the peak."""
        return lr_ratio(self.last_epoch, self.tokens_seen, *self._phases())

    def _phases(self) -> tuple:
        return (
            self.warmup_steps,
            self.decay_start_tokens,
            self.decay_tokens,
            self.final_lr_ratio,
            self.tail_start_tokens,
            self.tail_lr_ratio,
        )

    def get_lr(self) -> list[float]:
        return [base * self.ratio() for base in self.base_lrs]

    # The position only: the phases come from the config, so a resumed run follows the schedule it is given.
    _STATE = ("last_epoch", "_step_count", "tokens_seen", "base_lrs", "_last_lr")

    def state_dict(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._STATE if k in self.__dict__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k in self._STATE})


def _check_schedule(
    warmup_steps: int,
    decay_start_tokens: int,
    decay_tokens: int,
    final_lr_ratio: float,
    tail_start_tokens: int | None,
    tail_lr_ratio: float | None,
) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0 (report: 2000), got {warmup_steps}")
    if decay_start_tokens < 0 or decay_tokens < 1:
        raise ValueError(
            f"decay_start_tokens ({decay_start_tokens}) must be >= 0 and decay_tokens ({decay_tokens}) >= 1"
        )
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio must be in [0, 1] (report: 0.1), got {final_lr_ratio}")
    if (tail_start_tokens is None) != (tail_lr_ratio is None):
        raise ValueError("set both tail_start_tokens and tail_lr_ratio for a final constant phase, or neither")
    if tail_start_tokens is not None and tail_start_tokens < decay_start_tokens:
        raise ValueError(
            f"tail_start_tokens ({tail_start_tokens}) must be >= decay_start_tokens ({decay_start_tokens})"
        )
