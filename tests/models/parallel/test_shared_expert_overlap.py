"""Shared experts computed while EP's dispatch all-to-all is in flight, on 2 gloo ranks (EP 2, no pipelining).

With the overlap (the default) each MoE layer's forward issues the dispatch exchange, runs the shared experts, then
waits; without it the shared experts run after the routed ones. Both must give the same loss and gradients (the
same ops in another order: the loss bitwise, gradients to fp32 rounding), with and without the backward group, and
under full activation checkpointing; the recorded order of the work shows where the shared experts ran.
(Against one process, EP with the overlap is tested by test_parallel_parity.py.)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from models import DeepSeekV3
from models.moe import MoE
from models.parallel import expert_parallel
from models.parallel.compile import apply_activation_checkpointing
from models.parallel.mesh import ParallelDims, new_ep_backward_group, submesh
from models.parallel.parallelize import init_weights
from tests.models.parallel.test_pipeline import _config

SEQ, BATCH = 16, 4


def _build(state: dict, mesh, overlap: bool, backward_group: bool, ac: str) -> DeepSeekV3:  # noqa: ANN001
    with torch.device("meta"):
        model = DeepSeekV3(_config())
    group = new_ep_backward_group(mesh) if backward_group else None
    expert_parallel.apply_expert_parallel(model, submesh(mesh, "ep"), group, overlap_shared_experts=overlap)
    apply_activation_checkpointing(model, ac)
    model.to_empty(device="cpu")
    init_weights(model)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    return model


def _record_order(model: DeepSeekV3, events: list[str]) -> None:
    """Forward events of every MoE layer: the dispatch and combine exchanges, the shared and the routed experts."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.shared_experts.register_forward_pre_hook(lambda *_: events.append("shared"))
        moe.experts.register_forward_pre_hook(lambda *_: events.append("experts"))  # after EP's dispatch hook


def _run(state: dict, batch: torch.Tensor, mesh, overlap: bool, backward_group: bool, ac: str):  # noqa: ANN001
    model = _build(state, mesh, overlap, backward_group, ac)
    events: list[str] = []
    _record_order(model, events)
    exchange = expert_parallel.ExpertParallel._exchange

    def recording(self, *args):  # noqa: ANN001, ANN202
        out = exchange(self, *args)
        if torch._C._current_graph_task_id() == -1:  # not AC's replay inside the backward
            # Issued, not waited for: the wait comes at the first use of the rows, after what runs next.
            pending = isinstance(out, AsyncCollectiveTensor) and not out.completed
            events.append("exchange" if pending else "exchange (waited)")
        return out

    expert_parallel.ExpertParallel._exchange = recording
    try:
        out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        out.loss.backward()
    finally:
        expert_parallel.ExpertParallel._exchange = exchange
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    return out.loss.detach(), grads, events


def _worker(rank: int, rdzv: str, state: dict, batch: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    try:
        mesh = ParallelDims(dp_shard=2, ep=2).resolve(2).build_mesh("cpu")
        rows = batch.chunk(2)[rank]
        n_moe = sum(isinstance(m, MoE) for m in DeepSeekV3(_config()).modules())
        for backward_group, ac in ((False, "none"), (True, "none"), (True, "full")):
            loss, grads, events = _run(state, rows, mesh, True, backward_group, ac)
            ref_loss, ref_grads, ref_events = _run(state, rows, mesh, False, backward_group, ac)
            where = f"backward group {backward_group}, AC {ac}, rank {rank}"
            assert torch.equal(loss, ref_loss), where
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=f"{name}, {where}")
            # Per MoE layer's forward (AC's recompute adds its replays after them).
            assert events[: 4 * n_moe] == ["exchange", "shared", "experts", "exchange"] * n_moe, where
            assert ref_events[: 4 * n_moe] == ["exchange", "experts", "exchange", "shared"] * n_moe, where
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_shared_experts_overlapping_the_dispatch_give_the_same_loss_and_grads(tmp_path, one_thread):
    config = _config()
    torch.manual_seed(0)
    state = DeepSeekV3(config).state_dict()
    batch = torch.randint(config.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker, args=(str(tmp_path / "rdzv"), state, batch), nprocs=2, start_method="fork")
