"""The report's LR schedule: warm-up, constant, cosine decay, optional tail; state survives a resume."""

import math

import pytest
import torch

from lightning_modules.schedule import WarmupStableCosineLR


def _lrs(n_steps: int, **kwargs) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.2e-4)
    sched = WarmupStableCosineLR(opt, **kwargs)
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_phases_match_the_report_shape():
    lrs = _lrs(
        40, warmup_steps=4, decay_start=10, decay_steps=20, final_lr_ratio=0.1, tail_start=35, tail_lr_ratio=1 / 30
    )
    peak = 2.2e-4
    assert lrs[:4] == pytest.approx([peak * k / 4 for k in (1, 2, 3, 4)])  # linear warm-up reaches the peak
    assert lrs[4:10] == pytest.approx([peak] * 6)  # constant
    # cosine from the peak to 10% over 20 steps (the report: 2.2e-4 -> 2.2e-5)
    for step in range(10, 30):
        expected = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 20)))
        assert lrs[step] == pytest.approx(expected)
    assert lrs[30:35] == pytest.approx([2.2e-5] * 5)  # constant after the decay
    assert lrs[35:] == pytest.approx([peak / 30] * 5)  # optional final constant (report: 7.3e-6)


def test_resume_continues_the_schedule():
    full = _lrs(30, warmup_steps=3, decay_start=5, decay_steps=20)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.2e-4)
    sched = WarmupStableCosineLR(opt, warmup_steps=3, decay_start=5, decay_steps=20)
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    torch.save(state, "/dev/null")  # plain data only: weights_only checkpoints can hold it
    # Lightning's order: build both, restore the optimizer, then the scheduler.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.2e-4)
    sched2 = WarmupStableCosineLR(opt2, warmup_steps=3, decay_start=5, decay_steps=20)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(18):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(full[12:])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup_steps": 10, "decay_start": 5}, "decay_start"),
        ({"final_lr_ratio": 1.5}, "final_lr_ratio"),
        ({"tail_start": 50_000}, "tail_lr_ratio"),
        ({"warmup_steps": 10, "decay_start": 100, "tail_start": 50, "tail_lr_ratio": 0.01}, "tail_start"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=field):
        WarmupStableCosineLR(opt, **kwargs)
