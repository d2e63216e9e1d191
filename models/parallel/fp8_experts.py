"""Routed experts with FP8 grouped GEMMs in the forward and both backward products.

``Float8GroupedExperts`` replaces a ``GroupedExperts`` (same parameters, same names) and runs its SwiGLU as

    a13 = x @ [w1; w3]^T,  h = silu(a1) * a3,  y = h @ w2^T                      (forward, 2 FP8 GEMMs)
    dh = dy @ w2,  dw2 = dy^T h,  da13 = SwiGLU'(a13) dh,  dx = da13 @ [w1; w3],  dw13 = da13^T x   (backward, 4)

with every GEMM operand quantised to FP8 (``models.parallel.fp8_quant``) and multiplied by
``models.parallel.fp8_grouped_mm``. Tensorwise and rowwise quantise in plain PyTorch, which ``torch.compile`` fuses
into the producers (the permutation, the SwiGLU and its gradient) inside a compiled block; blockwise quantises each
operand both ways in one cast-transpose kernel (``quantize_act_dual``), which computes the SwiGLU (for h) and its
gradient (for da13) itself, so neither is written in the compute dtype. The GEMMs are custom ops. The
backward keeps FP8 copies of its GEMM operands (x^T, h^T and the transposed weights) instead of their bf16
originals, as the report caches activations in FP8 (section 3.3.3); the SwiGLU inputs a13 stay in the compute dtype.

The two forward GEMMs accumulate without promotion where torch's CUTLASS kernel runs them (``fast_accum``: E4M3
operands of the tensorwise and rowwise recipes), the convention of torchao's ``Float8Linear`` for its output GEMM,
and the four backward GEMMs with promotion every 128 elements; blockwise (the report's recipe) promotes in all six.

Gradients are E4M3 (the report: E4M3 on all tensors) with the recipe's scales, except under tensorwise scaling,
where one scale per tensor needs E5M2's range (torchao's tensorwise convention). There the input-gradient GEMMs
quantise their gradient operand per row instead, in E4M3: a finer scale, and the E4M3 x E4M3 product torch's CUTLASS
grouped GEMM takes (``fp8_grouped_mm``: row scales of the gradient against the weight's scale per expert); the
weight gradients keep one E5M2 scale per tensor.

Shapes: N token copies (rows grouped by expert, each group padded to 128 rows), D model dim, F expert hidden dim,
E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.moe import GroupedExperts, _local, compute_dtype
from models.parallel.fp8_grouped_mm import fp8_grouped_mm, fp8_grouped_mm_wgrad
from models.parallel.fp8_quant import (
    BLOCK,
    E4M3,
    E5M2,
    quantize_act,
    quantize_act_dual,
    quantize_act_t,
    quantize_swiglu_dual,
    quantize_swiglu_grad_dual,
    quantize_weight,
    quantize_weight_dual,
    quantize_weight_t,
    swiglu_backward,
)


class _Float8SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EFD, w2_EDF, w3_EFD, offsets_E, granularity):  # noqa: ANN001, ANN205
        dtype = x_ND.dtype
        # x and h quantised for their GEMM here and transposed for the weight gradients (FP8 copies for the backward);
        # the weights for the forward GEMMs and transposed for the input gradients.
        (xq, sx), x_t = _quantize_both(x_ND, granularity, offsets_E)
        (w13q, sw13), w13_t = _quantize_weight_both(w1_EFD, w3_EFD, granularity)
        a13_N2F = fp8_grouped_mm(xq, sx, w13q, sw13, offsets_E, granularity, dtype, fast_accum=True)
        if granularity == "blockwise":  # h = silu(a1) * a3 inside the quantising kernel, never written in bf16
            (hq, sh), h_t = quantize_swiglu_dual(a13_N2F)
        else:
            a1_NF, a3_NF = a13_N2F.chunk(2, dim=-1)
            (hq, sh), h_t = _quantize_both(F.silu(a1_NF) * a3_NF, granularity, offsets_E)
        (w2q, sw2), w2_t = _quantize_weight_both(w2_EDF, None, granularity)
        y_ND = fp8_grouped_mm(hq, sh, w2q, sw2, offsets_E, granularity, dtype, fast_accum=True)
        saved = (*x_t, *h_t, *w13_t, *w2_t)
        ctx.save_for_backward(a13_N2F, offsets_E, *saved)
        ctx.granularity, ctx.weight_dtype = granularity, w1_EFD.dtype
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):  # noqa: ANN001, ANN205
        a13_N2F, offsets_E, xq_t, sx_t, hq_t, sh_t, w13q_t, sw13_t, w2q_t, sw2_t = ctx.saved_tensors
        g, dtype, wdtype = ctx.granularity, a13_N2F.dtype, ctx.weight_dtype
        dy, dy_t = _quantize_both(dy_ND.to(dtype), g, offsets_E, gradient=True)
        dh_NF = _input_gradient(*dy, w2q_t, sw2_t, offsets_E, g, dtype)
        dw2_EDF = fp8_grouped_mm_wgrad(*dy_t, hq_t, sh_t, offsets_E, g, wdtype)
        if g == "blockwise":  # the SwiGLU gradient inside the quantising kernel
            da13, da13_t = quantize_swiglu_grad_dual(a13_N2F, dh_NF)
        else:
            da13, da13_t = _quantize_both(swiglu_backward(a13_N2F, dh_NF), g, offsets_E, gradient=True)
        dx_ND = _input_gradient(*da13, w13q_t, sw13_t, offsets_E, g, dtype)
        # dw1 and dw3 from da1^T and da3^T, each GEMM writing its own contiguous gradient: the halves of one dw13
        # are strided views, which autograd copies into contiguous .grad tensors (two strided copies of an expert
        # weight per layer, 0.46 ms each at bench-1gpu on an H100).
        dw1_EFD, dw3_EFD = (
            fp8_grouped_mm_wgrad(q_t, s_t, xq_t, sx_t, offsets_E, g, wdtype) for q_t, s_t in _halves_t(*da13_t, g)
        )
        return dx_ND, dw1_EFD, dw2_EDF, dw3_EFD, None, None


def _quantize_both(t_NK: torch.Tensor, granularity: str, offsets_E: torch.Tensor, gradient: bool = False) -> tuple:
    """t's two FP8 forms: ``(q, s)`` for the GEMM over its columns and ``(q_t, s_t)``, transposed, for the weight
    gradient over its rows. Blockwise: both from one read of t (``quantize_act_dual``). A tensorwise gradient: per
    row in E4M3 for the input gradient, one E5M2 scale for the weight gradient (see the module docstring)."""
    if granularity == "blockwise":
        return quantize_act_dual(t_NK)
    tensorwise_gradient = gradient and granularity == "tensorwise"
    q = quantize_act(t_NK, "rowwise" if tensorwise_gradient else granularity, E4M3)
    return q, quantize_act_t(t_NK, granularity, offsets_E, E5M2 if tensorwise_gradient else E4M3)


def _quantize_weight_both(w_ENK: torch.Tensor, w2_ENK: torch.Tensor | None, granularity: str) -> tuple:
    """w's two FP8 forms (w = cat(w, w2) along N when w2 is given): ``(q, s)`` for the forward GEMM and
    ``(q_t, s_t)``, transposed, for the input gradient. Blockwise: both from one read (``quantize_weight_dual``)."""
    if granularity == "blockwise":
        return quantize_weight_dual(w_ENK, w2_ENK)
    w = w_ENK if w2_ENK is None else torch.cat((w_ENK, w2_ENK), dim=1)
    q = quantize_weight(w, granularity)
    return q, quantize_weight_t(w, granularity, quantized=q)


def _halves_t(q_t: torch.Tensor, s_t: torch.Tensor, granularity: str) -> tuple:
    """The FP8 transposed forms of the two halves [t1, t2] of t (N, 2F) from t's: (q_t, s_t) of t1 and of t2. q_t
    is (2F, N), so each half is a contiguous block of rows; so are the scales of each (tensorwise: one for both)."""
    f = q_t.shape[0] // 2
    if granularity == "tensorwise":
        return (q_t[:f], s_t), (q_t[f:], s_t)
    if granularity == "rowwise":  # (E, 2F): per expert and column of t
        return (q_t[:f], s_t[:, :f].contiguous()), (q_t[f:], s_t[:, f:].contiguous())
    return (q_t[:f], s_t[:f]), (q_t[f:], s_t[f:])  # blockwise: (2F, N/128)


def _input_gradient(dq, sd, wq_t_EIO, sw_t, offsets_E, g: str, out_dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """dout @ w per expert, from dout's FP8 form (``_quantize_both``) and w^T's FP8 copy (E, I, O); under
    tensorwise the gradient is per row, so the weight's scale per expert is spread over its rows."""
    if g == "tensorwise":
        g, sw_t = "rowwise", sw_t[:, None].expand(-1, wq_t_EIO.shape[1])
    return fp8_grouped_mm(dq, sd, wq_t_EIO, sw_t, offsets_E, g, out_dtype)


class Float8GroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose grouped GEMMs run in FP8 (forward and backward); takes over the given parameters.

    Args:
        experts: The module to replace (meta or materialised); its ``w1``/``w2``/``w3`` are reused as they are.
        granularity: ``tensorwise``, ``rowwise`` or ``blockwise`` (see ``models.parallel.fp8_quant``).
    """

    group_alignment = BLOCK  # MoE.routed starts every expert's rows at a multiple of this

    def __init__(self, experts: GroupedExperts, granularity: str) -> None:
        torch.nn.Module.__init__(self)
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.granularity = granularity

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Same contract as ``GroupedExperts.forward``; groups must start at multiples of ``group_alignment``."""
        # The weights are quantised from their own dtype (fp32 masters under autocast): no bf16 copy is made.
        # Under expert parallelism they are DTensors: this rank's experts, as GroupedExperts.forward takes them.
        x_ND = x_ND.to(compute_dtype(x_ND))
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        return _Float8SwiGLU.apply(x_ND, w1, w2, w3, offsets_E, self.granularity)

    def extra_repr(self) -> str:
        return f"granularity={self.granularity}"
