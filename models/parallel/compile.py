"""Per-block ``torch.compile`` and activation checkpointing, applied to a built DeepSeekV3 from outside.

Both act on the transformer blocks (main layers and the MTP modules' blocks) in place, so parameter names and
state-dict keys do not change: no ``_orig_mod`` or ``_checkpoint_wrapped_module`` prefixes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

# Ops whose outputs selective checkpointing keeps: the matmuls and attention (costly to recompute), and expert
# parallelism's all-to-alls (no second exchange in the backward); everything else (norms, RoPE, SwiGLU, routing,
# permutations) is recomputed in the backward pass.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops._c10d_functional.all_to_all_single.default,
}

# FSDP2 annotates its hooks with profiler ranges, and the hooks of the units nested in a block (the gate, the
# expert-parallel experts) open more of them when the forward is replayed in the backward than in the forward.
# They compute nothing: selective checkpointing must not count them when it matches the replay to the forward.
_PROFILER_OPS = {
    torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
}


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a DeepSeekV3: ``model.layers`` then each MTP module's ``block``.

    A pipeline rank's pruned model keeps its layers in a ``ModuleDict`` keyed by layer index (``parallel.pipeline``).
    """
    layers = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    return list(layers) + [module.block for module in model.mtp]


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ANN001
    if op in _SAVE_OPS or _device_to_host(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _device_to_host(op, args, kwargs) -> bool:  # noqa: ANN001
    # Expert parallelism copies its all-to-all split sizes to the host: keeping the copy keeps the replay sync-free.
    return (
        op is torch.ops.aten._to_copy.default
        and args[0].device.type != "cpu"
        and torch.device(kwargs.get("device", args[0].device)).type == "cpu"
    )


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Args:
        model: A DeepSeekV3 (before ``compile_blocks``).
        mode: ``"none"``; ``"full"`` keeps only each block's input; ``"selective"`` also keeps the outputs of
            matmuls, grouped GEMMs and attention and recomputes the cheap elementwise ops.

    Returns:
        The same model.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return model
    if mode == "selective":
        torch.utils.checkpoint.SAC_IGNORED_OPS.update(_PROFILER_OPS)
    for block in blocks(model):
        block.forward = _checkpointed(block.forward, selective=mode == "selective")
    return model


def _checkpointed(forward: Callable, selective: bool) -> Callable:
    # A plain function, not functools.partial(checkpoint, ...): torch.compile starts tracing at the first frame
    # outside torch's own files, and must see this one to capture the checkpoint region.
    kwargs = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _policy)} if selective else {}

    @functools.wraps(forward)
    def forward_with_ac(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        return checkpoint(forward, *args, use_reentrant=False, **kwargs, **kw)

    return forward_with_ac


def compile_blocks(model: nn.Module, fullgraph: bool = False, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each transformer block in place (compiled once and reused: the blocks share code).

    Head, loss and embedding stay eager: the chunked cross-entropy is already fused by hand.

    Args:
        model: A DeepSeekV3 (after ``apply_activation_checkpointing`` if used).
        fullgraph: Fail on graph breaks instead of splitting the block.
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``backend``, ...).

    Returns:
        The same model.
    """
    for block in blocks(model):
        block.compile(fullgraph=fullgraph, **compile_kwargs)
    return model
