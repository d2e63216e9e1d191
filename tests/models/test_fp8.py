"""FP8 training: the conversion and its exclusions, the quantisation reference, the FP8 expert path (padding,
forward and backward against a per-expert float64 reference), CPU training with every recipe, and the Triton
kernels (in Triton's CPU interpreter when it is installed; natively in the gpu tests) against the reference."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import DeepSeekV3, DeepSeekV3Config
from models.attention import RMSNorm
from models.moe import Gate, GroupedExperts, MoE, padded_rows
from models.parallel.fp8 import BlockwiseLinear, FP8Config, check_device, convert_to_fp8
from models.parallel.fp8_experts import Float8GroupedExperts
from models.parallel.fp8_grouped_mm import grouped_mm_reference, grouped_mm_wgrad_reference
from models.parallel.fp8_quant import (
    BLOCK,
    E4M3,
    E5M2,
    GRANULARITIES,
    dequantize,
    fp8_quantize_dual,
    fp8_quantize_swiglu_dual,
    fp8_quantize_swiglu_grad_dual,
    fp8_quantize_weight_dual,
    quantize,
    quantize_act,
    quantize_act_dual,
    quantize_act_t,
    quantize_swiglu_dual,
    quantize_swiglu_grad_dual,
    quantize_weight,
    quantize_weight_dual,
    quantize_weight_t,
    swiglu,
    swiglu_backward,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fp8_config() -> DeepSeekV3Config:
    """Widths that are multiples of 128, so every recipe converts every linear but blockwise's wkv_a (C + R = 192)."""
    return DeepSeekV3Config.from_preset(
        "tiny",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=256,
    )


def _quiet_convert(model: nn.Module, config: FP8Config) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_to_fp8(model, config, device="cpu")


# ----------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("recipe", GRANULARITIES)
def test_conversion_lists_converted_modules_and_leaves_the_report_exclusions_untouched(fp8_config, recipe):
    with torch.device("meta"):
        model = DeepSeekV3(fp8_config)
    keys = list(model.state_dict())
    kept = {name: module for name, module in model.named_modules() if isinstance(module, nn.Embedding | RMSNorm | Gate)}
    kept["head"] = model.head
    params = {name: p for name, p in model.named_parameters()}
    converted = _quiet_convert(model, FP8Config(recipe, experts=True))
    linears = [n for n, m in DeepSeekV3(fp8_config).named_modules() if type(m) is nn.Linear and n != "head"]
    # wkv_a's out = 192 is a multiple of 16, not of 128
    unfit = [n for n in linears if n.endswith("wkv_a")] if recipe == "blockwise" else []
    experts = [n for n, m in model.named_modules() if isinstance(m, GroupedExperts)]
    assert converted == sorted(set(linears) - set(unfit) | set(experts))
    dense_cls = {"blockwise": BlockwiseLinear}.get(recipe)
    for name in converted:
        module = model.get_submodule(name)
        if name in experts:
            assert type(module) is Float8GroupedExperts and module.granularity == recipe
        else:
            assert type(module) is not nn.Linear and isinstance(module, nn.Linear)
            assert dense_cls is None or type(module) is dense_cls
    for name in unfit:
        assert type(model.get_submodule(name)) is nn.Linear
    for name, module in kept.items():  # embedding, head, gate, norms: the very same modules
        assert model.get_submodule(name) is module and type(module) in (nn.Embedding, nn.Linear, RMSNorm, Gate)
    assert list(model.state_dict()) == keys  # checkpoints load into either precision
    assert all(p is params[n] for n, p in model.named_parameters())  # parameters reused, nothing allocated


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_linears_share_one_mm_config_so_compiled_blocks_share_one_cache_entry(fp8_config, recipe):
    with torch.device("meta"):
        model = DeepSeekV3(fp8_config)
    _quiet_convert(model, FP8Config(recipe))
    configs = {id(m.linear_mm_config) for m in model.modules() if hasattr(m, "linear_mm_config")}
    assert len(configs) == 1


