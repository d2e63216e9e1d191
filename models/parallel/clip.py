"""Gradient-norm clipping over parameters that live on different device meshes.

Under FSDP2 x EP the dense parameters are DTensors on the ``dp_shard`` mesh and the experts on
``(efsdp, ep)``: ``torch.nn.utils.clip_grad_norm_`` stacks the per-parameter norms into one tensor, which DTensor
refuses across meshes. Here each mesh's norm is reduced to a plain tensor first (``full_tensor`` sums the shards'
contributions), then the norms are combined: the total equals the one-process norm of the same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    foreach: bool | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` (plain tensors and DTensors on any meshes) to a total norm of ``max_norm``.

    Args:
        parameters: Parameters whose ``.grad`` is clipped in place (those without a gradient are skipped).
        max_norm: Largest total norm; ``math.inf`` only measures.
        norm_type: The p of the p-norm (``math.inf`` for the max norm).
        foreach: Use the foreach kernels (None: where torch supports them).
        group: Ranks that hold *other* parameters (pipeline stages): their norms are combined with this one.

    Returns:
        The total norm before clipping, a plain (replicated) tensor, identical on every rank.
    """
    parameters = list(parameters)
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type, foreach=foreach)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if norms:
        total = torch.nn.utils.get_total_norm(norms, norm_type)
    else:  # no gradient here: norm 0, and still take part in the group's reduction
        total = torch.zeros((), device=parameters[0].device if parameters else None)
    if group is not None and dist.get_world_size(group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        else:
            total = total.float() ** norm_type
            dist.all_reduce(total, group=group)
            total = total ** (1.0 / norm_type)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total
