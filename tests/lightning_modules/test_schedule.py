"""The report's schedules by tokens seen: LR warm-up (steps), constant, cosine decay, tail (tokens), whatever the
batch per step; the piecewise MTP weight; the position survives a resume, the phases come from the config."""

import math

import pytest
import torch

from lightning_modules.schedule import WarmupStableCosineLR, value_after_tokens

PEAK = 2.2e-4


def _lrs(tokens_per_step: list[int], **kwargs) -> list[float]:
    """LR of each step when step i consumes tokens_per_step[i] tokens (the LitModule's order)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched = WarmupStableCosineLR(opt, **kwargs)
    lrs, seen = [], 0
    for n in tokens_per_step:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        seen += n
        sched.step(seen)
    return lrs


PHASES = {"warmup_steps": 4, "decay_start_tokens": 1000, "decay_tokens": 2000, "final_lr_ratio": 0.1,
          "tail_start_tokens": 3500, "tail_lr_ratio": 1 / 30}  # fmt: skip


def _expected(step: int, tokens: int) -> float:
    if step < 4:
        return PEAK * (step + 1) / 4
    if tokens >= 3500:
        return PEAK / 30
    progress = min(max(tokens - 1000, 0) / 2000, 1.0)
    return PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("ramp", [False, True], ids=["constant-batch", "ramped-batch"])
def test_phases_are_placed_in_tokens_seen(ramp):
    # A batch ramp (25 -> 100 tokens a step) moves every phase to another step, not to other tokens.
    per_step = [min(25 + 5 * i, 100) if ramp else 100 for i in range(60)]
    lrs = _lrs(per_step, **PHASES)
    seen = [sum(per_step[:i]) for i in range(len(per_step))]  # tokens consumed before each step
    for step, (lr, tokens) in enumerate(zip(lrs, seen, strict=True)):
        assert lr == pytest.approx(_expected(step, tokens)), (step, tokens)
    assert lrs[:4] == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])  # warm-up counts steps
    assert lrs[-1] == pytest.approx(PEAK / 30)  # the tail (report: 7.3e-6)
    first_decay = next(i for i, t in enumerate(seen) if t > 1000)
    assert lrs[first_decay - 1] == pytest.approx(PEAK) and lrs[first_decay] < PEAK  # the decay starts at 1000


def test_resume_continues_the_schedule_from_the_checkpointed_position():
    per_step = [100] * 40
    full = _lrs(per_step, **PHASES)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched = WarmupStableCosineLR(opt, **PHASES)
    for i in range(12):
        opt.step()
        sched.step(100 * (i + 1))
    state = sched.state_dict()
    torch.save(state, "/dev/null")  # plain data only: weights_only checkpoints can hold it
    assert state["tokens_seen"] == 1200 and state["last_epoch"] == 12
    # Lightning's order: build both, restore the optimizer, then the scheduler.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched2 = WarmupStableCosineLR(opt2, **PHASES)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    resumed = []
    for i in range(12, 40):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step(100 * (i + 1))
    assert resumed == pytest.approx(full[12:])
    # The phases are the config's, not the checkpoint's: a resumed run follows the schedule it is given.
    sched3 = WarmupStableCosineLR(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK), decay_tokens=7)
    sched3.load_state_dict(state)
    assert sched3.decay_tokens == 7 and sched3.tokens_seen == 1200


def test_piecewise_value_by_tokens():
    weights = {10_000: 0.1, 5_000: 0.2}
    assert [value_after_tokens(0.3, weights, t) for t in (0, 4_999, 5_000, 9_999, 10_000, 10**13)] == [
        0.3, 0.3, 0.2, 0.2, 0.1, 0.1,
    ]  # fmt: skip
    assert value_after_tokens(0.3, None, 10**13) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"decay_tokens": 0}, "decay_tokens"),
        ({"final_lr_ratio": 1.5}, "final_lr_ratio"),
        ({"tail_start_tokens": 50_000}, "tail_lr_ratio"),
        ({"decay_start_tokens": 100, "tail_start_tokens": 50, "tail_lr_ratio": 0.01}, "tail_start_tokens"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=field):
        WarmupStableCosineLR(opt, **kwargs)