def test_module_filter_and_experts_switch(fp8_config):
    assert FP8Config("tensorwise").experts is False  # the routed experts stay bf16 unless asked (docs/fp8.md: speed)
    with torch.device("meta"):
        model = DeepSeekV3(fp8_config)
    converted = _quiet_convert(model, FP8Config("tensorwise", exclude=["layers.0.*", "*.wo"]))
    assert converted and not any(n.startswith("layers.0.") or n.endswith(".wo") for n in converted)
    assert not any(isinstance(m, Float8GroupedExperts) for m in model.modules())
    assert type(model.layers[0].attn.wq_a) is nn.Linear and type(model.layers[1].attn.wq_a) is not nn.Linear


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_linears_get_token_rows_padded_to_16_and_the_padding_changes_nothing(fp8_config, recipe, one_thread):
    """torch._scaled_mm takes no dimension that is not a multiple of 16; the MTP depth's B * (S - 1) tokens (here
    2 * 8 - 2 = 14) reach every linear of its block, and the weight gradient's GEMM sums over them."""
    from torchao.float8.float8_linear import Float8Linear

    from models.parallel.fp8 import row_padded_float8_linear

    torch.manual_seed(0)
    model = DeepSeekV3(fp8_config)
    _quiet_convert(model, FP8Config(recipe))
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert linears and all(type(m) is row_padded_float8_linear() for m in linears)
    ids = torch.randint(0, fp8_config.vocab_size, (2, 9))

    def loss_and_grads():
        model.zero_grad()
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    given, seen = [], []  # token rows the linears were called with, and those torchao's forward got
    original, padding = Float8Linear.forward, row_padded_float8_linear().forward
    rows = lambda x: x.numel() // x.shape[-1]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Float8Linear, "forward", lambda self, x: seen.append(rows(x)) or original(self, x))
        mp.setattr(row_padded_float8_linear(), "forward", lambda self, x: given.append(rows(x)) or padding(self, x))
        padded = loss_and_grads()
    assert set(given) == {16, 14} and set(seen) == {16}, (given, seen)
    with pytest.MonkeyPatch.context() as mp:  # the same model, no padding (the emulated path takes any shape)
        mp.setattr(row_padded_float8_linear(), "forward", original)
        plain = loss_and_grads()
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(padded[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shapes_a_recipe_cannot_take_are_kept_with_one_warning_naming_them(tiny_config):
    with torch.device("meta"):
        model = DeepSeekV3(tiny_config)  # dims 64, 32, 16: blockwise takes none
    with pytest.warns(UserWarning) as record:
        converted = convert_to_fp8(model, FP8Config("blockwise", experts=True), device="cpu")
    assert converted == []
    messages = [str(w.message) for w in record]
    assert sum("emulated" in m for m in messages) == 1  # the CPU says so once
    (shapes,) = [m for m in messages if "not a multiple of 128" in m]
    assert "layers.0.attn.wq_a" in shapes and "layers.1.ffn.experts" in shapes and "head" not in shapes


def test_bad_recipe_and_gpu_without_fp8_fail_with_one_line_naming_model_fp8(monkeypatch):
    with pytest.raises(ValueError, match=r"model\.fp8\.recipe must be one of"):
        FP8Config("fp4")
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\] in model\.fp8"):
        FP8Config.parse({"recipe": "rowwise", "bogus": 1})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"^model\.fp8=tensorwise needs a GPU of compute capability >= 8\.9") as err:
        check_device("tensorwise", torch.device("cuda"))
    assert "\n" not in str(err.value) and "unset model.fp8" in str(err.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    with pytest.raises(ValueError, match=r"model\.fp8=blockwise needs .* >= 9\.0 .* or use tensorwise"):
        check_device("blockwise", torch.device("cuda"))
    assert check_device("tensorwise", torch.device("cuda")) is True


def test_lit_module_takes_fp8_as_a_name_or_a_mapping():
    from lightning_modules import DeepSeekV3LitModule

    module = DeepSeekV3LitModule(preset="tiny", fp8="rowwise")
    assert module.fp8 == FP8Config("rowwise") and module.hparams["fp8"]["recipe"] == "rowwise"
    module = DeepSeekV3LitModule(preset="tiny", fp8={"recipe": "blockwise", "experts": False})
    assert module.fp8 == FP8Config("blockwise", experts=False)
    assert DeepSeekV3LitModule(preset="tiny").fp8 is None


# ----------------------------------------------------------------------------------------------- quantisation
def _naive_block_quantize(x: torch.Tensor, rows: int, cols: int, dtype=E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block with Python loops: the definition ``quantize`` must match."""
    fp8_max = torch.finfo(dtype).max
    q = torch.empty_like(x, dtype=dtype)
    s = torch.empty(x.shape[0] // rows, x.shape[1] // cols)
    for i, j in itertools.product(range(s.shape[0]), range(s.shape[1])):
        block = x[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols].float()
        inv = fp8_max / block.abs().max().clamp(min=1e-12)
        q[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = (block * inv).clamp(-fp8_max, fp8_max).to(dtype)
        s[i, j] = 1 / inv
    return q, s


@pytest.mark.parametrize(("rows", "cols"), [(1, 128), (128, 128), (128, 1), (1, 256), (256, 256)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_matches_block_by_block_definition(rows, cols, dtype):
    x = torch.randn(256, 256) * torch.logspace(-3, 3, 256)[:, None]  # rows of very different magnitudes
    q, s = quantize(x, (rows, cols), dtype)
    q_ref, s_ref = _naive_block_quantize(x, rows, cols, dtype)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # Dequantised: within half an FP8 ulp of every element, relative to its block's scale.
    rel_ulp = 2.0 ** -(3 if dtype is E4M3 else 2)
    err = (dequantize(q, s) - x).abs()
    bound = torch.maximum(x.abs() * rel_ulp / 2, dequantize(torch.ones_like(q), s) * 2.0**-9)
    assert (err <= bound * 1.0001).all()


def test_scales_of_each_granularity_have_the_documented_shapes():
    x, w = torch.randn(256, 384), torch.randn(4, 256, 384)
    offsets = torch.tensor([128, 128, 256, 256], dtype=torch.int32)
    shapes = {
        "tensorwise": [(1,), (4,), (1,), (4,)],
        "rowwise": [(256,), (4, 256), (4, 384), (4, 384)],
        "blockwise": [(256, 3), (4, 2, 3), (384, 2), (4, 3, 2)],
    }
    for g, expected in shapes.items():
        got = [quantize_act(x, g)[1], quantize_weight(w, g)[1], quantize_act_t(x, g, offsets)[1]]
        got.append(quantize_weight_t(w, g)[1])
        assert [tuple(s.shape) for s in got] == expected, g


def test_rowwise_weight_gradient_operand_has_one_scale_per_expert_and_column():
    x = torch.randn(384, 32)
    x[256:] *= 100  # the third group's rows are much larger: its scales must not leak into the others
    offsets = torch.tensor([128, 256, 384], dtype=torch.int32)
    q_t, s = quantize_act_t(x, "rowwise", offsets)
    for e, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 384)]):
        torch.testing.assert_close(s[e], x[lo:hi].abs().amax(dim=0) / 448)
        torch.testing.assert_close(q_t[:, lo:hi].float() * s[e][:, None], x[lo:hi].t(), rtol=0.07, atol=0)


def test_quantised_transposes_are_contiguous_for_the_kernels():
    w, x = torch.randn(2, 256, 128), torch.randn(256, 128)
    offsets = torch.tensor([128, 256], dtype=torch.int32)
    for g in GRANULARITIES:
        assert quantize_weight_t(w, g)[0].is_contiguous() and quantize_act_t(x, g, offsets)[0].is_contiguous()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_weight_transpose_from_the_forward_quantisation_is_bitwise_the_requantised_one(dtype):
    """Tensorwise and blockwise take w^T from w's FP8 copy (the same blocks); rowwise must re-quantise."""
    w = torch.randn(3, 256, 384) * torch.logspace(-3, 1, 384)  # column scales that differ: rowwise scales would too
    for g in GRANULARITIES:
        want = quantize_weight_t(w, g, dtype)
        got = quantize_weight_t(w, g, dtype, quantized=quantize_weight(w, g, dtype))
        assert got[0].is_contiguous() and got[1].shape == want[1].shape, g
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1]), g


def test_fp8_transpose_is_a_copy_on_the_cpu_even_for_unit_dimensions():
    from models.parallel.fp8_quant import fp8_transpose

    for shape in [(2, 100, 70), (1, 1, 130), (3, 5, 1)]:  # a unit N or K: the transposed view is contiguous already
        q = (torch.randn(shape) * 50).to(E4M3)
        got = fp8_transpose(q)
        assert got.is_contiguous() and got.data_ptr() != q.data_ptr()
        assert torch.equal(got.view(torch.uint8), q.transpose(1, 2).contiguous().view(torch.uint8)), shape


