"""``parallelize``: expert parallelism, activation checkpointing, compile and FSDP2 applied to a meta DeepSeekV3.

The order is torchtitan's: EP (shard the experts, install dispatch/combine) -> AC -> per-block compile -> FSDP2
(``fully_shard`` per block, then the root). Every transform keeps parameter names, so state dicts and checkpoints
do not depend on the layout. Nothing is allocated: the caller then runs ``model.to_empty(device=...)`` and
``init_weights(model)`` (this module's, which is ``model.init_weights`` where DTensor has a sharded RNG).

Precision (FSDP2's ``MixedPrecisionPolicy``): the sharded parameters, the gradients after reduction and the
optimizer state are fp32; each block's unsharded parameters are cast to ``param_dtype`` for compute and gradients
are reduced in ``reduce_dtype``. The gates get their own FSDP unit with an fp32 policy (routing stays fp32); FSDP2
never touches buffers, so the expert biases and load counters stay fp32. With no data parallelism at all (one rank)
there is nothing to shard: no ``fully_shard``, the parameters (but the gates') are cast to ``param_dtype`` and an
fp32-master optimizer (``MasterWeightAdamW``) keeps the fp32 truth, the fastest one-GPU path.

Pipeline stages (``pp > 1``) are not FSDP-sharded either: their data-parallel ranks hold them whole (the experts EP
-sharded), the report's PP x EP x DP layout, and ``models.parallel.pipeline`` averages their gradients after each
step. FSDP2's per-block all-gathers and reduce-scatters would otherwise run inside DualPipe's two concurrent chunks,
racing on one process group (docs/pipeline.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from models.model import DeepSeekV3
from models.moe import Gate, MoE
from models.parallel.compile import apply_activation_checkpointing, blocks, compile_blocks
from models.parallel.expert_parallel import apply_expert_parallel
from models.parallel.mesh import ParallelDims, new_ep_backward_group, submesh


def parallelize(
    model: DeepSeekV3,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: str = "none",
    compile: bool = False,
    reshard_after_forward: bool = True,
    ranks_per_node: int | None = None,
    ep_backward_group: bool = False,
    overlap_shared_experts: bool = True,
) -> DeepSeekV3:
    """Apply EP -> AC -> compile -> FSDP2 to ``model`` (built on the meta device) in place.

    Args:
        model: A DeepSeekV3 on the meta device.
        mesh: The ``("pp", "dp_replicate", "efsdp", "ep")`` mesh of ``ParallelDims.build_mesh``.
        param_dtype: Dtype of the parameters in forward/backward (bf16 for mixed precision, fp32 for none).
        reduce_dtype: Dtype of the gradient reduction across data-parallel ranks.
        activation_checkpointing: ``none``, ``selective`` or ``full`` (``models.parallel.compile``).
        compile: ``torch.compile`` each block.
        reshard_after_forward: Free each block's unsharded parameters after its forward (ZeRO-3) rather than
            keeping them for the backward (ZeRO-2: less communication, more memory).
        ranks_per_node: Ranks (GPUs) per node, needed for ``routing_groups: nodes``.
        ep_backward_group: Issue EP's all-to-alls of backward passes on a second process group over the same
            ranks, for schedules that overlap a forward and a backward (``pipeline.overlap``).
        overlap_shared_experts: Under EP, compute each MoE layer's shared experts while its dispatch all-to-all is
            in flight (``models.parallel.expert_parallel``); False runs them after the routed experts.

    Returns:
        The same model.
    """
    dims = ParallelDims.from_mesh(mesh)
    dims.check_model(model.config, ranks_per_node)
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("parallelize expects the model built on the meta device (with torch.device('meta'): ...)")
    if dims.dp > 1 and dims.pp == 1 and model.config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings is not supported under FSDP2 (parallelize); set it to false")
    if dims.ep > 1:
        backward_group = new_ep_backward_group(mesh) if ep_backward_group else None
        apply_expert_parallel(model, submesh(mesh, "ep"), backward_group, overlap_shared_experts)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_blocks(model)
    if dims.dp > 1 and dims.pp == 1:
        _apply_fsdp(model, mesh, dims, param_dtype, reduce_dtype, reshard_after_forward)
    else:  # one rank, or pipeline stages: their dp ranks replicate them (models.parallel.pipeline)
        _cast_for_compute(model, param_dtype)
    return model


def _apply_fsdp(
    model: DeepSeekV3,
    mesh: DeviceMesh,
    dims: ParallelDims,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
) -> None:
    hsdp = dims.dp_replicate > 1
    dense_mesh = submesh(mesh, "dp_replicate", "dp_shard") if hsdp else submesh(mesh, "dp_shard")
    expert_mesh = submesh(mesh, "dp_replicate", "efsdp") if hsdp else submesh(mesh, "efsdp")
    # Inputs are not cast: the residual stream is already in param_dtype (the embedding's), the RoPE tables stay
    # fp32, as on the one-device path.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks(model):
        if isinstance(block.ffn, MoE):
            fully_shard(block.ffn.gate, mesh=dense_mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
            if dims.ep > 1:
                _shard_experts(block.ffn.experts, expert_mesh, dims, policy, reshard_after_forward)
        fully_shard(block, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if dims.ep > 1:
        _prefetch_forward(blocks(model))
    # The root holds the embedding, final norm, head and the MTP modules' projections and norms (the MTP norms run
    # outside their module's forward). It is used last in forward and first in backward: keep it gathered.
    fully_shard(model, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=False)


def _shard_experts(
    experts: nn.Module, mesh: DeviceMesh, dims: ParallelDims, policy: MixedPrecisionPolicy, reshard_after_forward: bool
) -> None:
    """FSDP2 over (dp_replicate, efsdp) for experts that EP already sharded along E over ep."""
    n_local = experts.w1.shape[0] // dims.ep
    # Fewer local experts than efsdp ranks: shard the hidden dim instead, or some ranks would hold nothing.
    placement = (lambda param: Shard(1)) if dims.efsdp > n_local else None
    fully_shard(
        experts,
        mesh=mesh,
        mp_policy=policy,
        reshard_after_forward=reshard_after_forward,
        shard_placement_fn=placement,
    )
    # Each EP rank's expert gradients sum the tokens of its whole EP group: divide them by all data-parallel ranks,
    # not only by the (dp_replicate, efsdp) ones this unit reduces over.
    experts.set_gradient_divide_factor(float(dims.dp))
    if mesh.device_type == "cpu" and dims.efsdp > 1:
        # gloo has no PREMUL_SUM: reduce by sum, then divide. (Not with one efsdp rank: FSDP2 then divides while
        # copying the unreduced gradient and would divide a second time.)
        experts.set_force_sum_reduction_for_comms(True)


def _prefetch_forward(modules: list[nn.Module]) -> None:
    """Issue each block's all-gather from the previous block's pre-forward.

    FSDP2 prefetches implicitly by running ahead on the CPU; EP's host sync in every MoE layer stops the CPU there,
    so the next block's all-gather would only start after it. Its gate and experts are not prefetched: they unshard
    inside the block's forward, which activation checkpointing replays, and the replay must see the same ops (the
    CPU is ahead of the GPU again by then).
    """
    for block, next_block in zip(modules, modules[1:], strict=False):
        block.set_modules_to_forward_prefetch([next_block])


def _cast_for_compute(model: nn.Module, dtype: torch.dtype) -> None:
    """One rank, no FSDP: parameters in ``dtype`` except the gates' (fp32 routing); buffers untouched."""
    gate_params = {p for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    for p in model.parameters():
        if p not in gate_params and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@torch.no_grad()
def init_weights(model: DeepSeekV3, buffer_device: torch.device | None = None) -> None:
    """``model.init_weights`` for a parallelized model after ``to_empty``: a seeded init valid on every layout.

    On CUDA meshes DTensor's RNG gives each shard its own part of one random stream (and replicas the same one),
    so ``model.init_weights`` runs on the local shards. DTensor has no such RNG on the CPU: every shard would draw
    the same numbers. There (gloo runs, small models) the full model is initialised once on each rank, with the
    same seed, and each rank keeps its shards: the result equals the one-process init of the same seed.
    """
    if all(p.device_mesh.device_type != "cpu" for p in model.parameters() if isinstance(p, DTensor)):
        model.init_weights(buffer_device=buffer_device)
        return
    with torch.device("meta"):
        full = DeepSeekV3(model.config)
    full.to_empty(device="cpu")
    full.init_weights()
    # A pipeline rank's model holds some of the layers (names unchanged): keep the entries it has.
    state = {k: v for k, v in full.state_dict().items() if k in model.state_dict()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    buffers = dict(full.named_buffers())
    for name, buffer in model.named_buffers():  # the non-persistent ones: RoPE table, load counters
        buffer.copy_(buffers[name])
