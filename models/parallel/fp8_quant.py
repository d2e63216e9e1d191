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


@fp8_quantize_dual.register_fake
def _(x, dtype):  # noqa: ANN001, ANN202
    m, k = x.shape
    scale = functools.partial(x.new_empty, dtype=torch.float32)
    return x.new_empty(m, k, dtype=dtype), scale(m, k // BLOCK), x.new_empty(k, m, dtype=dtype), scale(k, m // BLOCK)


def _launch_dual(x: torch.Tensor, dtype: torch.dtype):  # noqa: ANN202
    m, k = x.shape
    if m % BLOCK or k % BLOCK:
        raise ValueError(f"shape {tuple(x.shape)} is not a multiple of the block ({BLOCK}, {BLOCK})")
    x = x.contiguous()
    q, s = x.new_empty(m, k, dtype=dtype), x.new_empty(m, k // BLOCK, dtype=torch.float32)
    q_t, s_t = x.new_empty(k, m, dtype=dtype), x.new_empty(k, m // BLOCK, dtype=torch.float32)
    grid = (m // BLOCK, k // BLOCK)
    _quantize_dual_kernel[grid](x, q, s, q_t, s_t, m, k, torch.finfo(dtype).max, EPS=_EPS, BLOCK=BLOCK, num_warps=8)
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
        x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, FP8_MAX, EPS: tl.constexpr, BLOCK: tl.constexpr
    ):
        """One BLOCK x BLOCK tile of x (M, K): q and its 1x128 scales per row (s: (M, K/128)); q_t, x^T quantised per
        column of the tile (1x128 along M), stored transposed (K, M), and its scales (s_t: (K, M/128)). Reciprocals
        rounded to nearest, as PyTorch's: the same bytes as ``quantize``."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK + tl.arange(0, BLOCK)
        rk = pid_k * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]).to(tl.float32)
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
