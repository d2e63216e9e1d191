"""NonFiniteGuard: a non-finite step is skipped on the device (bitwise), the run stops naming the step, and no
checkpoint is written from a non-finite state; also under FSDP2 (DTensor gradients) on two gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.cli import main
from lightning_modules.nonfinite import NonFiniteError, NonFiniteGuard


def _train(guard: NonFiniteGuard, model: torch.nn.Module, optimizer, bad_steps: set[int], steps: int = 4) -> list:
    """Steps with a loss scaled by NaN at ``bad_steps``; returns (params, optimizer state) after each step."""
    history = []
    for step in range(1, steps + 1):
        loss = model(torch.ones(2, 3)).pow(2).mean() * (math.nan if step in bad_steps else 1.0)
        loss.backward()
        guard.observe_loss(loss)
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        guard.before_optimizer_step(optimizer, norm, step)
        optimizer.step()
        optimizer.zero_grad()
        state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
        history.append(([p.detach().clone() for p in model.parameters()], state))
    return history


def _same(a, b) -> bool:
    (params_a, state_a), (params_b, state_b) = a, b
    tensors = lambda s: [v for d in s for v in d.values()]  # noqa: E731
    return all(torch.equal(x, y) for x, y in zip(params_a + tensors(state_a), params_b + tensors(state_b), strict=True))


def test_fused_adamw_skips_the_bad_step_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    guard = NonFiniteGuard(max_skips=1)
    history = _train(guard, model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), bad_steps={2})
    assert _same(history[0], history[1])  # weights, moments and step count as after step 1
    assert not _same(history[1], history[2])  # and training goes on
    assert all(torch.isfinite(p).all() for p in history[-1][0])
    guard.check()  # 1 bad step, 1 allowed
    assert guard.bad_steps.item() == 1


def test_over_budget_stops_naming_the_steps():
    model = torch.nn.Linear(3, 2)
    guard = NonFiniteGuard(max_skips=1)
    _train(guard, model, torch.optim.AdamW(model.parameters(), fused=True), bad_steps={2, 4})
    with pytest.raises(NonFiniteError, match=r"not finite at 2 steps from step 2 to 4 \(model.max_nonfinite_skips=1\)"):
        guard.check()


def test_skipping_needs_an_optimizer_that_can_skip_on_the_device():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="max_nonfinite_skips=2 needs an optimizer .* AdamW cannot: .*fused: true"):
        NonFiniteGuard(max_skips=2).check_optimizer(torch.optim.AdamW(model.parameters()))
    NonFiniteGuard(max_skips=0).check_optimizer(torch.optim.AdamW(model.parameters()))  # stopping works with any
    with pytest.raises(ValueError, match="max_nonfinite_skips=-1 must be >= 0"):
        NonFiniteGuard(-1)


def test_a_diverging_fit_exits_1_naming_the_step_and_keeps_the_good_checkpoint(small, tmp_path, capsys):
    """The issue's repro (lr 1e4): NaN from step 4 on. The run stops there, last.ckpt keeps step 2 (finite)."""
    args = small(max_steps=20, log_every_n_steps=1, val_check_interval=1000)
    args += ["--trainer.callbacks.init_args.last_every_n_train_steps=2", "--model.optimizer.init_args.lr=1e4"]
    assert main(["fit", *args]) == 1
    err = capsys.readouterr().err
    assert "dsv3 fit: error: training diverged: the loss or gradient norm was not finite at step 4 " in err
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def _fsdp2_rank(rank: int, rdzv: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = fully_shard(torch.nn.Linear(3, 2), mesh=init_device_mesh("cpu", (2,)))
    guard = NonFiniteGuard(max_skips=1)
    history = _train(guard, model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), bad_steps={2})
    local = [
        ([p.to_local() for p in params], [{k: getattr(v, "_local_tensor", v) for k, v in s.items()} for s in st])
        for params, st in history
    ]
    guard.check()
    torch.save({"skipped": _same(local[0], local[1]), "moved": not _same(local[1], local[2])}, f"{out}{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_dtensor_gradients_skip_on_every_rank(tmp_path):
    mp.start_processes(_fsdp2_rank, (str(tmp_path / "rdzv"), str(tmp_path / "rank")), nprocs=2, start_method="fork")
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {"skipped": True, "moved": True}
