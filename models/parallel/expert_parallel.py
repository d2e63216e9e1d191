"""Expert parallelism: the routed experts sharded along E over the ``ep`` mesh dim, tokens moved by all-to-all.

Shapes: P EP ranks, E routed experts, El = E / P local experts, D model dim, N token copies this rank routes
(rows sorted by expert, as ``MoE.routed`` hands them to the experts), M token copies this rank's experts receive.

``MoE.routed`` sorts its (token, expert) copies by expert and calls ``GroupedExperts(x_ND, offsets_E)``; nothing in
the model knows about ranks. ``ExpertParallel`` wraps that call from outside, as torchtitan's ``ExpertParallel``
does: the experts' weights become DTensors ``Shard(0)`` over ``ep`` (rank r holds experts r*El .. (r+1)*El - 1),
a forward pre-hook dispatches the sorted rows to the ranks holding their experts and a forward hook brings the
outputs back in the order they left, so ``MoE.routed`` un-permutes and weights them as on one device. Dropless:
the all-to-all splits are the actual per-rank counts (uneven), and autograd runs through both all-to-alls.

Schedules that run a forward and a backward at once (DualPipe's overlapped chunks, in two threads) must not issue
collectives on one process group in racing orders: with ``backward_group`` the exchanges issued inside a backward
pass (the all-to-alls' own backward, activation checkpointing's replay of the forward) go to a second group over the
same ranks, so each group sees one order, the same on every EP peer.

Shared-expert overlap: the dispatch all-to-all of the routed tokens is issued asynchronously, the layer's shared
experts are computed (``models.moe.run_shared_experts``) while it is in flight, and only then is it waited for (at
the first use of its output). Same math, another order of the work; ``overlap_shared_experts=False`` turns it off.

The one host synchronisation EP adds: the split sizes of the uneven all-to-all must be Python ints, so each MoE
layer's forward copies its (2, P) send/receive row counts to the host once (in the dispatch, after the all-to-all of
the per-expert counts). Activation checkpointing recomputes the forward, and with it this copy, in the backward.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from models.moe import GroupedExperts, is_recomputing, permute_rows, run_shared_experts


class ExpertParallel:
    """Shard one ``GroupedExperts`` along E over a 1-D ``ep`` mesh and route its tokens by all-to-all.

    Holds the split sizes and the local permutation between a forward's dispatch and its combine (per thread).

    Args:
        backward_group: A second process group over the same ranks as the ``ep`` mesh, for the exchanges issued
            inside backward passes; None = everything on the ``ep`` mesh's group.
        overlap_shared_experts: Compute the MoE layer's shared experts while the dispatch all-to-all is in flight.
    """

    def __init__(self, backward_group: dist.ProcessGroup | None = None, overlap_shared_experts: bool = True) -> None:
        self.backward_group = backward_group
        self.overlap_shared_experts = overlap_shared_experts
        self._local = threading.local()

    def apply(self, experts: GroupedExperts, ep_mesh: DeviceMesh) -> GroupedExperts:
        """Distribute ``experts`` (on any device, meta included) and install the dispatch/combine hooks."""
        if ep_mesh.ndim != 1:
            raise ValueError(f"ExpertParallel needs the 1-D 'ep' mesh, got {ep_mesh}")
        distribute_module(experts, ep_mesh, _shard_experts, self._dispatch, self._combine)
        experts.expert_parallel = self  # what wraps it (read by the pipeline: which groups the exchanges use)
        return experts

    def _group(self, mesh: DeviceMesh) -> dist.ProcessGroup:
        # Forward-direction exchanges inside a backward pass are activation checkpointing's replay of the forward.
        return self.backward_group if self.backward_group is not None and is_recomputing() else mesh.get_group()

    def _exchange(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], mesh: DeviceMesh) -> torch.Tensor:
        """The uneven all-to-all of ``x``'s rows, issued: the result is waited for at its first use."""
        if self.backward_group is None:
            return all_to_all_single_autograd(x, out_splits, in_splits, mesh.get_group())
        return _AllToAll.apply(x, out_splits, in_splits, self._group(mesh), self.backward_group)

    def _dispatch(
        self, module: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], mesh: DeviceMesh
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_ND rows sorted by global expert, offsets_E) -> (x_MD rows sorted by local expert, offsets_El)."""
        x_ND, offsets_E = inputs
        n_ranks = mesh.size()
        counts_E = offsets_E.diff(prepend=offsets_E.new_zeros(1))
        with torch.no_grad():
            # Rank r gets every rank's counts for its own El experts: row p = what rank p sends to each of them.
            counts_PEl = all_to_all_single(counts_E, None, None, self._group(mesh)).view(n_ranks, -1)
            splits = torch.stack((counts_E.view(n_ranks, -1).sum(dim=1), counts_PEl.sum(dim=1)))
            send, recv = splits.cpu().tolist()  # the host sync: all-to-all split sizes must be ints
        x_ND = x_ND[: sum(send)]  # rows past the last group: padding (of FP8 experts' aligned groups), not sent
        x_MD = self._exchange(x_ND, recv, send, mesh)  # rows by (source rank, local expert); in flight
        if self.overlap_shared_experts:
            run_shared_experts()  # their compute overlaps the exchange, waited for below
        # Regroup the rows by local expert (stable: each source's rows keep their order) for the grouped GEMMs.
        n_local = counts_PEl.shape[1]
        expert_of_row = torch.arange(n_local, device=x_ND.device).repeat(n_ranks)
        expert_of_row = expert_of_row.repeat_interleave(counts_PEl.flatten(), output_size=sum(recv))
        order_M = expert_of_row.argsort(stable=True)
        inverse_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(order_M.numel(), device=x_ND.device))
        self._local.state = (send, recv, order_M, inverse_M)
        offsets_El = counts_PEl.sum(dim=0).cumsum(0, dtype=torch.int32)
        return permute_rows(x_MD, order_M, inverse_M), offsets_El

    def _combine(self, module: nn.Module, out_MD: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        """Expert outputs (rows by local expert) -> back to the ranks and row order they came from."""
        send, recv, order_M, inverse_M = self._local.state
        self._local.state = None
        out_MD = permute_rows(out_MD, inverse_M, order_M)  # rows by (source rank, local expert)
        return self._exchange(out_MD, send, recv, mesh)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all on ``group``, whose backward (the reverse exchange) runs on ``backward_group``. The forward
    returns the collective's pending result (waited for at its first use), as ``all_to_all_single_autograd`` does."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, backward_group):  # noqa: ANN001, ANN205
        ctx.splits, ctx.backward_group = (in_splits, out_splits), backward_group
        return all_to_all_single(x.contiguous(), out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad = wait_tensor(all_to_all_single(grad.contiguous(), *ctx.splits, ctx.backward_group))
        return grad, None, None, None, None


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    # src_data_rank=None: each rank keeps its own chunk, no broadcast (the model may still be on meta).
    for param_name, param in list(module.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
        module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def apply_expert_parallel(
    model: nn.Module,
    ep_mesh: DeviceMesh,
    backward_group: dist.ProcessGroup | None = None,
    overlap_shared_experts: bool = True,
) -> nn.Module:
    """Shard the routed experts of every MoE layer (main and MTP blocks) of ``model`` over ``ep_mesh``.

    ``backward_group``, ``overlap_shared_experts``: see ``ExpertParallel``.
    """
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            n_experts = module.w1.shape[0]
            if n_experts % ep_mesh.size():
                raise ValueError(f"ep ({ep_mesh.size()}) must divide n_routed_experts ({n_experts})")
            ExpertParallel(backward_group, overlap_shared_experts).apply(module, ep_mesh)
    return model
