"""parallelize: the one-rank path (no FSDP, bf16 parameters but fp32 gates), FSDP2's mixed precision on 2 gloo
ranks (bf16 compute, fp32 shards, gradients, gates and MoE buffers), bad inputs, and the clipping function."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from models import DeepSeekV3
from models.moe import MoE
from models.parallel.clip import clip_grad_norm_
from models.parallel.mesh import ParallelDims
from models.parallel.parallelize import init_weights, parallelize


def _build(config, mesh, **kwargs) -> DeepSeekV3:  # noqa: ANN001
    with torch.device("meta"):
        model = DeepSeekV3(config)
    parallelize(model, mesh, **kwargs)
    model.to_empty(device="cpu")
    init_weights(model)
    return model


def _moe_buffers_are_fp32(model: DeepSeekV3) -> None:
    for moe in model.moe_layers():
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
        assert moe.tokens_per_expert.dtype == torch.float32
    assert model.freqs_cis.dtype == torch.complex64


def test_one_rank_casts_for_compute_and_keeps_gates_fp32(tmp_path, tiny_config):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    mesh = ParallelDims().resolve(1).build_mesh("cpu")
    model = _build(tiny_config, mesh, param_dtype=torch.bfloat16)
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # nothing to shard: no FSDP
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".gate." in name else torch.bfloat16), name
    _moe_buffers_are_fp32(model)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 17))
    model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())


def test_bad_inputs(tmp_path, tiny_config):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    mesh = ParallelDims().resolve(1).build_mesh("cpu")
    with pytest.raises(ValueError, match="meta device"):
        parallelize(DeepSeekV3(tiny_config), mesh, param_dtype=torch.float32)
    with torch.device("meta"):
        model = DeepSeekV3(tiny_config)
    with pytest.raises(ValueError, match="ParallelDims.build_mesh"):
        parallelize(model, mesh["ep"], param_dtype=torch.float32)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        parallelize(model, mesh, param_dtype=torch.float32, activation_checkpointing="some")


def _mixed_precision_worker(rank: int, rdzv: str, config) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=2)
    try:
        model = _build(config, ParallelDims(ep=2).resolve(2).build_mesh("cpu"), param_dtype=torch.bfloat16)
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())  # fp32 shards
        _moe_buffers_are_fp32(model)
        seen = {}

        def record(name):  # noqa: ANN001, ANN202
            def hook(module, args):  # noqa: ANN001, ANN202
                weight = module.w1 if name == "experts" else module.weight
                seen[name] = (weight.dtype, args[0].dtype)

            return hook

        moe = next(m for m in model.modules() if isinstance(m, MoE))
        moe.gate.register_forward_pre_hook(record("gate"))
        moe.experts.register_forward_pre_hook(record("experts"))
        model.layers[0].attn.wkv_a.register_forward_pre_hook(record("attention"))
        tokens = torch.randint(0, config.vocab_size, (2, 17))
        out = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
        out.loss.backward()
        # Compute in bf16 (the residual stream too), the router in fp32 on the same bf16 activations.
        assert seen == {
            "attention": (torch.bfloat16, torch.bfloat16),
            "gate": (torch.float32, torch.bfloat16),
            "experts": (torch.bfloat16, torch.bfloat16),
        }
        assert torch.isfinite(out.loss)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # reduced in fp32 into fp32 shards
        _moe_buffers_are_fp32(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_mixed_precision_bf16_compute_fp32_shards_gates_and_buffers(tmp_path, tiny_config, one_thread):
    args = (f"file://{tmp_path}/rdzv", tiny_config)
    mp.start_processes(_mixed_precision_worker, args=args, nprocs=2, join=True, start_method="fork")


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_grad_norm_matches_torch_on_plain_tensors(norm_type):
    grads = [torch.randn(5, 3) * 3, torch.randn(7) * 3]
    params, ref = [], []
    for g in grads:
        params.append(torch.nn.Parameter(torch.zeros_like(g)))
        ref.append(torch.nn.Parameter(torch.zeros_like(g)))
        params[-1].grad, ref[-1].grad = g.clone(), g.clone()
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    torch.testing.assert_close(clip_grad_norm_(params, 1.0, norm_type), expected)
    for p, r in zip(params, ref, strict=False):
        torch.testing.assert_close(p.grad, r.grad)
    assert clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0


def _compiled_worker(rank: int, rdzv: str, config, activation_checkpointing: str) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=2)
    try:
        tokens = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
        results = []
        for compile in (False, True):
            mesh = ParallelDims(ep=2).resolve(2).build_mesh("cpu")
            torch.manual_seed(0)
            model = _build(
                config,
                mesh,
                param_dtype=torch.bfloat16,
                compile=compile,
                activation_checkpointing=activation_checkpointing,
            )
            out = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
            out.loss.backward()
            results.append((out.loss.detach(), model.layers[1].ffn.experts.w1.grad.full_tensor()))
        torch.testing.assert_close(results[1], results[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ac", ["none", "selective"])
def test_compiled_blocks_with_ep_match_eager(tmp_path, tiny_config, one_thread, monkeypatch, ac):
    # FSDP2 x EP with per-block torch.compile (aot_eager: the CPU has no grouped-GEMM Inductor kernel) gives the
    # eager loss and expert gradients: the EP hooks, their host sync and DTensor to_local trace through.
    from models.parallel import compile as compile_module
    from models.parallel import parallelize as parallelize_module

    plain = compile_module.compile_blocks
    monkeypatch.setattr(parallelize_module, "compile_blocks", lambda model: plain(model, backend="aot_eager"))
    args = (f"file://{tmp_path}/rdzv", tiny_config, ac)
    mp.start_processes(_compiled_worker, args=args, nprocs=2, join=True, start_method="fork")


def _clip_group_worker(rank: int, rdzv: str, grads: list[torch.Tensor], norm_type: float) -> None:
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads[rank::2]]  # each rank holds other params
        for p, g in zip(params, grads[rank::2], strict=True):
            p.grad = g.clone()
        norm = clip_grad_norm_(params, 1.0, norm_type, group=dist.group.WORLD)
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
        torch.testing.assert_close(norm, expected)
        for p, r in zip(params, ref[rank::2], strict=True):
            torch.testing.assert_close(p.grad, r.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_grad_norm_over_a_group_of_ranks_holding_other_parameters(tmp_path, norm_type, one_thread):
    # Pipeline stages: the norm over both ranks' parameters is the one-process norm, and both clip by it.
    grads = [torch.randn(4, 3) * 2, torch.randn(5), torch.randn(2, 2) * 3]  # rank 0: 0 and 2; rank 1: 1
    args = (f"file://{tmp_path}/rdzv", grads, norm_type)
    mp.start_processes(_clip_group_worker, args=args, nprocs=2, join=True, start_method="fork")