def test_blockwise_linear_matches_its_definition_in_float64():
    """The report's recipe written out: 1x128 x and dy, 128x128 w, 1x128 dy^T and x^T along the tokens."""
    torch.manual_seed(0)
    linear = BlockwiseLinear.from_float(nn.Linear(256, 384, bias=False))
    x = torch.randn(2, 100, 256, requires_grad=True)  # 200 rows: padded to 256 inside
    dy = torch.randn(2, 100, 384)
    linear(x).backward(dy)
    deq = lambda t, block: dequantize(*quantize(t, block)).double()  # noqa: E731
    pad = lambda t: F.pad(t, (0, 0, 0, 56))  # noqa: E731
    x2, dy2, w = pad(x.detach().reshape(200, 256)), pad(dy.reshape(200, 384)), linear.weight.detach()
    y_ref = deq(x2, (1, 128)) @ deq(w, (128, 128)).t()
    dx_ref = deq(dy2, (1, 128)) @ deq(w, (128, 128))
    dw_ref = deq(dy2.t(), (1, 128)) @ deq(x2.t(), (1, 128)).t()
    torch.testing.assert_close(linear(x).reshape(200, 384).double(), y_ref[:200], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(200, 256).double(), dx_ref[:200], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.weight.grad.double(), dw_ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------- padded groups
def test_rows_past_the_groups_are_zeroed_for_every_padded_layout():
    """The GEMMs zero only the last (E + 1) * 128 rows: enough for any layout ``padded_rows`` makes."""
    from models.parallel.fp8_grouped_mm import _zero_rows_past_groups

    gen = torch.Generator().manual_seed(0)
    layouts = [torch.full((8,), 128), torch.full((8,), 1), torch.tensor([0, 0, 0, 1024]), torch.tensor([5, 0, 300])]
    layouts += [torch.randint(0, 400, (n,), generator=gen) for n in (1, 4, 16)]
    for counts in layouts:
        _, ends, n_rows = padded_rows(counts, torch.repeat_interleave(torch.arange(counts.numel()), counts), BLOCK)
        out = _zero_rows_past_groups(torch.full((n_rows, 3), float("nan")), ends)
        assert out[ends[-1] :].eq(0).all() and out[: ends[-1]].isnan().all(), counts


def test_padded_rows_start_every_group_at_a_multiple_and_keep_rows_distinct():
    counts = torch.tensor([5, 0, 130, 1, 128])
    experts_sorted = torch.repeat_interleave(torch.arange(5), counts)
    rows, ends, n_rows = padded_rows(counts, experts_sorted, 128)
    assert ends.tolist() == [128, 128, 384, 512, 640] and ends.dtype == torch.int32
    assert n_rows == 1024 and n_rows >= ends[-1]  # static bound: 264 + 5 * 127 rounded up to 128
    assert rows.unique().numel() == rows.numel()
    starts = torch.cat((torch.zeros(1, dtype=torch.int32), ends[:-1]))
    for e in range(5):
        got = rows[experts_sorted == e]
        assert got.tolist() == list(range(starts[e], starts[e] + counts[e]))


def _moe(config: DeepSeekV3Config, granularity: str | None) -> MoE:
    torch.manual_seed(0)
    moe = MoE(config).train()
    moe.reset_parameters(std=0.05)
    if granularity is not None:
        moe.experts = Float8GroupedExperts(moe.experts, granularity)
    return moe


def test_fp8_moe_traced_by_aot_autograd_matches_eager_on_the_cpu(fp8_config, one_thread):
    """The MoE layer with FP8 experts under dynamo + AOTAutograd (no code generation) gives eager's output and every
    gradient, bitwise (under torch 2.11 it did not: tests/models/test_autograd_functions.py)."""
    x0 = torch.randn(2, 128, fp8_config.hidden_size).to(torch.bfloat16)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        moe = _moe(fp8_config, "tensorwise").to(torch.bfloat16)
        fn = torch.compile(moe.forward, backend="aot_eager") if compiled else moe.forward
        x = x0.clone().requires_grad_(True)
        y, _ = fn(x)
        y.float().square().sum().backward()
        results.append((y, x.grad, moe.experts.w1.grad, moe.gate.weight.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_fp8_moe_backward_graph_keeps_all_four_backward_gemms(one_thread):
    """Both input-gradient and all weight-gradient GEMMs (dw2, and dw1, dw3 as two, each its own contiguous gradient)
    reach the compiled backward graph (under torch 2.11 the old in-place padding lost ``dx = da13 @ w13`` there:
    benchmarks/fp8_backward_graph.py)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fp8_backward_graph import graph_ops

    main = graph_ops()["out of place (main)"]
    assert main["fw"]["dsv3.fp8_grouped_mm.default"] == 2
    assert main["bw"]["dsv3.fp8_grouped_mm.default"] == 2 and main["bw"]["dsv3.fp8_grouped_mm_wgrad.default"] == 3


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_experts_padding_changes_nothing_but_precision(fp8_config, granularity, one_thread):
    """Same routing, same weights: the padded FP8 path stays within FP8 error of the bf16 path's math."""
    ref, moe = _moe(fp8_config, None), _moe(fp8_config, granularity)
    x = torch.randn(2, 96, fp8_config.hidden_size, requires_grad=True)
    outs, grads = [], []
    for m in (ref, moe):
        y, _ = m(x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs.append(y)
        grads.append([x.grad.clone()] + [p.grad for p in (m.experts.w1, m.experts.w2, m.experts.w3)])
        x.grad = None
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(outs[1], outs[0]) < 0.08  # two E4M3 GEMMs in a row: ~5 %
    for got, want in zip(grads[1], grads[0], strict=True):
        assert rel(got, want) < 0.15  # E5M2 weight gradients under tensorwise: ~10 %
    assert moe.tokens_per_expert.sum() == 2 * 96 * fp8_config.num_experts_per_tok


def _reference_experts(x, w1, w2, w3, offsets, g):  # noqa: ANN001, ANN202
    """The FP8 experts' forward and gradients with a Python loop over experts in float64 (quantised as the path)."""
    grad_fp8 = E5M2 if g == "tensorwise" else E4M3
    deq = lambda q_s: dequantize(*q_s).double()  # noqa: E731
    w13 = torch.cat((w1, w3), dim=1)
    x_, w13_, w2_ = deq(quantize_act(x, g)), deq(quantize_weight(w13, g)), deq(quantize_weight(w2, g))
    w13_t, w2_t = deq(quantize_weight_t(w13, g)), deq(quantize_weight_t(w2, g))
    starts = [0, *offsets[:-1].tolist()]
    groups = list(zip(starts, offsets.tolist(), strict=True))
    a13 = torch.zeros(x.shape[0], w13.shape[1], dtype=torch.float64)
    for e, (lo, hi) in enumerate(groups):
        a13[lo:hi] = x_[lo:hi] @ w13_[e].t()
    a13 = a13.float()  # the path rounds GEMM outputs to the compute dtype (float32 here)
    a1, a3 = a13.chunk(2, dim=-1)
    h = F.silu(a1) * a3
    h_ = deq(quantize_act(h, g))
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for e, (lo, hi) in enumerate(groups):
        y[lo:hi] = h_[lo:hi] @ w2_[e].t()
    dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).float()  # the upstream gradient used below
    dgrad_g = "rowwise" if g == "tensorwise" else g  # input gradients: E4M3, per row under tensorwise
    dy_ = deq(quantize_act(dy, dgrad_g))
    dyt_, ht_, xt_ = (_deq_t(t, g, offsets, grad_fp8 if t is dy else E4M3) for t in (dy, h, x))
    dh = torch.zeros_like(h, dtype=torch.float64)
    dw2 = torch.zeros_like(w2, dtype=torch.float64)
    for e, (lo, hi) in enumerate(groups):
        dh[lo:hi] = dy_[lo:hi] @ w2_t[e].t()
        dw2[e] = dyt_[:, lo:hi] @ ht_[:, lo:hi].t()
    sig = torch.sigmoid(a1)
    dh = dh.float()
    da13 = torch.cat((dh * a3 * sig * (1 + a1 * (1 - sig)), dh * a1 * sig), dim=-1)
    da_, dat_ = deq(quantize_act(da13, dgrad_g)), _deq_t(da13, g, offsets, grad_fp8)
    dx = torch.zeros_like(x, dtype=torch.float64)
    dw13 = torch.zeros_like(w13, dtype=torch.float64)
    for e, (lo, hi) in enumerate(groups):
        dx[lo:hi] = da_[lo:hi] @ w13_t[e].t()
        dw13[e] = dat_[:, lo:hi] @ xt_[:, lo:hi].t()
    dw1, dw3 = dw13.chunk(2, dim=1)
    return y, dy, dx, dw1, dw2, dw3


def _deq_t(t: torch.Tensor, g: str, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q_t, s = quantize_act_t(t, g, offsets, dtype)
    if g != "rowwise":
        return dequantize(q_t, s).double()
    expert = torch.searchsorted(offsets, torch.arange(t.shape[0], dtype=offsets.dtype), right=True)
    s_col = torch.cat((s, torch.ones(1, s.shape[1])))[expert].t()
    return (q_t.float() * s_col).double()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_experts_forward_and_backward_match_per_expert_reference(granularity):
    e, d, f = 3, 256, 128
    offsets = torch.tensor([128, 128, 384], dtype=torch.int32)  # an empty expert, then two tiles
    x = torch.randn(512, d)
    x[offsets[-1] :] = 0  # rows past the groups are padding, zero as MoE.routed makes them
    x[100:128] = 0  # and so are the tail rows of a padded group
    w1, w2, w3 = (torch.randn(*shape) * 0.05 for shape in ((e, f, d), (e, d, f), (e, f, d)))
    for t in (x, w1, w2, w3):
        t.requires_grad_(True)
    experts = GroupedExperts(e, d, f)
    experts.w1, experts.w2, experts.w3 = (nn.Parameter(t) for t in (w1, w2, w3))
    fp8 = Float8GroupedExperts(experts, granularity)
    y = fp8(x, offsets)
    y_ref, dy, dx_ref, dw1_ref, dw2_ref, dw3_ref = _reference_experts(
        x.detach(), w1.detach(), w2.detach(), w3.detach(), offsets, granularity
    )
    y.backward(dy)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-4, atol=1e-5)
    # Gradients: the reference rounds its float64 intermediates (dh, da13) differently, so a few of their elements
    # land on the other side of an FP8 rounding boundary (~0.1 %); a wrong scale or layout errs by > 5 %.
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(x.grad, dx_ref) < 5e-3
    for p, ref in zip((fp8.w1, fp8.w2, fp8.w3), (dw1_ref, dw2_ref, dw3_ref), strict=True):
        assert rel(p.grad, ref) < 5e-3
    assert fp8.w2.grad[1].abs().max() == 0  # the empty expert gets a zero gradient


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_input_gradient_gemms_take_e4m3_operands_as_torchs_cutlass_kernel_needs(granularity, monkeypatch):
    """Every expert GEMM but the weight gradients multiplies two E4M3 operands: what ``fp8_grouped_mm`` needs to send
    tensorwise and rowwise products to torch's CUTLASS grouped GEMM (for tensorwise's input gradients, row scales of
    the gradient against the weight's scale per expert). Blockwise runs on the Triton kernels."""
    from models.parallel import fp8_experts

    calls = []

    def record(a, sa, b, sb, offsets, granularity, out_dtype, fast_accum=False):  # noqa: ANN001, ANN202
        calls.append((a.dtype, b.dtype, granularity, tuple(sa.shape), tuple(sb.shape)))
        return grouped_mm_reference(a, sa, b, sb, offsets, out_dtype)

    monkeypatch.setattr(fp8_experts, "fp8_grouped_mm", record)
    e, d, f = 2, 256, 128
    experts = GroupedExperts(e, d, f)
    for w in (experts.w1, experts.w2, experts.w3):
        nn.init.normal_(w, std=0.05)
    x = torch.randn(256, d, requires_grad=True)
    Float8GroupedExperts(experts, granularity)(x, torch.tensor([128, 256], dtype=torch.int32)).sum().backward()
    assert len(calls) == 4  # two forward GEMMs, then the two input gradients
    for a_dtype, b_dtype, *_ in calls:
        assert a_dtype == b_dtype == E4M3
    if granularity == "tensorwise":
        assert [c[2:] for c in calls[2:]] == [("rowwise", (256,), (e, f)), ("rowwise", (256,), (e, d))]


# ----------------------------------------------------------------------------------------------- training
def _train(config: DeepSeekV3Config, fp8: FP8Config | None, steps: int) -> list[float]:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    if fp8 is not None:
        _quiet_convert(model, fp8)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 64, (4, 129), generator=gen)  # a small vocabulary in use: learnable in a few steps
    losses = []
    for _ in range(steps):
        out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.ce_loss.item())
    return losses


def test_tiny_model_trains_with_every_recipe_within_a_few_percent_of_fp32(fp8_config, one_thread):
    ref = _train(fp8_config, None, steps=6)
    assert ref[-1] < 0.9 * ref[0]
    for recipe in GRANULARITIES:
        losses = _train(fp8_config, FP8Config(recipe, experts=True), steps=6)
        assert abs(losses[-1] - ref[-1]) / ref[-1] < 0.03, (recipe, losses, ref)


# ----------------------------------------------------------------------------------------------- kernels
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
# Triton 3.6's CPU interpreter turns 1-element arrays into Python ints (`range(0, K, ...)`), which numpy 2.4 refuses
_INTERPRETER_NUMPY = tuple(int(v) for v in np.__version__.split(".")[:2]) < (2, 4)


def _grouped_operands(granularity: str, device: str, n: int = 336, k: int = 272):
    """Three experts (one empty), padded groups, and N, K not multiples of the kernels' tiles (tensorwise/rowwise)."""
    if granularity == "blockwise":
        n, k = 384, 256
    counts = torch.tensor([100, 0, 300])
    rows, offsets, n_rows = padded_rows(counts, torch.repeat_interleave(torch.arange(3), counts), BLOCK)
    x = torch.zeros(n_rows, k)
    x[rows] = torch.randn(int(counts.sum()), k)
    dy = torch.zeros(n_rows, n)
    dy[rows] = torch.randn(int(counts.sum()), n)
    w = torch.randn(3, n, k) * 0.1
    grad_fp8 = E5M2 if granularity == "tensorwise" else E4M3
    mm = (*quantize_act(x, granularity), *quantize_weight(w, granularity))
    wgrad = (*quantize_act_t(dy, granularity, offsets, grad_fp8), *quantize_act_t(x, granularity, offsets))
    to = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return to(mm), to(wgrad), offsets.to(device)


def _check_kernels(granularity: str, device: str) -> None:
    """Kernels against the dequantised float32 reference: exact in the interpreter; on a GPU within what FP8 tensor
    cores' ~14-bit accumulation inside each promoted 128-wide step allows (relative norm error ~1e-4)."""
    from models.parallel import fp8_grouped_mm as G

    mm, wgrad, offsets = _grouped_operands(granularity, device)
    outs = [G._launch_mm(*mm, offsets, granularity, torch.float32)]
    refs = [grouped_mm_reference(*[t.cpu() for t in mm], offsets.cpu(), torch.float32)]
    outs.append(G._launch_wgrad(*wgrad, offsets, granularity, torch.float32))
    refs.append(grouped_mm_wgrad_reference(*[t.cpu() for t in wgrad], offsets.cpu(), granularity, torch.float32))
    for out, ref in zip(outs, refs, strict=True):
        if device == "cpu":
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        else:
            assert torch.isfinite(out).all() and ((out.cpu() - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.skipif(not _HAVE_TRITON, reason="needs triton (CPU interpreter)")
@pytest.mark.skipif(not _INTERPRETER_NUMPY, reason="Triton 3.6's interpreter needs numpy < 2.4")
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_triton_kernels_match_reference_in_the_interpreter(granularity):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tests.models.test_fp8 import _check_kernels; "
        f"_check_kernels({granularity!r}, 'cpu')"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _dual_operand(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """bf16 x whose blockwise quantisations are exact both ways: each 128x128 tile is random FP8 values times a power
    of two, with fp8_max on the tile's diagonal (so every row's and column's amax is fp8_max times the tile's power
    of two); one tile all zeros. The interpreter's float32 -> FP8 cast does not round to nearest even, so exact
    inputs test the kernel's indexing, scales and transposed stores there; the GPU test checks the rounding."""
    g = torch.Generator().manual_seed(0)
    fp8_max = torch.finfo(dtype).max
    codes = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g).view(dtype).float()
    codes = torch.where(codes.isfinite(), codes, 0.0).clamp(-fp8_max, fp8_max)
    codes[(torch.arange(m)[:, None] % BLOCK) == (torch.arange(k)[None, :] % BLOCK)] = fp8_max
    powers = torch.exp2(torch.randint(-20, 20, (m // BLOCK, k // BLOCK), generator=g).float())
    x = codes * powers.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    x[:BLOCK, :BLOCK] = 0
    return x.to(torch.bfloat16)


def _check_dual_kernel() -> None:
    from models.parallel import fp8_quant as Q

    for m, k, dtype in [(256, 384, E4M3), (384, 128, E5M2)]:
        x = _dual_operand(m, k, dtype)
        for out, ref in zip(Q._launch_dual(x, dtype), fp8_quantize_dual(x, dtype), strict=True):
            assert out.shape == ref.shape and out.dtype == ref.dtype and torch.equal(out.float(), ref.float())


def test_quantize_act_dual_is_both_blockwise_quantisations_and_compiles_whole():
    """``quantize_act_dual`` gives ``quantize_act(x, "blockwise")`` and ``quantize_act_t(x, "blockwise")``; as an op
    its fake (meta) implementation agrees with the real one, and dynamo traces it without a graph break."""
    x = torch.randn(256, 384, dtype=torch.bfloat16)
    offsets = torch.tensor([256], dtype=torch.int32)
    (q, s), (q_t, s_t) = quantize_act_dual(x)
    refs = (*quantize_act(x, "blockwise"), *quantize_act_t(x, "blockwise", offsets))
    for out, ref in zip((q, s, q_t, s_t), refs, strict=True):
        assert torch.equal(out.float(), ref.float())
    torch.library.opcheck(fp8_quantize_dual, (x, E4M3))
    compiled = torch.compile(lambda t: quantize_act_dual(t * 2), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x)[1][0].float(), quantize_act_t(x * 2, "blockwise", offsets)[0].float())


@pytest.mark.skipif(not _HAVE_TRITON, reason="needs triton (CPU interpreter)")
@pytest.mark.skipif(not _INTERPRETER_NUMPY, reason="Triton 3.6's interpreter needs numpy < 2.4")
def test_quantize_dual_kernel_matches_reference_in_the_interpreter():
    code = "import sys; sys.path.insert(0, sys.argv[1]); from tests.models.test_fp8 import _check_dual_kernel as c; c()"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("m, k", [(256, 384), (1024, 2816)])
def test_quantize_dual_kernel_matches_reference_on_gpu(m, k):
    """The Triton kernel against the PyTorch quantisation on the same GPU, bit for bit (random data: rounding too)."""
    from models.parallel import fp8_quant as Q

    x = (torch.randn(m, k, device="cuda") * torch.logspace(-4, 4, k, device="cuda")).to(torch.bfloat16)
    x[:BLOCK, :BLOCK] = 0
    for dtype in (E4M3, E5M2):
        ref = (*quantize(x, (1, BLOCK), dtype), *quantize(x.t(), (1, BLOCK), dtype))
        for out, r in zip(Q._launch_dual(x, dtype), ref, strict=True):
            assert out.shape == r.shape and torch.equal(out.float(), r.float()), (m, k, dtype)


def test_weight_dual_is_the_blockwise_weight_and_its_transpose_also_for_a_pair_and_compiles_whole():
    """``quantize_weight_dual(w)`` gives ``quantize_weight(w, "blockwise")`` and ``quantize_weight_t`` of it;
    ``quantize_weight_dual(w1, w3)`` the same for ``cat((w1, w3), 1)``; fake and real agree; dynamo traces it."""
    g = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(2, n, 384, generator=g).to(torch.bfloat16) for n in (256, 128))
    for args, w in (((w1, None), w1), ((w1, w3), torch.cat((w1, w3), dim=1))):
        (q, s), (q_t, s_t) = quantize_weight_dual(*args)
        ref = quantize_weight(w, "blockwise")
        refs = (*ref, *quantize_weight_t(w, "blockwise"))  # re-quantised from w^T: the same bytes
        assert q_t.shape == (2, 384, w.shape[1]) and s_t.shape == (2, 3, w.shape[1] // BLOCK)
        for out, r in zip((q, s, q_t, s_t), refs, strict=True):
            assert out.shape == r.shape and out.is_contiguous() and torch.equal(out.float(), r.float())
        torch.library.opcheck(fp8_quantize_weight_dual, (*args, E4M3))
    compiled = torch.compile(lambda a, b: quantize_weight_dual(a * 2, b), fullgraph=True, backend="eager")
    assert torch.equal(compiled(w1, w3)[1][0].float(), quantize_weight_dual(w1 * 2, w3)[1][0].float())


def _check_weight_dual_kernel() -> None:
    """The weight kernel on exactly quantisable blocks (``_dual_operand``): bitwise the PyTorch quantisation, alone
    and for a pair (rows of w then of w2), E4M3 and E5M2, bf16 and float32 weights (its transposed load)."""
    from models.parallel import fp8_quant as Q

    for dtype, src in itertools.product((E4M3, E5M2), (torch.bfloat16, torch.float32)):
        w = _dual_operand(3 * 384, 256, dtype).reshape(3, 384, 256).to(src)
        for args in ((w, None), (w[:, :256].contiguous(), w[:, 256:].contiguous())):
            for out, ref in zip(
                Q._launch_weight_dual(*args, dtype), fp8_quantize_weight_dual(*args, dtype), strict=True
            ):
                assert out.shape == ref.shape and torch.equal(out.float(), ref.float()), dtype


@pytest.mark.skipif(not _HAVE_TRITON, reason="needs triton (CPU interpreter)")
@pytest.mark.skipif(not _INTERPRETER_NUMPY, reason="Triton 3.6's interpreter needs numpy < 2.4")
def test_weight_dual_kernel_matches_reference_in_the_interpreter():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from tests.models.test_fp8 import _check_weight_dual_kernel as c; c()"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_weight_dual_kernel_matches_reference_on_gpu(src_dtype):
    """Bitwise the PyTorch quantisation on the same GPU, random weights (rounding too), bf16 and fp32 masters."""
    from models.parallel import fp8_quant as Q

    w = (torch.randn(4, 640, 384, device="cuda") * torch.logspace(-3, 3, 384, device="cuda")).to(src_dtype)
    w[0, :BLOCK, :BLOCK] = 0
    for dtype in (E4M3, E5M2):
        for args in ((w, None), (w[:, :256].contiguous(), w[:, 256:].contiguous())):
            ref = fp8_quantize_weight_dual(*[a.cpu() if a is not None else None for a in args], dtype)
            for out, r in zip(Q._launch_weight_dual(*args, dtype), ref, strict=True):
                assert out.shape == r.shape and torch.equal(out.cpu().float(), r.float()), (src_dtype, dtype)


def test_swiglu_quantisers_quantise_the_swiglu_and_its_autograd_gradient_and_compile_whole():
    """The fused SwiGLU quantisers are ``quantize_act_dual`` of ``swiglu`` and of ``swiglu_backward``, which is
    autograd's gradient of ``swiglu`` (float64); as ops their fake implementations agree and dynamo traces them."""
    g = torch.Generator().manual_seed(0)
    a13 = torch.randn(256, 512, dtype=torch.float64, generator=g, requires_grad=True)
    dh = torch.randn(256, 256, dtype=torch.float64, generator=g)
    torch.testing.assert_close(torch.autograd.grad(swiglu(a13), a13, dh)[0], swiglu_backward(a13, dh))
    a13, dh = a13.detach().to(torch.bfloat16), dh.to(torch.bfloat16)
    for got, want in (
        (quantize_swiglu_dual(a13), quantize_act_dual(swiglu(a13))),
        (quantize_swiglu_grad_dual(a13, dh), quantize_act_dual(swiglu_backward(a13, dh))),
    ):
        for out, ref in zip((*got[0], *got[1]), (*want[0], *want[1]), strict=True):
            assert out.shape == ref.shape and torch.equal(out.float(), ref.float())
    torch.library.opcheck(fp8_quantize_swiglu_dual, (a13, E4M3))
    torch.library.opcheck(fp8_quantize_swiglu_grad_dual, (a13, dh, E4M3))
    compiled = torch.compile(lambda a, d: quantize_swiglu_grad_dual(a * 2, d), fullgraph=True, backend="eager")
    assert torch.equal(compiled(a13, dh)[1][0].float(), quantize_act_dual(swiglu_backward(a13 * 2, dh))[1][0].float())


def _check_swiglu_kernels(device: str, exact_fraction: float | None) -> None:
    """The kernel's SwiGLU prologues (forward h, backward da13) against the PyTorch quantisers on the same device.
    Triton's and torch's sigmoid may differ in the last bit, which can move h or da13 by one bf16 step and so an FP8
    code by one step: the scales (each 1x128 amax of h or da13, both ways) must agree within 1 % (the columns' spread
    of 6 decades makes a wrong tile, half or row differ by far more), every dequantised element lie within 8 % of its
    tile's amax (one E4M3 step at the top of the range is 7 %) and at least ``exact_fraction`` of the codes be equal.
    ``exact_fraction=None`` checks the scales only: Triton 3.6's interpreter casts float32 -> FP8 wrongly for values
    that are not exact (128.4 becomes 64), so there the codes are checked by ``_check_dual_kernel`` on exact data."""
    from models.parallel import fp8_quant as Q

    g = torch.Generator().manual_seed(0)
    m, f = 384, 256
    spread = torch.logspace(-3, 3, 2 * f)[torch.randperm(2 * f, generator=g)]
    a13 = (torch.randn(m, 2 * f, generator=g) * spread).to(torch.bfloat16).to(device)
    dh = (torch.randn(m, f, generator=g) * spread[:f]).to(torch.bfloat16).to(device)
    a13[:BLOCK, :BLOCK] = 0  # an all-zero tile of a1: h and da3 zero there
    cases = (
        (Q._launch_dual(a13, E4M3, prologue=1), fp8_quantize_dual(swiglu(a13).cpu(), E4M3)),
        (Q._launch_dual(a13, E4M3, prologue=2, dh=dh), fp8_quantize_dual(swiglu_backward(a13, dh).cpu(), E4M3)),
    )
    for which, (out, ref) in enumerate(cases):
        out = [t.cpu() for t in out]
        for q, s, q_ref, s_ref in ((out[0], out[1], ref[0], ref[1]), (out[2], out[3], ref[2], ref[3])):
            assert q.shape == q_ref.shape and s.shape == s_ref.shape, which
            torch.testing.assert_close(s, s_ref, rtol=0.01, atol=0)
            if exact_fraction is None:
                continue
            deq, deq_ref = dequantize(q, s), dequantize(q_ref, s_ref)
            amax = s_ref.repeat_interleave(BLOCK, 1) * torch.finfo(E4M3).max
            assert ((deq - deq_ref).abs() <= 0.08 * amax).all(), which
            assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean() >= exact_fraction, which


@pytest.mark.skipif(not _HAVE_TRITON, reason="needs triton (CPU interpreter)")
@pytest.mark.skipif(not _INTERPRETER_NUMPY, reason="Triton 3.6's interpreter needs numpy < 2.4")
def test_swiglu_quantise_kernels_match_reference_in_the_interpreter():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tests.models.test_fp8 import _check_swiglu_kernels as c; "
        "c('cpu', None)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
def test_swiglu_quantise_kernels_match_reference_on_gpu():
    _check_swiglu_kernels("cuda", 0.99)


def _compile_for_hopper(kernel: str, scaling: int, tile: tuple):
    """The kernel (``"mm"`` or ``"wgrad"``) compiled for sm_90a by Triton on this machine, no GPU needed: its PTX and
    what ptxas says of it (registers, bytes spilled per thread)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.parallel import fp8_grouped_mm as G

    fn = (G._grouped_mm_kernel if kernel == "mm" else G._grouped_mm_wgrad_kernel).fn  # under the autotuner
    names = list(fn.arg_names)
    types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "at_ptr": "*fp8e4nv", "bt_ptr": "*fp8e4nv", "c_ptr": "*bf16"}
    types |= {"offsets_ptr": "*i32", "sa_ptr": "*fp32", "sb_ptr": "*fp32"}
    block_m, block_n, block_k, warps, stages = tile
    consts = {"SCALING": scaling, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    consts["E_POW2"] = 64
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    # what the launcher's arguments give Triton: 16-byte aligned pointers, sizes multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts and n != "n_experts"}
    source = ASTSource(fn, signature, {n: v for n, v in consts.items() if n in names}, attrs)
    options = {"num_warps": warps, "num_stages": stages}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options).asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return ptx, None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        cmd = [str(ptxas), "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spilled = re.search(r"(\d+) bytes spill stores", log)
    return ptx, {"registers": int(re.search(r"Used (\d+) registers", log)[1]), "spilled": int(spilled[1])}


@pytest.mark.skipif(not _HAVE_TRITON, reason="needs triton (compiles for sm_90 without a GPU)")
@pytest.mark.parametrize("kernel", ["mm", "wgrad"])
def test_kernels_compile_for_hopper_to_pipelined_16_byte_copies(kernel):
    """The FP8 operands are copied to shared memory 16 bytes at a time, asynchronously (cp.async), never a byte at a
    time: the weight-gradient kernel once read its groups' unaligned starts byte by byte, 30x slower on an H200."""
    import re

    from models.parallel.fp8_grouped_mm import TILES

    ptx, _ = _compile_for_hopper(kernel, 2, TILES[kernel, True][0])
    assert re.search(r"cp\.async\.cg\.shared\.global[^\n]*0x10", ptx), "no 16-byte async copies"
    assert not re.search(r"ld\.global(\.\w+)*\.b8", ptx), "FP8 operands loaded byte by byte"
    assert "wgmma" in ptx


@pytest.mark.skipif(not _HAVE_TRITON, reason="needs triton (compiles for sm_90 without a GPU)")
@pytest.mark.parametrize("kernel", ["mm", "wgrad"])
def test_blockwise_tiles_compile_for_hopper_without_register_spills(kernel):
    """Every tile the autotuner may give a blockwise kernel keeps its two float32 tiles in registers: ptxas spills
    nothing to local memory. The promoted kernels' 128x256 / 8-warp tile, which blockwise ran on before, spills
    hundreds of bytes per thread there (checked too, so that the probe is seen to find spills)."""
    from models.parallel.fp8_grouped_mm import TILES

    _, before = _compile_for_hopper(kernel, 2, (128, 256, 128, 8, 3))
    if before is None:
        pytest.skip("this triton ships no ptxas")
    assert before["spilled"] > 100, before
    for tile in TILES[kernel, True]:
        _, info = _compile_for_hopper(kernel, 2, tile)
        assert info["spilled"] == 0, (tile, info)


@pytest.mark.gpu
def test_cublas_blockwise_mm_matches_reference_and_compiles_whole_on_gpu():
    """``fp8_blockwise_mm`` (cuBLAS) for the three GEMMs of a blockwise linear, against the dequantised reference with
    one group; then ``BlockwiseLinear`` on it compiled with ``fullgraph=True`` (no graph break) against the Triton
    path's output and gradients (the same FP8 operands, so equal up to accumulation order)."""
    from models.parallel import fp8_grouped_mm as G

    m, n, k = 512, 512, 1024  # every sum (k, n, m) 4 or 8 blocks of 128: what cuBLAS is given
    x, dy = torch.randn(m, k, device="cuda"), torch.randn(m, n, device="cuda")
    w = torch.randn(1, n, k, device="cuda") * 0.1
    offsets = torch.full((1,), m, dtype=torch.int32, device="cuda")
    assert G.use_cublas_blockwise(x, k) and not G.use_cublas_blockwise(x, 384)  # 3 blocks: the Triton kernels
    xq, wq, dyq = quantize_act(x, "blockwise"), quantize_weight(w, "blockwise"), quantize_act(dy, "blockwise")
    wq_t = quantize_weight_t(w, "blockwise", quantized=wq)
    dyq_t, xq_t = quantize_act_t(dy, "blockwise", offsets), quantize_act_t(x, "blockwise", offsets)
    cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
    f32 = torch.float32
    outs = [
        G.fp8_blockwise_mm(*xq, wq[0][0], wq[1][0], f32),
        G.fp8_blockwise_mm(*dyq, wq_t[0][0], wq_t[1][0], f32),
        G.fp8_blockwise_mm(*dyq_t, *xq_t, f32),
    ]
    refs = [
        grouped_mm_reference(*cpu([*xq, *wq, offsets]), f32),
        grouped_mm_reference(*cpu([*dyq, *wq_t, offsets]), f32),
        grouped_mm_wgrad_reference(*cpu([*dyq_t, *xq_t, offsets]), "blockwise", f32)[0],
    ]
    cases = zip(outs, refs, strict=True)
    for out, ref in cases:
        assert ((out.cpu() - ref).norm() / ref.norm()) < 2e-3

    lin = nn.Linear(k, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    block = BlockwiseLinear.from_float(lin)
    xb = torch.randn(2, 200, k, device="cuda", dtype=torch.bfloat16)  # 400 rows: padded to 512 inside
    results = []
    for backend, fn in (("auto", torch.compile(block, fullgraph=True)), ("triton", block)):
        G.backend = backend
        try:
            xi = xb.clone().requires_grad_()
            y = fn(xi)
            y.float().square().sum().backward()
            results.append((y.float(), xi.grad.float(), block.weight.grad.float()))
            block.weight.grad = None
        finally:
            G.backend = "auto"
    for a, b in zip(*results, strict=True):
        assert ((a - b).norm() / b.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_triton_tile_matches_reference_on_gpu(granularity):
    """Each tile of ``TILES`` the autotuner may pick for this scaling, run alone, against the reference."""
    from models.parallel.fp8_grouped_mm import TILES, only_tile

    blockwise = granularity == "blockwise"
    for kernel in ("mm", "wgrad"):
        for tile in TILES[kernel, blockwise]:
            with only_tile(kernel, tile):
                _check_kernels(granularity, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_triton_kernels_match_reference_on_gpu(granularity):
    _check_kernels(granularity, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_cutlass_grouped_mm_matches_reference_on_gpu(granularity):
    """torch's CUTLASS grouped GEMM, which fp8_grouped_mm takes for E4M3 operands (the forward of both recipes, the
    rowwise input gradients), with and without fast accumulation, and its weight-gradient form (measured, not
    dispatched), against the dequantised reference; rows past the groups and empty experts' outputs are zero."""
    from models.parallel import fp8_grouped_mm as G

    mm, wgrad, offsets = _grouped_operands(granularity, "cuda")
    assert G._use_cutlass(mm[0], mm[2], granularity, torch.bfloat16)
    ref = grouped_mm_reference(*[t.cpu() for t in mm], offsets.cpu(), torch.float32)
    outs = [G._cutlass_mm(*mm, offsets, granularity, torch.bfloat16, fast) for fast in (False, True)]
    outs.append(G.fp8_grouped_mm(*mm, offsets, granularity, torch.bfloat16, fast_accum=True))
    pairs = [(out, ref) for out in outs]
    if granularity == "rowwise":  # tensorwise gradients are E5M2, which torch's kernel does not take
        ref_w = grouped_mm_wgrad_reference(*[t.cpu() for t in wgrad], offsets.cpu(), granularity, torch.float32)
        pairs.append((G._cutlass_wgrad(*wgrad, offsets, granularity, torch.bfloat16), ref_w))
    for out, want in pairs:
        out = out.float().cpu()
        err = ((out - want).norm() / want.norm()).item()
        assert torch.isfinite(out).all() and err < 4e-3, err  # bf16 output: 2^-9 per element at worst
        assert (out[want == 0] == 0).all()
    assert torch.equal(outs[1], outs[2])  # the dispatch takes CUTLASS


@pytest.mark.gpu
def test_blockwise_linear_matches_torchaos_on_gpu():
    from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear as TorchaoBlockwiseLinear

    torch.manual_seed(0)
    linear = nn.Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    ours, theirs = BlockwiseLinear.from_float(linear), TorchaoBlockwiseLinear.from_float(linear)
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1024, 384, device="cuda", dtype=torch.bfloat16)
    results = []
    for module in (ours, theirs):
        y = module(x)
        y.backward(dy)
        results.append((y.float(), x.grad.float(), linear.weight.grad.float()))
        x.grad = linear.weight.grad = None
    for got, want in zip(*results, strict=True):
        assert ((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("granularity", "ac"), [(g, "none") for g in GRANULARITIES] + [("tensorwise", "selective"), ("blockwise", "full")]
)
def test_compiled_fp8_experts_match_eager_on_gpu(fp8_config, granularity, ac):
    """Compiled, the FP8 MoE layer is as close to the bf16 layer (eager) as eager FP8 is, output and gradients.

    Not compiled against eager directly: inductor keeps SwiGLU and combine intermediates in fp32 where eager rounds
    them to bf16, which moves some FP8-rounded elements by one FP8 step, 1-5 % of the norm (measured on the CPU with
    torch 2.13, where aot_eager is bitwise). The wrong input gradient of torch 2.11 (docs/fp8.md) was 82 % off."""
    from models.parallel.compile import _checkpointed

    x = torch.randn(4, 256, fp8_config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for g, compiled in ((None, False), (granularity, False), (granularity, True)):
        torch._dynamo.reset()
        moe = _moe(fp8_config, g).cuda().to(torch.bfloat16)
        forward = moe.forward if ac == "none" else _checkpointed(moe.forward, selective=ac == "selective")
        fn = torch.compile(forward) if compiled else forward
        y, _ = fn(x)
        y.float().square().sum().backward()
        results.append((y.float(), x.grad.float(), moe.experts.w1.grad.float(), moe.gate.weight.grad.float()))
        x.grad = None
    ref, eager, compiled = results
    for r, e, c in zip(ref, eager, compiled, strict=True):
        err_eager, err_compiled = ((e - r).norm() / r.norm()).item(), ((c - r).norm() / r.norm()).item()
        assert err_eager < 0.15 and err_compiled < 1.25 * err_eager + 0.01, (err_eager, err_compiled)


@pytest.mark.gpu
def test_fp8_transpose_kernel_gives_the_bytes_of_a_transposed_copy_on_gpu():
    from models.parallel.fp8_quant import fp8_transpose

    for shape in [(3, 256, 384), (2, 100, 70), (1, 1, 130)]:  # tiles, and edges that are not
        q = (torch.randn(shape, device="cuda") * 50).to(E4M3)
        got = fp8_transpose(q)
        assert got.is_contiguous() and got.shape == (shape[0], shape[2], shape[1])
        assert torch.equal(got.view(torch.uint8), q.transpose(1, 2).contiguous().view(torch.uint8)), shape


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", GRANULARITIES)
def test_model_trains_natively_with_every_recipe_on_gpu(fp8_config, recipe):
    """torchao's dense FP8 linears + our FP8 experts in a compiled bf16 model: the loss follows bf16's."""
    from models.parallel.compile import compile_blocks
    from models.parallel.mixed_precision import MasterWeightAdamW, cast_parameters

    def train(fp8: FP8Config | None) -> list[float]:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = DeepSeekV3(fp8_config)
        if fp8 is not None:
            assert convert_to_fp8(model, fp8, device="cuda")
        model.to_empty(device="cuda")
        model.init_weights(buffer_device=torch.device("cuda"))
        cast_parameters(model, torch.bfloat16, keep_masters=True)  # bf16 parameters, fp32 masters (bench-1gpu's)
        opt = MasterWeightAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        compile_blocks(model)
        batch = torch.randint(0, 64, (8, 257), generator=torch.Generator().manual_seed(1)).cuda()
        losses = []
        for _ in range(8):
            out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.ce_loss.item())
        return losses

    if "bf16" not in _BF16_LOSSES:  # one bf16 reference for the three recipes
        _BF16_LOSSES["bf16"] = train(None)
    ref, got = _BF16_LOSSES["bf16"], train(FP8Config(recipe, experts=True))
    assert ref[-1] < 0.9 * ref[0]
    assert abs(got[-1] - ref[-1]) / ref[-1] < 0.03, (got, ref)


_BF16_LOSSES: dict[str, list[float]] = {}


# ----------------------------------------------------------------------------------------------- FSDP2 + EP
def _fp8_parallel_worker(rank: int, rdzv: str, config, ref: dict) -> None:  # noqa: ANN001
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from models.parallel.mesh import ParallelDims, submesh
    from models.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=2)
    try:
        mesh = ParallelDims(dp_shard=2, ep=2).resolve(2).build_mesh("cpu")
        with torch.device("meta"):
            model = DeepSeekV3(config)
        _quiet_convert(model, FP8Config("blockwise", experts=True))  # fp8 -> EP -> FSDP2, on the meta model
        parallelize(model, mesh, param_dtype=torch.float32)
        model.to_empty(device="cpu")
        model.init_weights()
        set_model_state_dict(model, dict(ref["state"]), options=StateDictOptions(full_state_dict=True))
        dp = submesh(mesh, "dp")
        batch = ref["batch"].chunk(2)[dp.get_local_rank()]
        out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        out.ce_loss.backward()
        loss = out.ce_loss.detach()
        dist.all_reduce(loss, group=dp.get_group())
        torch.testing.assert_close(loss / 2, ref["loss"], rtol=1e-5, atol=1e-5)
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            err = ((grad - ref["grads"][name]).norm() / ref["grads"][name].norm()).item()
            # The forward, the input gradients and the dense weight gradients quantise per row or per 128-token
            # tile that both layouts share: fp32 rounding apart. The experts' weight gradients sum over token groups
            # that EP assembles rank by rank, so their 1x128 tiles (and scales) differ: FP8 noise apart.
            assert err < (0.05 if ".experts." in name else 1e-4), (name, err)
    finally:
        dist.destroy_process_group()


def _fp8_all_gather_worker(rank: int, rdzv: str, config, state: dict, batch: torch.Tensor) -> None:  # noqa: ANN001
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from models.parallel.fp8 import precompute_fsdp_scales
    from models.parallel.mesh import ParallelDims, submesh
    from models.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdzv, rank=rank, world_size=2)
    try:
        mesh = ParallelDims(dp_shard=2, ep=2).resolve(2).build_mesh("cpu")
        models = []
        for fsdp in (True, False):  # FP8 all-gather, and the fp32 all-gather quantised after it
            with torch.device("meta"):
                model = DeepSeekV3(config)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert_to_fp8(model, FP8Config("tensorwise"), device="cpu", fsdp=fsdp)
            parallelize(model, mesh, param_dtype=torch.float32)
            model.to_empty(device="cpu")
            model.init_weights()
            set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))
            models.append(model)
        fp8_gather, plain = models
        wq = fp8_gather.layers[1].attn.wq_b.weight
        assert isinstance(wq, DTensor) and isinstance(wq._local_tensor, WeightWithDynamicFloat8CastTensor)
        assert not isinstance(plain.layers[1].attn.wq_b.weight._local_tensor, WeightWithDynamicFloat8CastTensor)
        local = batch.chunk(2)[submesh(mesh, "dp").get_local_rank()]

        def step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            model.zero_grad()
            out = model(local[:, :-1], labels=local[:, 1:], return_logits=False)
            out.ce_loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if isinstance(p.grad, DTensor)}
            return out.ce_loss.detach(), grads

        def check_equal() -> None:
            (loss_a, grads_a), (loss_b, grads_b) = step(fp8_gather), step(plain)
            torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
            for name, g in grads_a.items():
                torch.testing.assert_close(g, grads_b[name], rtol=1e-5, atol=1e-6, msg=name)

        check_equal()  # each weight's all-gather all-reduces its amax
        precompute_fsdp_scales(fp8_gather)  # one all-reduce for every weight's scale
        assert wq._local_tensor._precomputed_scale is not None
        torch.testing.assert_close(
            wq._local_tensor._precomputed_scale, torch.finfo(E4M3).max / wq.full_tensor().abs().amax()
        )
        check_equal()
        for model in models:  # new weights, then fresh scales
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5)
        precompute_fsdp_scales(fp8_gather)
        check_equal()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_tensorwise_fp8_all_gather_under_fsdp2_and_its_precomputed_scales_match_the_fp32_all_gather(
    tmp_path, fp8_config, one_thread
):
    """FSDP2 all-gathers tensorwise weights in FP8 (torchao's ``enable_fsdp_float8_all_gather``): the same numerics
    as all-gathering fp32 and quantising after, with each weight's amax all-reduced or all scales precomputed."""
    import torch.multiprocessing as mp

    config = DeepSeekV3Config.from_dict({**fp8_config.to_dict(), "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    model.init_weights()
    batch = torch.randint(0, config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    mp.start_processes(
        _fp8_all_gather_worker,
        args=(f"file://{tmp_path}/rdzv", config, model.state_dict(), batch),
        nprocs=2,
        join=True,
        start_method="fork",
    )


@pytest.mark.distributed
def test_fp8_experts_and_linears_under_fsdp2_and_ep_match_one_process(tmp_path, fp8_config, one_thread):
    import torch.multiprocessing as mp

    config = DeepSeekV3Config.from_dict({**fp8_config.to_dict(), "num_nextn_predict_layers": 0})
    with torch.device("meta"):
        model = DeepSeekV3(config)
    _quiet_convert(model, FP8Config("blockwise", experts=True))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    batch = torch.randint(0, config.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))  # 128 tokens/rank
    out = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
    out.ce_loss.backward()
    ref = {"state": model.state_dict(), "batch": batch, "loss": out.ce_loss.detach()}
    ref["grads"] = {n: p.grad for n, p in model.named_parameters()}
    mp.start_processes(
        _fp8_parallel_worker, args=(f"file://{tmp_path}/rdzv", config, ref), nprocs=2, join=True, start_method="fork"
    )
