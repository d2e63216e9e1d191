"""FP8 training: convert a built (meta) DeepSeekV3 so its linears and routed experts run FP8 GEMMs.

The DeepSeek-V3 report (section 3.3) runs the three GEMMs of every linear (forward, input gradient, weight
gradient) in FP8 and keeps the embedding, the output head, the MoE gate, the normalisations and the attention
operator in higher precision. Here:

- dense linears (MLA's projections, the dense and shared-expert MLPs, MTP's ``eh_proj``) become torchao's
  ``Float8Linear`` (``tensorwise``, ``rowwise``; token rows zero-padded to a multiple of 16 where they are not, as
  MTP's B * (S - k) rows) or ``BlockwiseLinear`` (``blockwise``: 1x128 activation tiles,
  128x128 weight blocks, as the report; torchao's ``Float8BlockwiseLinear`` numerics on this project's kernels);
- the routed experts become ``Float8GroupedExperts`` (this project's FP8 grouped GEMMs, same granularity);
- the head is excluded by name; the embedding, gate, norms and attention are not linears and are never touched.

The conversion keeps parameter names, so checkpoints load into either precision. It runs before
parallelisation (fp8 -> EP -> AC -> compile -> FSDP2) and allocates nothing.

On a CPU every recipe is emulated (quantise, dequantise, float32 matmul): the numerics of the GPU path, without its
speed, so a laptop run predicts the GPU run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from models.moe import GroupedExperts, compute_dtype
from models.parallel.fp8_experts import Float8GroupedExperts
from models.parallel.fp8_grouped_mm import fp8_blockwise_mm, fp8_grouped_mm, fp8_grouped_mm_wgrad, use_cublas_blockwise
from models.parallel.fp8_quant import (
    BLOCK,
    GRANULARITIES,
    quantize_act_dual,
    quantize_weight_dual,
)

FP8_RECIPES = GRANULARITIES
REPORT_EXCLUDED = ("head",)  # the output head (the embedding, gate, norms and attention are not linears)
_MIN_CAPABILITY = {"tensorwise": (8, 9), "rowwise": (8, 9), "blockwise": (9, 0)}
_DIM_MULTIPLE = {"tensorwise": 16, "rowwise": 16, "blockwise": BLOCK}


@dataclass
class FP8Config:
    """``model.fp8``: which FP8 recipe, for which modules.

    Attributes:
        recipe: ``tensorwise`` (one scale per tensor; torchao's default recipe), ``rowwise`` (one scale per row) or
            ``blockwise`` (the report's 1x128 activation tiles and 128x128 weight blocks).
        experts: Run the routed experts' grouped GEMMs in FP8 too (this project's Triton kernels). Off by default:
            on an H200 they are slower than bf16's grouped GEMMs for now (docs/fp8.md, "Speed").
        exclude: Module-name patterns (``fnmatch``: ``"layers.0.*"``, ``"*.wkv_a"``) kept in the compute dtype,
            on top of the report's exclusions.
    """

    recipe: str = "tensorwise"
    experts: bool = False
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.recipe not in FP8_RECIPES:
            raise ValueError(
                f"model.fp8.recipe must be one of {FP8_RECIPES} (or model.fp8: null for bf16), got {self.recipe!r}"
            )

    @classmethod
    def parse(cls, value: str | dict | FP8Config | None) -> FP8Config | None:
        """``model.fp8`` as given in a YAML or on the command line: a recipe name, a mapping, a config or None."""
        if value is None or isinstance(value, FP8Config):
            return value
        if isinstance(value, str):
            return cls(recipe=value)
        if dataclasses.is_dataclass(value):  # the same fields, from another import path (jsonargparse)
            value = dataclasses.asdict(value)
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in model.fp8; valid keys: recipe, experts, exclude")
        return cls(**value)


def check_device(recipe: str, device: torch.device) -> bool:
    """Whether ``device`` runs the recipe natively (False: emulated on the CPU, with one warning).

    Raises:
        ValueError: a CUDA GPU without FP8 tensor cores, or without what the recipe needs.
    """
    if device.type == "cpu":
        warnings.warn(
            f"model.fp8={recipe} on the CPU: every FP8 GEMM is emulated (quantise, dequantise, float32 matmul), "
            "with the GPU path's numerics and none of its speed",
            stacklevel=3,
        )
        return False
    if device.type != "cuda":
        raise ValueError(f"model.fp8={recipe} runs on CUDA GPUs (or emulated on the CPU), not on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    need = _MIN_CAPABILITY[recipe]
    if (major, minor) < need:
        raise ValueError(
            f"model.fp8={recipe} needs a GPU of compute capability >= {need[0]}.{need[1]} "
            f"({'Hopper' if need >= (9, 0) else 'Ada or Hopper'}); {torch.cuda.get_device_name(device)} is "
            f"{major}.{minor}: unset model.fp8 (bf16)" + (" or use tensorwise" if (major, minor) >= (8, 9) else "")
        )
    return True


def convert_to_fp8(
    model: nn.Module, config: FP8Config, device: torch.device | str | None = None, fsdp: bool = False
) -> list[str]:
    """Swap the model's linears and routed experts for FP8 ones, in place (meta or materialised parameters).

    Args:
        model: A DeepSeekV3 (or any module), before parallelisation.
        config: The recipe and the module filter.
        device: Where the model will run (default: the current default device); decides emulation and checks the
            GPU.
        fsdp: The model will be sharded with FSDP2: tensorwise weights are then all-gathered in FP8.

    Returns:
        The names of the converted modules. Shapes the recipe cannot take (a dimension not a multiple of 16, or of
        128 for blockwise) stay in the compute dtype, named in one warning.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    native = check_device(config.recipe, device)
    dense, experts, skipped = _select(model, config)
    if skipped:
        warnings.warn(
            f"model.fp8={config.recipe} keeps {len(skipped)} module(s) in the compute dtype, their shape is not a "
            f"multiple of {_DIM_MULTIPLE[config.recipe]}: {', '.join(skipped)}",
            stacklevel=2,
        )
    for name in experts:
        _set_submodule(model, name, Float8GroupedExperts(model.get_submodule(name), config.recipe))
    if config.recipe == "blockwise":
        for name in dense:
            _set_submodule(model, name, BlockwiseLinear.from_float(model.get_submodule(name)))
    elif dense:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        recipe = Float8LinearConfig.from_recipe_name(config.recipe)
        recipe = dataclasses.replace(
            recipe, emulate=not native, enable_fsdp_float8_all_gather=fsdp and config.recipe == "tensorwise"
        )
        chosen = set(dense)
        convert_to_float8_training(model, config=recipe, module_filter_fn=lambda _, fqn: fqn in chosen)
        _share_mm_config(model)
        _pad_token_rows(model)
        if config.recipe == "rowwise" and native:
            # As torchtitan does for torchao's rowwise recipe: inductor must round like eager in its casts
            # (pytorch/pytorch#150859), or compiled rowwise scales come out wrong.
            from torch._inductor import config as inductor_config

            inductor_config.emulate_precision_casts = True
    return sorted(dense + experts)


def precompute_fsdp_scales(model: nn.Module) -> None:
    """Refresh the FP8 all-gather scales of the FSDP2-sharded tensorwise weights, in one all-reduce; after each step.

    torchao's ``precompute_float8_dynamic_scale_for_fsdp``, called where torchtitan calls it: without it each
    weight's FP8 all-gather all-reduces its own amax, once per weight and micro-batch. A scale stays until the next
    call, so it must follow every change of the weights (``DeepSeekV3LitModule.optimizer_step`` calls it after each
    step). A no-op for models without such weights (other recipes, no FSDP2).
    """
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def _share_mm_config(model: nn.Module) -> None:
    """Give every ``Float8Linear`` the same ``linear_mm_config`` object (each builds an equal one of its own).

    The forward passes it to an autograd function. Under torch 2.11 a tensorwise run of 8 compiled blocks filled
    dynamo's recompile limit (8) in training and fell back to eager at the first validation; a guard on this
    per-module object's identity (one cache entry per layer) is the suspected cause, unconfirmed on that version
    (torch 2.13 makes no entry per layer either way). Equal values, so sharing one object changes nothing else.
    """
    from torchao.float8.float8_linear import Float8Linear

    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    for module in linears[1:]:
        if module.linear_mm_config == linears[0].linear_mm_config:
            module.linear_mm_config = linears[0].linear_mm_config


_TOKEN_MULTIPLE = 16  # torch._scaled_mm's: every GEMM dimension, the token count of the weight gradient included


def _pad_token_rows(model: nn.Module) -> None:
    """Make every torchao ``Float8Linear`` a ``RowPaddedFloat8Linear``: token counts not a multiple of 16 work.

    The weight gradient's GEMM sums over the tokens, and ``torch._scaled_mm`` refuses a dimension that is not a
    multiple of 16 (MTP depth k runs B * (S - k) tokens: B = 4, S = 4096 gives 16380).
    """
    from torchao.float8.float8_linear import Float8Linear

    for module in model.modules():
        if type(module) is Float8Linear:
            module.__class__ = row_padded_float8_linear()


@functools.cache
def row_padded_float8_linear() -> type:
    """The ``RowPaddedFloat8Linear`` class (built on first use: torchao is imported only when FP8 is on)."""
    from torchao.float8.float8_linear import Float8Linear

    class RowPaddedFloat8Linear(Float8Linear):
        """torchao's ``Float8Linear``, its input's rows padded with zeros to a multiple of 16 when they are not.

        Exact: a zero row changes no amax (so no scale), its output row is dropped and it adds nothing to the
        weight gradient. Inputs whose row count is already a multiple of 16 (the main blocks') are not copied.
        """

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            rows = input.numel() // input.shape[-1]
            pad = -rows % _TOKEN_MULTIPLE
            if pad == 0:
                return super().forward(input)
            x = torch.nn.functional.pad(input.reshape(rows, input.shape[-1]), (0, 0, 0, pad))
            return super().forward(x)[:rows].reshape(*input.shape[:-1], -1)

    return RowPaddedFloat8Linear


def _select(model: nn.Module, config: FP8Config) -> tuple[list[str], list[str], list[str]]:
    """(dense linears, grouped experts, skipped for their shape) that the recipe and filter convert."""
    excluded = list(REPORT_EXCLUDED) + list(config.exclude)
    multiple = _DIM_MULTIPLE[config.recipe]
    dense, experts, skipped = [], [], []
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded):
            continue
        if type(module) is nn.Linear:
            fits = module.in_features % multiple == 0 and module.out_features % multiple == 0
            # torchao's blockwise linear takes no bias (this model's linears have none)
            (dense if fits and (module.bias is None or config.recipe != "blockwise") else skipped).append(name)
        elif type(module) is GroupedExperts and config.experts:
            dims = module.w1.shape[1:]
            (experts if all(d % multiple == 0 for d in dims) else skipped).append(name)
    return dense, experts, skipped


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------------------------- blockwise linear
class _BlockwiseLinear(torch.autograd.Function):
    """y = x w^T with the report's blockwise FP8 numerics: on a Hopper GPU with CUDA >= 12.9 on cuBLAS's blockwise
    GEMM (``fp8_blockwise_mm``, where the sum's 128-blocks are a multiple of 4), otherwise the grouped kernels with one
    group.

    Forward and input gradient: x and dy in 1x128 tiles along the sum, w in 128x128 blocks (one quantisation serves
    w and w^T). Weight gradient: dy^T and x^T in 1x128 tiles along the tokens it sums over. The backward keeps x^T in
    FP8. Rows are padded to a multiple of 128 with zeros (exact: zero rows add nothing). The same numerics as
    torchao's ``Float8BlockwiseLinear``, but every GEMM a custom op and every quantisation plain PyTorch, so a
    compiled block has no graph break (torchao 0.18's breaks at each ``F.scaled_mm`` under torch 2.11).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
        x_MK = _pad_rows(x.reshape(-1, x.shape[-1]))
        offsets = torch.full((1,), x_MK.shape[0], dtype=torch.int32, device=x.device)  # one group: every row
        wq, wq_t = quantize_weight_dual(weight.unsqueeze(0))  # (1, N, K) and (1, K, N): one read of w
        xq, xq_t = quantize_act_dual(x_MK)
        if use_cublas_blockwise(x_MK, x_MK.shape[1]):
            y = fp8_blockwise_mm(*xq, wq[0][0], wq[1][0], dtype)
        else:
            y = fp8_grouped_mm(*xq, *wq, offsets, "blockwise", dtype)
        ctx.save_for_backward(offsets, *xq_t, *wq_t)
        ctx.rows, ctx.weight_dtype = x.reshape(-1, x.shape[-1]).shape[0], weight.dtype
        return y[: ctx.rows].reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        offsets, xq_t, sx_t, wq_t, sw_t = ctx.saved_tensors
        dy_MN = _pad_rows(dy.reshape(-1, dy.shape[-1]))
        g = "blockwise"
        dyq, dyq_t = quantize_act_dual(dy_MN)
        if use_cublas_blockwise(dy_MN, dy_MN.shape[1]):
            dx = fp8_blockwise_mm(*dyq, wq_t[0], sw_t[0], dy.dtype)[: ctx.rows]
        else:
            dx = fp8_grouped_mm(*dyq, wq_t, sw_t, offsets, g, dy.dtype)[: ctx.rows]
        if use_cublas_blockwise(dy_MN, dy_MN.shape[0]):
            dw = fp8_blockwise_mm(*dyq_t, xq_t, sx_t, ctx.weight_dtype)
        else:
            dw = fp8_grouped_mm_wgrad(*dyq_t, xq_t, sx_t, offsets, g, ctx.weight_dtype)[0]
        return dx.reshape(*dy.shape[:-1], -1), dw, None


def _pad_rows(x_MK: torch.Tensor) -> torch.Tensor:
    pad = -x_MK.shape[0] % BLOCK
    return torch.nn.functional.pad(x_MK, (0, 0, 0, pad)) if pad else x_MK


class BlockwiseLinear(nn.Linear):
    """``nn.Linear`` under the blockwise FP8 recipe (``_BlockwiseLinear``); on a CPU its GEMMs are emulated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return _BlockwiseLinear.apply(x.to(dtype), self.weight, dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> BlockwiseLinear:
        """A bias-free ``nn.Linear`` with in/out features multiples of 128, reusing its weight Parameter."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        return new
