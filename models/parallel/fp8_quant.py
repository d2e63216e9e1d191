"""FP8 quantisation in plain PyTorch: the scales of every recipe, and the emulated (quantise-dequantise) reference.

A quantised tensor is a pair ``(q, s)``: ``q`` in float8 and ``s`` the float32 dequantisation multiplier of each
block, ``x ~= q * s``, with ``s = amax(|block|) / fp8_max`` (dynamic scaling: no history). The same functions
quantise on the CPU and on the GPU, where ``torch.compile`` fuses them into the producing kernels; the GPU grouped
GEMMs (``fp8_grouped_mm``) only multiply what these produce, and are tested against ``dequantize`` + a float32
matmul.

Granularities (``block``: the block size along each dimension; a dimension's full size = one block along it):

- ``tensorwise``: one scale per tensor (per expert for stacked expert weights).
- ``rowwise``: one scale per row along the contraction dimension (per output row of a weight).
- ``blockwise``, DeepSeek-V3 report section 3.3.2: 1x128 tiles for activations and activation gradients, 128x128
  blocks for weights. The weight gradient's operands are tiled 1x128 along the tokens it sums over (the report:
  128x128 blocks for activation gradients diverged).

Shapes: M rows (tokens), K the contraction dimension, N output features, E experts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # Triton exists where CUDA does
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
BLOCK = 128  # the report's tile width
GRANULARITIES = ("tensorwise", "rowwise", "blockwise")
_EPS = 1e-12  # an all-zero block gets a tiny scale and quantises to zeros


def quantize(x: torch.Tensor, block: tuple[int, ...], dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` with one scale per block.

    Args:
        x: Any floating tensor; each dimension must be a multiple of its block size.
        block: Block size along each dimension of ``x``.
        dtype: ``float8_e4m3fn`` or ``float8_e5m2``.

    Returns:
        ``q`` (x's shape, ``dtype``) and ``s`` (float32, shape ``x.shape[i] // block[i]``).
    """
    if any(n % b for n, b in zip(x.shape, block, strict=True)):
        raise ValueError(f"shape {tuple(x.shape)} is not a multiple of the block {block}")
    fp8_max = torch.finfo(dtype).max
    blocked = x.reshape([d for n, b in zip(x.shape, block, strict=True) for d in (n // b, b)])
    inner = tuple(range(1, blocked.ndim, 2))
    inv_s = fp8_max / blocked.abs().amax(dim=inner, keepdim=True).float().clamp(min=_EPS)  # as torchao's kernels
    q = (blocked.float() * inv_s).clamp(-fp8_max, fp8_max).to(dtype)
    # Contiguous even for a transposed x (elementwise ops would keep its strides): the GEMMs read q row by row.
    q = q.reshape(x.shape).contiguous()
    return q, inv_s.reciprocal().reshape([n // b for n, b in zip(x.shape, block, strict=True)])


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 ``q * s``: each scale spread over its block.

    ``s`` has q's dimensions (block counts ``q.shape[i] // block[i]``), or fewer, trailing dimensions of one block
    left out: the scales ``quantize_act``/``quantize_weight`` return.
    """
    s = s.reshape(s.shape + (1,) * (q.ndim - s.ndim))
    for dim in range(q.ndim):
        if s.shape[dim] != q.shape[dim]:
            s = s.repeat_interleave(q.shape[dim] // s.shape[dim], dim=dim)
    return q.float() * s


def quantize_act(x_MK: torch.Tensor, granularity: str, dtype: torch.dtype = E4M3):
    """(M, K) activation for a GEMM over K: ``(q_MK, s)``, s of shape (1,), (M,) or (M, K/128)."""
    m, k = x_MK.shape
    block = {"tensorwise": (m, k), "rowwise": (1, k), "blockwise": (1, BLOCK)}[granularity]
    q, s = quantize(x_MK, block, dtype)
    return q, s.reshape(1) if granularity == "tensorwise" else _drop_unit_blocks(s, granularity)


def quantize_weight(w_ENK: torch.Tensor, granularity: str, dtype: torch.dtype = E4M3):
    """Stacked (E, N, K) weights for a GEMM over K: ``(q_ENK, s)``, s of shape (E,), (E, N) or (E, N/128, K/128)."""
    _, n, k = w_ENK.shape
    block = {"tensorwise": (1, n, k), "rowwise": (1, 1, k), "blockwise": (1, BLOCK, BLOCK)}[granularity]
    q, s = quantize(w_ENK, block, dtype)
    return q, s.reshape(-1) if granularity == "tensorwise" else _drop_unit_blocks(s, granularity)


def _drop_unit_blocks(s: torch.Tensor, granularity: str) -> torch.Tensor:
    # rowwise: the contraction dimension is one block: (M, 1) -> (M,), (E, N, 1) -> (E, N).
    return s.squeeze(-1) if granularity == "rowwise" else s


def expert_of_rows(offsets_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) int64 expert of each row given cumulative group ends; E for rows past the last group."""
    rows = torch.arange(n_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, rows, right=True)


def quantize_act_t(x_MK: torch.Tensor, granularity: str, offsets_E: torch.Tensor, dtype: torch.dtype = E4M3):
    """x^T as the operand of a weight gradient, which sums over the M rows of each expert's group.

    Returns ``(q_KM, s)``, q contiguous in M, with scales constant along M inside a group: s of shape (1,) for
    tensorwise, (E, K) for rowwise (per expert and column) and (K, M/128) for blockwise (1x128 tiles along M).
    Groups start at multiples of 128 rows (``MoE.routed`` pads them).
    """
    m, k = x_MK.shape
    if granularity == "tensorwise":
        q, s = quantize_act(x_MK, granularity, dtype)
        return fp8_transpose(q.unsqueeze(0))[0], s
    if granularity == "blockwise":
        q, s = quantize(x_MK.t(), (1, BLOCK), dtype)
        return q.contiguous(), s
    # rowwise: amax per 128-row tile, then per expert over its tiles (groups are whole tiles).
    n_experts = offsets_E.numel()
    tile_amax = x_MK.reshape(m // BLOCK, BLOCK, k).abs().amax(dim=1).float()  # (M/128, K)
    tile_expert = expert_of_rows(offsets_E, m)[::BLOCK]
    amax_EK = tile_amax.new_zeros(n_experts + 1, k).scatter_reduce_(
        0, tile_expert[:, None].expand(-1, k), tile_amax, "amax"
    )[:n_experts]
    fp8_max = torch.finfo(dtype).max
    inv_s_EK = fp8_max / amax_EK.clamp(min=_EPS)
    inv_s_MK = torch.cat((inv_s_EK, inv_s_EK.new_ones(1, k)))[expert_of_rows(offsets_E, m)]  # rows past the groups: 1
    q = (x_MK.float() * inv_s_MK).clamp(-fp8_max, fp8_max).to(dtype)
    return q.t().contiguous(), inv_s_EK.reciprocal()


def quantize_act_dual(x_MK: torch.Tensor, dtype: torch.dtype = E4M3):
    """Both blockwise FP8 forms of an (M, K) activation from one read of it: ``(q_MK, s)`` in 1x128 tiles along K
    (``quantize_act(x, "blockwise")``: the GEMM over K) and ``(q_KM, s_t)`` in 1x128 tiles along M, transposed
    (``quantize_act_t(x, "blockwise", ...)``: the weight gradient over M). M and K multiples of 128.

    Hopper's FP8 tensor cores read both operands contiguous along the sum, so the weight gradient needs x^T in
    memory; on the GPU one Triton kernel quantises each 128x128 tile of x both ways and writes the transposed copy
    through shared memory (what TransformerEngine calls cast-transpose). Inductor, given the two quantisations as
    PyTorch, writes the transposed copy from registers (a strided store per element) in kernels of their own.
    """
    q, s, q_t, s_t = fp8_quantize_dual(x_MK, dtype)
    return (q, s), (q_t, s_t)


@torch.library.custom_op("dsv3::fp8_quantize_dual", mutates_args=())
def fp8_quantize_dual(
    x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_act_dual`` as one op: q (M, K), s (M, K/128), q_t (K, M), s_t (K, M/128); the same bytes as
    ``quantize(x, (1, 128))`` and ``quantize(x.t(), (1, 128))`` (the CPU path, and the kernel's reference)."""
    if x.is_cuda and triton is not None:
        return _launch_dual(x, dtype)
    q, s = quantize(x, (1, BLOCK), dtype)
    q_t, s_t = quantize(x.t(), (1, BLOCK), dtype)
    return q, s, q_t, s_t


def _fake_dual(like: torch.Tensor, m: int, k: int, dtype: torch.dtype) -> tuple:
    """The four outputs' shapes, for (M, K) quantised both ways."""
    scale = functools.partial(like.new_empty, dtype=torch.float32)
    return (
        like.new_empty(m, k, dtype=dtype),
        scale(m, k // BLOCK),
        like.new_empty(k, m, dtype=dtype),
        scale(k, m // BLOCK),
    )


@fp8_quantize_dual.register_fake
def _(x, dtype):  # noqa: ANN001, ANN202
    return _fake_dual(x, *x.shape, dtype)


def _launch_dual(x: torch.Tensor, dtype: torch.dtype, prologue: int = 0, dh: torch.Tensor | None = None):  # noqa: ANN202
    """The kernel on x (prologue 0), on the SwiGLU of a13 = x (1) or on its gradient for dh (2); q is (M, K) with
    K = x's width, its half (1) or its width (2)."""
    m, k = x.shape[0], x.shape[1] // 2 if prologue == 1 else x.shape[1]
    if m % BLOCK or k % BLOCK or (prologue == 2 and k % (2 * BLOCK)):
        raise ValueError(f"shape {tuple(x.shape)} is not a multiple of the block ({BLOCK}, {BLOCK}) (halves too)")
    x = x.contiguous()
    dh = x if dh is None else dh.contiguous()
    q, s = x.new_empty(m, k, dtype=dtype), x.new_empty(m, k // BLOCK, dtype=torch.float32)
    q_t, s_t = x.new_empty(k, m, dtype=dtype), x.new_empty(k, m // BLOCK, dtype=torch.float32)
    grid = (m // BLOCK, k // BLOCK)
    _quantize_dual_kernel[grid](
        x, dh, q, s, q_t, s_t, m, k, x.shape[1], torch.finfo(dtype).max,
        PROLOGUE=prologue, EPS=_EPS, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return q, s, q_t, s_t


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def swiglu(a13_N2F: torch.Tensor) -> torch.Tensor:
    """silu(a1) * a3 of a13 = [a1, a3] (N, 2F), computed in float32 (or float64) and rounded once to a13's dtype."""
    a1, a3 = (_at_least_fp32(a) for a in a13_N2F.chunk(2, dim=-1))
    return (F.silu(a1) * a3).to(a13_N2F.dtype)


def swiglu_backward(a13_N2F: torch.Tensor, dh_NF: torch.Tensor) -> torch.Tensor:
    """d(silu(a1) * a3) for dh, as (N, 2F) [da1, da3], computed in float32 (or float64), rounded once to a13's dtype."""
    a1, a3 = (_at_least_fp32(a) for a in a13_N2F.chunk(2, dim=-1))
    dh = _at_least_fp32(dh_NF)
    sig = torch.sigmoid(a1)
    da1 = dh * a3 * sig * (1 + a1 * (1 - sig))
    da3 = dh * a1 * sig
    return torch.cat((da1, da3), dim=-1).to(a13_N2F.dtype)


def quantize_swiglu_dual(a13_N2F: torch.Tensor, dtype: torch.dtype = E4M3):
    """``quantize_act_dual(swiglu(a13))`` with the SwiGLU inside the kernel on the GPU: h = silu(a1) * a3 is never
    written in the compute dtype (it is the FP8 experts' second GEMM operand, and the backward keeps only its FP8
    copy). Same rounding as ``swiglu`` (float32, rounded once to a13's dtype); ``torch.sigmoid`` and Triton's may
    differ in the last bit, so the GPU kernel's h can differ from ``swiglu``'s by one step of a13's dtype."""
    q, s, q_t, s_t = fp8_quantize_swiglu_dual(a13_N2F, dtype)
    return (q, s), (q_t, s_t)


def quantize_swiglu_grad_dual(a13_N2F: torch.Tensor, dh_NF: torch.Tensor, dtype: torch.dtype = E4M3):
    """``quantize_act_dual(swiglu_backward(a13, dh))``, the SwiGLU gradient computed inside the kernel on the GPU
    (da13 is never written in the compute dtype). F a multiple of 128."""
    q, s, q_t, s_t = fp8_quantize_swiglu_grad_dual(a13_N2F, dh_NF, dtype)
    return (q, s), (q_t, s_t)


@torch.library.custom_op("dsv3::fp8_quantize_swiglu_dual", mutates_args=())
def fp8_quantize_swiglu_dual(
    a13: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_swiglu_dual`` as one op: the four tensors of ``fp8_quantize_dual(swiglu(a13))``."""
    if a13.is_cuda and triton is not None:
        return _launch_dual(a13, dtype, prologue=1)
    return fp8_quantize_dual(swiglu(a13), dtype)


@fp8_quantize_swiglu_dual.register_fake
def _(a13, dtype):  # noqa: ANN001, ANN202
    return _fake_dual(a13, a13.shape[0], a13.shape[1] // 2, dtype)


@torch.library.custom_op("dsv3::fp8_quantize_swiglu_grad_dual", mutates_args=())
def fp8_quantize_swiglu_grad_dual(
    a13: torch.Tensor, dh: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_swiglu_grad_dual`` as one op: the four tensors of ``fp8_quantize_dual(swiglu_backward(a13, dh))``."""
    if a13.is_cuda and triton is not None:
        return _launch_dual(a13, dtype, prologue=2, dh=dh)
    return fp8_quantize_dual(swiglu_backward(a13, dh), dtype)


@fp8_quantize_swiglu_grad_dual.register_fake
def _(a13, dh, dtype):  # noqa: ANN001, ANN202
    return _fake_dual(a13, a13.shape[0], a13.shape[1], dtype)


def quantize_weight_dual(w_ENK: torch.Tensor, w2_ENK: torch.Tensor | None = None, dtype: torch.dtype = E4M3):
    """Blockwise stacked weights (E, N, K) and their transposes from one read: ``(q_ENK, s)`` of
    ``quantize_weight(w, "blockwise")`` and ``(q_EKN, s_t)`` of ``quantize_weight_t(w, "blockwise")`` (a 128x128
    block and its transpose share a scale). With ``w2_ENK`` (E, N2, K): the same for ``torch.cat((w, w2), 1)``,
    without the concatenated copy (the experts' [w1; w3]). On the GPU one Triton kernel per weight, the transposed
    copy written through shared memory; elsewhere (and as its reference) the two PyTorch functions."""
    q, s, q_t, s_t = fp8_quantize_weight_dual(w_ENK, w2_ENK, dtype)
    return (q, s), (q_t, s_t)


@torch.library.custom_op("dsv3::fp8_quantize_weight_dual", mutates_args=())
def fp8_quantize_weight_dual(
    w: torch.Tensor, w2: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_weight_dual`` as one op: q (E, N, K), s (E, N/128, K/128), q_t (E, K, N), s_t (E, K/128, N/128)."""
    if w.is_cuda and triton is not None:
        return _launch_weight_dual(w, w2, dtype)
    w = w if w2 is None else torch.cat((w, w2), dim=1)
    q, s = quantize_weight(w, "blockwise", dtype)
    # quantize_weight_t's bytes; s^T copied even where it is s's layout (an op's outputs may not alias each other)
    return q, s, fp8_transpose(q), s.transpose(1, 2).clone(memory_format=torch.contiguous_format)


@fp8_quantize_weight_dual.register_fake
def _(w, w2, dtype):  # noqa: ANN001, ANN202
    e, n, k = w.shape[0], w.shape[1] + (0 if w2 is None else w2.shape[1]), w.shape[2]
    scale = functools.partial(w.new_empty, dtype=torch.float32)
    q, q_t = w.new_empty(e, n, k, dtype=dtype), w.new_empty(e, k, n, dtype=dtype)
    return q, scale(e, n // BLOCK, k // BLOCK), q_t, scale(e, k // BLOCK, n // BLOCK)


def _launch_weight_dual(w: torch.Tensor, w2: torch.Tensor | None, dtype: torch.dtype):  # noqa: ANN202
    e, n_a, k = w.shape
    n = n_a + (0 if w2 is None else w2.shape[1])
    if n_a % BLOCK or n % BLOCK or k % BLOCK:
        raise ValueError(f"weight shapes {tuple(w.shape)} (+ {n - n_a} rows) are not multiples of ({BLOCK}, {BLOCK})")
    w = w.contiguous()
    w2 = w if w2 is None else w2.to(w.dtype).contiguous()
    q, q_t = w.new_empty(e, n, k, dtype=dtype), w.new_empty(e, k, n, dtype=dtype)
    s = w.new_empty(e, n // BLOCK, k // BLOCK, dtype=torch.float32)
    s_t = w.new_empty(e, k // BLOCK, n // BLOCK, dtype=torch.float32)
    grid = (n // BLOCK, k // BLOCK, e)
    _quantize_weight_dual_kernel[grid](
        w, w2, q, s, q_t, s_t, n_a, n, k, torch.finfo(dtype).max,
        LOAD_T=w.dtype == torch.float32, EPS=_EPS, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return q, s, q_t, s_t


def quantize_weight_t(w_ENK: torch.Tensor, granularity: str, dtype: torch.dtype = E4M3, quantized=None):  # noqa: ANN001
    """w^T (E, K, N) for the GEMM that contracts over N (the input gradient): ``(q_EKN, s)``.

    ``quantized``: w's own ``quantize_weight(w_ENK, granularity, dtype)``. Tensorwise and blockwise then transpose it
    (one scale per expert, or 128x128 blocks, are the same blocks in w^T: the same bytes, without reading w again);
    rowwise re-quantises (w^T's rows are w's columns).
    """
    if quantized is not None and granularity != "rowwise":
        q, s = quantized
        return fp8_transpose(q), s if granularity == "tensorwise" else s.transpose(1, 2).contiguous()
    return quantize_weight(w_ENK.transpose(1, 2), granularity, dtype)


@torch.library.custom_op("dsv3::fp8_transpose", mutates_args=())
def fp8_transpose(q: torch.Tensor) -> torch.Tensor:
    """(E, N, K) -> (E, K, N), contiguous: the bytes of ``q.transpose(1, 2).contiguous()``.

    A custom op so that ``torch.compile`` does not fuse the transposed write into the quantising kernel: fused,
    inductor wrote q and q^T of a bench-1gpu expert weight (64 x 2816 x 2048) in one 3.6 ms kernel on an H200 (about
    0.4 TB/s). On a GPU a tiled Triton copy.
    """
    if q.is_cuda and triton is not None:
        return _launch_transpose(q)
    return q.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # a copy even where N or K is 1


@fp8_transpose.register_fake
def _(q):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1])


def _launch_transpose(q: torch.Tensor) -> torch.Tensor:
    e, n, k = q.shape
    q = q.contiguous()
    out = torch.empty(e, k, n, device=q.device, dtype=q.dtype)
    tile = 64
    grid = (triton.cdiv(n, tile), triton.cdiv(k, tile), e)
    _transpose_kernel[grid](q.view(torch.uint8), out.view(torch.uint8), n, k, TILE=tile, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _transpose_kernel(x_ptr, y_ptr, N, K, TILE: tl.constexpr):
        """One TILE x TILE tile of x (E, N, K) into y (E, K, N), bytes; the transpose goes through shared memory."""
        rn = tl.program_id(0) * TILE + tl.arange(0, TILE)
        rk = tl.program_id(1) * TILE + tl.arange(0, TILE)
        base = tl.program_id(2).to(tl.int64) * N * K
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        tile = tl.load(x_ptr + base + rn[:, None].to(tl.int64) * K + rk[None, :], mask=mask)
        y_ptrs = y_ptr + base + rk[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(y_ptrs, tl.trans(tile), mask=(rk[:, None] < K) & (rn[None, :] < N))

    @triton.jit
    def _quantize_dual_kernel(
        x_ptr, dh_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, LDX, FP8_MAX,
        PROLOGUE: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK x BLOCK tile of t (M, K): q and its 1x128 scales per row (s: (M, K/128)); q_t, t^T quantised per
        column of the tile (1x128 along M), stored transposed (K, M), and its scales (s_t: (K, M/128)). Reciprocals
        rounded to nearest, as PyTorch's: the same bytes as ``quantize``. t is x (PROLOGUE 0, rows LDX apart),
        ``swiglu(x)`` (1: x = a13 is (M, 2K)) or ``swiglu_backward(x, dh)`` (2: x = a13 is (M, K), dh (M, K/2)),
        computed in float32 and rounded to x's dtype, as those functions do."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rk = pid_k * BLOCK + tl.arange(0, BLOCK)
        rows = rm[:, None].to(tl.int64) * LDX
        if PROLOGUE == 0:
            x = tl.load(x_ptr + rows + rk[None, :]).to(tl.float32)
        elif PROLOGUE == 1:  # h = silu(a1) * a3, a1 = a13[:, :K], a3 = a13[:, K:]
            a1 = tl.load(x_ptr + rows + rk[None, :]).to(tl.float32)
            a3 = tl.load(x_ptr + rows + K + rk[None, :]).to(tl.float32)
            x = (a1 * tl.sigmoid(a1) * a3).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:  # da13 = [da1, da3]: this tile is a column block of da1 (pid_k < K/2/BLOCK) or of da3
            f = K // 2
            col = (pid_k * BLOCK) % f + tl.arange(0, BLOCK)
            a1 = tl.load(x_ptr + rows + col[None, :]).to(tl.float32)
            dh = tl.load(dh_ptr + rm[:, None].to(tl.int64) * f + col[None, :]).to(tl.float32)
            sig = tl.sigmoid(a1)
            if pid_k * BLOCK < f:
                a3 = tl.load(x_ptr + rows + f + col[None, :]).to(tl.float32)
                x = dh * a3 * sig * (1 + a1 * (1 - sig))
            else:
                x = dh * a1 * sig
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
        ax = tl.abs(x)
        one = tl.full((BLOCK,), 1.0, tl.float32)
        # PyTorch's ``fp8_max / amax`` is ``amax.reciprocal() * fp8_max``: two roundings, done the same way here.
        inv_r = tl.math.div_rn(one, tl.maximum(tl.max(ax, axis=1), EPS)) * FP8_MAX
        inv_c = tl.math.div_rn(one, tl.maximum(tl.max(ax, axis=0), EPS)) * FP8_MAX
        q = tl.clamp(x * inv_r[:, None], -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], q)
        tl.store(s_ptr + rm * (K // BLOCK) + pid_k, tl.math.div_rn(one, inv_r))
        q_t = tl.clamp(x * inv_c[None, :], -FP8_MAX, FP8_MAX).to(qt_ptr.dtype.element_ty)
        tl.store(qt_ptr + rk[:, None].to(tl.int64) * M + rm[None, :], tl.trans(q_t))
        tl.store(st_ptr + rk * (M // BLOCK) + pid_m, tl.math.div_rn(one, inv_c))

    @triton.jit
    def _quantize_weight_dual_kernel(
        w_ptr, w2_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, NA, N, K, FP8_MAX,
        LOAD_T: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK x BLOCK block of expert e's weight (N, K), rows [0, NA) from w (E, NA, K) and the rest from w2
        (E, N - NA, K): q, its transpose (E, K, N), and the block's scale in both layouts. The transposed copy goes
        through shared memory (``tl.trans`` of q), or with ``LOAD_T`` is quantised from a second, transposed load of
        the block (float32 weights: on an H100 with Triton 3.6, ``tl.trans`` of the FP8 tile quantised from a
        float32 load stored wrong bytes)."""
        pid_n, pid_k, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        n0 = pid_n * BLOCK
        rb = tl.arange(0, BLOCK)
        rk = pid_k * BLOCK + rb
        if n0 < NA:
            base = w_ptr + e * NA * K + n0.to(tl.int64) * K
        else:
            base = w2_ptr + e * (N - NA) * K + (n0 - NA).to(tl.int64) * K
        x = tl.load(base + rb[:, None] * K + rk[None, :]).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        one = tl.full((), 1.0, tl.float32)
        inv = tl.math.div_rn(one, tl.maximum(amax, EPS)) * FP8_MAX  # as PyTorch: two roundings (see above)
        q = tl.clamp(x * inv, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
        rn = n0 + rb
        tl.store(q_ptr + e * N * K + rn[:, None].to(tl.int64) * K + rk[None, :], q)
        qt_ptrs = qt_ptr + e * K * N + rk[:, None].to(tl.int64) * N + rn[None, :]
        if LOAD_T:
            x_t = tl.load(base + rb[None, :] * K + rk[:, None]).to(tl.float32)  # (K block, N block)
            tl.store(qt_ptrs, tl.clamp(x_t * inv, -FP8_MAX, FP8_MAX).to(qt_ptr.dtype.element_ty))
        else:
            tl.store(qt_ptrs, tl.trans(q))
        scale = tl.math.div_rn(one, inv)
        tl.store(s_ptr + (e * (N // BLOCK) + pid_n) * (K // BLOCK) + pid_k, scale)
        tl.store(st_ptr + (e * (K // BLOCK) + pid_k) * (N // BLOCK) + pid_n, scale)
