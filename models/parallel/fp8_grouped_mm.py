"""FP8 grouped GEMMs of the routed experts: Triton kernels on the GPU, a dequantise + float32 reference elsewhere.

Two products, each a ``torch.library`` custom op (opaque to ``torch.compile``, which fuses the quantisation
around them):

- ``fp8_grouped_mm``: ``out[rows of e] = a[rows of e] @ b[e]^T``, a (M, K), b (E, N, K): the forward and the
  input-gradient GEMMs. Expert e owns rows ``offsets[e-1]:offsets[e]``; every group starts at a multiple of 128
  (``MoE.routed`` pads them), so a 128-row tile never straddles two experts and finds its expert in ``offsets``.
  Rows past the last group are written as zeros.
- ``fp8_grouped_mm_wgrad``: ``out[e] = a_t[:, rows of e] @ b_t[:, rows of e]^T``, a_t (N, M), b_t (K, M): the weight
  gradients, a sum over each expert's rows (operands transposed so that both are contiguous along the sum, as
  Hopper's FP8 tensor cores read them).

Scales (float32 dequantisation multipliers, ``models.parallel.fp8_quant``) per granularity:

| granularity | a | b | a_t | b_t |
| --- | --- | --- | --- | --- |
| tensorwise | (1,) | (E,) | (1,) | (1,) |
| rowwise | (M,) | (E, N) | (E, N) | (E, K) |
| blockwise | (M, K/128) | (E, N/128, K/128) | (N, M/128) | (K, M/128) |

Tensorwise and rowwise scales are constant along the sum and multiply the float32 accumulator once, in the epilogue.
Blockwise scales change every 128 elements of the sum: each 128-wide step's product is scaled before it is added to
the float32 accumulator. Either way partial sums are promoted to full float32 every 128 elements of the sum, the
report's remedy (section 3.3.2) for Hopper's FP8 tensor cores accumulating with about 14 bits: Triton's default on
sm_90 (``max_num_imprecise_acc`` = 2**30) never promotes.

Why our own kernels: torchao 0.18's FP8 grouped GEMMs are rowwise only at bf16's speed (its quantisation kernels
eat the GEMM's gain), and its blockwise grouped GEMM runs 5-15x slower than bf16 on an H200.

Shapes: M rows (token copies, grouped by expert), K the contraction, N output features, E experts.
"""

from __future__ import annotations

import contextlib
import os

import torch

from models.parallel.fp8_quant import BLOCK, dequantize, expert_of_rows

try:  # Triton exists where CUDA does; the reference below runs everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

_SCALING = {"tensorwise": 0, "rowwise": 1, "blockwise": 2}


# ----------------------------------------------------------------------------------------------- reference
def grouped_mm_reference(
    a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``fp8_grouped_mm`` as dequantise + float32 grouped matmul (the numeric reference, and the CPU path)."""
    out = torch._grouped_mm(dequantize(a, sa), dequantize(b, sb).transpose(-2, -1), offs=offsets)
    return _zero_rows_past_groups(out, offsets).to(out_dtype)


def grouped_mm_wgrad_reference(
    a_t: torch.Tensor,
    sa: torch.Tensor,
    b_t: torch.Tensor,
    sb: torch.Tensor,
    offsets: torch.Tensor,
    granularity: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``fp8_grouped_mm_wgrad`` as dequantise + float32 grouped matmul."""
    a, b = _dequantize_t(a_t, sa, offsets, granularity), _dequantize_t(b_t, sb, offsets, granularity)
    out = torch._grouped_mm(a, b.t(), offs=offsets)
    empty = torch.diff(offsets, prepend=offsets.new_zeros(1)) == 0  # torch may leave their outputs unwritten
    return torch.where(empty[:, None, None], 0, out).to(out_dtype)


def _dequantize_t(q_KM: torch.Tensor, s: torch.Tensor, offsets: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity != "rowwise":
        return dequantize(q_KM, s)
    # Per expert and column: column m of q takes its expert's scales; columns past the groups hold zeros.
    s_ME = torch.cat((s, s.new_ones(1, s.shape[1])))[expert_of_rows(offsets, q_KM.shape[1])]
    return q_KM.float() * s_ME.t()


def _zero_rows_past_groups(out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Zero the rows past the last group, in place: torch._grouped_mm leaves them unwritten (uninitialised memory,
    possibly NaN: a where, not a product), and a tensorwise amax downstream reads every row.

    Only the last (E + 1) * 128 rows are looked at: ``MoE.routed`` sizes its padded rows (``padded_rows``) as the
    token copies plus at most E * 127 + 127 rows of padding, and every token copy lies inside a group. (A where over
    every row cost 0.67 ms per GEMM on an H200 at bench-1gpu's expert shape, 3.6 % of a step.)
    """
    lo = max(0, out.shape[0] - (offsets.shape[0] + 1) * BLOCK)
    rows = torch.arange(lo, out.shape[0], device=out.device)
    out[lo:] = torch.where((rows < offsets[-1]).unsqueeze(1), out[lo:], 0)
    return out


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dsv3::fp8_grouped_mm", mutates_args=())
def fp8_grouped_mm(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    offsets: torch.Tensor,
    granularity: str,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(M, K) x (E, N, K) -> (M, N) over row groups ending at ``offsets`` (see the module docstring).

    ``fast_accum``: where torch's CUTLASS kernel runs the product, accumulate in the tensor cores' ~14 bits without
    the promotion every 128 elements (torchao's setting for the forward GEMM: 1.5-1.8x faster on an H200)."""
    if _use_cutlass(a, b, granularity, out_dtype):
        return _cutlass_mm(a, sa, b, sb, offsets, granularity, out_dtype, fast_accum)
    if a.is_cuda and triton is not None:
        return _launch_mm(a, sa, b, sb, offsets, granularity, out_dtype)
    return grouped_mm_reference(a, sa, b, sb, offsets, out_dtype)


@fp8_grouped_mm.register_fake
def _(a, sa, b, sb, offsets, granularity, out_dtype, fast_accum=False):  # noqa: ANN001, ANN202
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("dsv3::fp8_grouped_mm_wgrad", mutates_args=())
def fp8_grouped_mm_wgrad(
    a_t: torch.Tensor,
    sa: torch.Tensor,
    b_t: torch.Tensor,
    sb: torch.Tensor,
    offsets: torch.Tensor,
    granularity: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(N, M) x (K, M) -> (E, N, K), each expert summing over its own rows (see the module docstring)."""
    if a_t.is_cuda and triton is not None:
        return _launch_wgrad(a_t, sa, b_t, sb, offsets, granularity, out_dtype)
    return grouped_mm_wgrad_reference(a_t, sa, b_t, sb, offsets, granularity, out_dtype)


@fp8_grouped_mm_wgrad.register_fake
def _(a_t, sa, b_t, sb, offsets, granularity, out_dtype):  # noqa: ANN001, ANN202
    return a_t.new_empty(offsets.shape[0], a_t.shape[0], b_t.shape[0], dtype=out_dtype)


# ----------------------------------------------------------------------------------------------- CUTLASS
# ``backend`` picks the GPU kernels: "auto" takes torch's CUTLASS grouped GEMM (``torch._scaled_grouped_mm``, Hopper,
# E4M3 operands with row/column scales, bf16 output) for ``fp8_grouped_mm`` where it applies (rowwise, and
# tensorwise products of two E4M3 operands, the scales broadcast to rows), and this module's Triton kernels otherwise:
# blockwise, E5M2 gradients, float32 outputs, and every weight gradient (measured on an H200, benchmarks/RESULTS.md:
# the Triton weight-gradient kernel runs at 740-820 TFLOP/s, CUTLASS's with promoted accumulation at 490-590; for the
# forward and input-gradient GEMMs CUTLASS's 545-845 against Triton's 483-572, 1000-1220 with fast accumulation).
# "triton" always takes the Triton kernels (benchmarks and tests compare the two).
backend = os.environ.get("DSV3_FP8_GROUPED_MM", "auto")


def _use_cutlass(a: torch.Tensor, b: torch.Tensor, granularity: str, out_dtype: torch.dtype) -> bool:
    if backend != "auto" or not a.is_cuda or torch.version.hip or granularity == "blockwise":
        return False
    if out_dtype != torch.bfloat16:
        return False
    e4m3 = a.dtype == b.dtype == torch.float8_e4m3fn
    return e4m3 and torch.cuda.get_device_capability(a.device) >= (9, 0) and hasattr(torch, "_scaled_grouped_mm")


def _cutlass_mm(a, sa, b, sb, offsets, granularity, out_dtype, fast_accum=False):  # noqa: ANN001, ANN202
    # (M, K) row-major x (E, K, N) column-major (b^T of the (E, N, K) weights, a view); scales (M,) and (E, N)
    m, n_experts, n = a.shape[0], b.shape[0], b.shape[1]
    if granularity == "tensorwise":
        sa, sb = sa.expand(m), sb[:, None].expand(n_experts, n)
    sa, sb = sa.contiguous(), sb.contiguous()  # the kernel reads dense scale arrays (an expanded view fails its check)
    out = torch._scaled_grouped_mm(
        a, b.transpose(-2, -1), sa, sb, offs=offsets, out_dtype=out_dtype, use_fast_accum=fast_accum
    )
    return _zero_rows_past_groups(out, offsets)


def _cutlass_wgrad(a_t, sa, b_t, sb, offsets, granularity, out_dtype):  # noqa: ANN001, ANN202
    # Not dispatched to (slower than the Triton kernel, see ``backend``): benchmarks/fp8_grouped_gemm.py measures it.
    # (N, M) row-major x (M, K) column-major (b_t^T, a view), summed per group of M; scales per group and row/column
    n_experts, n, k = offsets.shape[0], a_t.shape[0], b_t.shape[0]
    if granularity == "tensorwise":
        sa, sb = sa.expand(n_experts * n).contiguous(), sb.expand(n_experts * k).contiguous()
    out = torch._scaled_grouped_mm(
        a_t, b_t.t(), sa.reshape(-1), sb.reshape(-1), offs=offsets, out_dtype=out_dtype, use_fast_accum=False
    )
    empty = torch.diff(offsets, prepend=offsets.new_zeros(1)) == 0  # torch may leave their outputs unwritten
    return torch.where(empty[:, None, None], 0, out)


# --------------------------------------------------------------------------------------- cuBLAS, one group
# The dense blockwise linears (one group) run on cuBLAS's blockwise-scaled FP8 GEMM (CUDA >= 12.9, sm_90), which
# applies the 1x128 / 128x128 scales outside the tensor cores' accumulation every 128 elements of the sum (promoted,
# as the report does), where the grouped Triton kernel stalls on the scale multiply after each step. A custom op, so
# that ``torch.compile`` keeps the compiled block whole (dynamo cannot trace ``torch._scaled_mm``'s blockwise form in
# torch 2.11: the graph break torchao's ``Float8BlockwiseLinear`` hits).
@torch.library.custom_op("dsv3::fp8_blockwise_mm", mutates_args=())
def fp8_blockwise_mm(
    a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``a @ b^T`` of row-major E4M3 a (M, K) and b (N, K), sa (M, K/128) in 1x128 tiles, sb (N/128, K/128) in
    128x128 blocks or (N, K/128) in 1x128 tiles (the weight gradient), as ``fp8_quant`` lays them out (row-major);
    here rearranged into what cuBLAS reads: 1x128 scales outer-dimension-major, 128x128 scales K-major."""
    sa = sa.t().contiguous().t()
    sb = sb.t().contiguous() if sb.shape[0] == b.shape[0] else sb.t()
    return torch._scaled_mm(a, b.t(), sa, sb, out_dtype=out_dtype)


@fp8_blockwise_mm.register_fake
def _(a, sa, b, sb, out_dtype):  # noqa: ANN001, ANN202
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


def use_cublas_blockwise(a: torch.Tensor, k: int) -> bool:
    """Whether ``fp8_blockwise_mm`` serves a one-group blockwise product of this operand with a sum of length k:
    a Hopper GPU, CUDA >= 12.9, and K/128 a multiple of 4 (cuBLAS reads 128x128 scales with a 16-byte stride)."""
    if backend != "auto" or not a.is_cuda or torch.version.hip or (k // BLOCK) % 4:
        return False
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return cuda >= (12, 9) and torch.cuda.get_device_capability(a.device) >= (9, 0)


# ----------------------------------------------------------------------------------------------- Triton
# The tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the autotuner times, per kernel and per kind of scaling.
# Hopper FP8 tiles: two warpgroups on 128x256, one or two on 128x128. BLOCK_M divides 128, the groups' alignment.
# Blockwise scales change every 128 along the sum, so the kernel's step there must divide 128: BLOCK_K = 128, and
# the weight-gradient kernel's BLOCK_M (its sum runs over rows). Blockwise kernels hold a second float32 tile per
# thread (each 128-wide step's product, scaled before it is added to the accumulator), so they get tiles with fewer
# accumulator elements per thread. On the promoted kernels' tiles, ptxas (sm_90a, Triton 3.6) spills 430-770 bytes
# per thread to local memory under blockwise scaling; on the blockwise tiles it spills none. The forward's
# 128x256 / 8-warp tile spills 400 bytes even when promoted, which is why 128x128 / 8 warps is offered there too.
# ``tests/models/test_fp8.py`` compiles every blockwise tile and checks that ptxas spills nothing.
TILES = {
    ("mm", False): ((128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4)),
    ("wgrad", False): ((128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4)),
    ("mm", True): ((128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (64, 256, 128, 8, 3), (64, 128, 128, 4, 4),
                   (128, 64, 128, 4, 4)),
    ("wgrad", True): ((128, 64, 128, 8, 4), (128, 64, 128, 4, 4), (64, 128, 128, 8, 4), (64, 64, 128, 4, 6)),
}  # fmt: skip


def _tile(config) -> tuple:  # noqa: ANN001
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def _configs(kernel: str) -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: one small config, no autotuning
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4)]
    tiles = dict.fromkeys(TILES[kernel, False] + TILES[kernel, True])  # ordered, distinct
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


def _prune(kernel: str):  # noqa: ANN202
    """``early_config_prune``: of the kernel's configs, the tiles listed for this launch's scaling."""

    def prune(configs: list, named_args: dict, **kwargs) -> list:  # noqa: ANN003
        wanted = TILES[kernel, kwargs.get("SCALING", named_args.get("SCALING")) == _SCALING["blockwise"]]
        return [c for c in configs if _tile(c) in wanted] or configs  # the interpreter's single config

    return prune


@contextlib.contextmanager
def only_tile(kernel: str, tile: tuple):
    """Within the block, the ``"mm"`` or ``"wgrad"`` kernel runs this one tile of ``TILES`` (no autotuning): what the
    per-tile benchmark (``benchmarks/fp8_grouped_gemm.py --tiles``) and the per-tile GPU test run."""
    autotuner = _grouped_mm_kernel if kernel == "mm" else _grouped_mm_wgrad_kernel
    saved = autotuner.configs, autotuner.cache
    autotuner.configs = [c for c in saved[0] if _tile(c) == tuple(tile)]
    assert autotuner.configs, f"{tile} is not a tile of TILES for {kernel!r}"
    autotuner.cache = {}
    try:
        yield
    finally:
        autotuner.configs, autotuner.cache = saved


if triton is not None:

    @triton.jit
    def _expert_of_tile(offsets_ptr, row0, n_experts, E_POW2: tl.constexpr):
        # Groups are 128-row aligned: the tile's expert is the number of groups ending at or before its first row.
        offs_e = tl.arange(0, E_POW2)
        ends = tl.load(offsets_ptr + offs_e, mask=offs_e < n_experts, other=2**31 - 1)
        return tl.sum((ends <= row0).to(tl.int32), axis=0)

    @triton.autotune(
        configs=_configs("mm"), key=["N", "K", "SCALING"], prune_configs_by={"early_config_prune": _prune("mm")}
    )
    @triton.jit
    def _grouped_mm_kernel(
        a_ptr,
        sa_ptr,
        b_ptr,
        sb_ptr,
        c_ptr,
        offsets_ptr,
        M,
        N,
        K,
        n_experts,
        SCALING: tl.constexpr,
        E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_pid_n)  # GROUP_M row tiles share each weight tile in L2
        first_m = group * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % size_m
        pid_n = (pid % (GROUP_M * num_pid_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        expert = _expert_of_tile(offsets_ptr, pid_m * BLOCK_M, n_experts, E_POW2)
        if expert < n_experts:
            a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
            b_ptrs = b_ptr + expert.to(tl.int64) * N * K + offs_n[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_mask = offs_k < K - k0
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if SCALING == 2:  # 1x128 tiles of a, 128x128 blocks of b: scale each step's product
                    n_kb = K // 128
                    s_a = tl.load(sa_ptr + offs_m * n_kb + k0 // 128)
                    if BLOCK_N <= 128:  # the tile lies in one 128-block of b's rows: one scale of b
                        s_b = tl.load(sb_ptr + (expert * tl.cdiv(N, 128) + pid_n * BLOCK_N // 128) * n_kb + k0 // 128)
                        acc += tl.dot(a, b) * (s_a * s_b)[:, None]
                    else:
                        sb_ptrs = sb_ptr + (expert * tl.cdiv(N, 128) + offs_n // 128) * n_kb + k0 // 128
                        s_b = tl.load(sb_ptrs, mask=n_mask, other=1.0)
                        acc += tl.dot(a, b) * (s_a[:, None] * s_b[None, :])
                else:  # promoted to the float32 accumulator every BLOCK_K (see the module docstring)
                    acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            if SCALING == 0:
                acc = acc * (tl.load(sa_ptr) * tl.load(sb_ptr + expert))
            elif SCALING == 1:
                s_a = tl.load(sa_ptr + offs_m)
                s_b = tl.load(sb_ptr + expert * N + offs_n, mask=n_mask)
                acc = acc * (s_a[:, None] * s_b[None, :])
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])
        else:  # rows past the last group
            tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=n_mask[None, :])

    @triton.autotune(
        configs=_configs("wgrad"), key=["N", "K", "SCALING"], prune_configs_by={"early_config_prune": _prune("wgrad")}
    )
    @triton.jit
    def _grouped_mm_wgrad_kernel(
        at_ptr,
        sa_ptr,
        bt_ptr,
        sb_ptr,
        c_ptr,
        offsets_ptr,
        M,
        N,
        K,
        SCALING: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # One program = one (BLOCK_N, BLOCK_K) tile of one expert's gradient, summed over that expert's rows.
        pid, expert = tl.program_id(0), tl.program_id(1)
        num_pid_k = tl.cdiv(K, BLOCK_K)
        pid_n, pid_k = pid // num_pid_k, pid % num_pid_k
        # Groups start at multiples of 128 rows: telling Triton so lets it vectorise the loads along the rows (without
        # the hint, a start read from memory has unknown alignment and every FP8 byte is loaded alone: 30x slower).
        start = tl.multiple_of(tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0), 128)
        end = tl.load(offsets_ptr + expert)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask, k_mask = offs_n < N, offs_k < K
        a_ptrs = at_ptr + offs_n[:, None].to(tl.int64) * M + (start + offs_m)[None, :]  # (BLOCK_N, BLOCK_M)
        b_ptrs = bt_ptr + offs_k[None, :].to(tl.int64) * M + (start + offs_m)[:, None]  # (BLOCK_M, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        n_mb = M // 128
        for m in range(start, end, BLOCK_M):
            a = tl.load(a_ptrs, mask=n_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[None, :], other=0.0)
            if SCALING == 2:  # 1x128 tiles along the rows for both operands
                s_a = tl.load(sa_ptr + offs_n * n_mb + m // 128, mask=n_mask)
                s_b = tl.load(sb_ptr + offs_k * n_mb + m // 128, mask=k_mask)
                acc += tl.dot(a, b) * (s_a[:, None] * s_b[None, :])
            else:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_M)
            a_ptrs += BLOCK_M
            b_ptrs += BLOCK_M
        if SCALING == 0:
            acc = acc * (tl.load(sa_ptr) * tl.load(sb_ptr))
        elif SCALING == 1:
            s_a = tl.load(sa_ptr + expert * N + offs_n, mask=n_mask)
            s_b = tl.load(sb_ptr + expert * K + offs_k, mask=k_mask)
            acc = acc * (s_a[:, None] * s_b[None, :])
        c_ptrs = c_ptr + expert.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _launch_mm(a, sa, b, sb, offsets, granularity, out_dtype):  # noqa: ANN001, ANN202
    m, k = a.shape
    n_experts, n, _ = b.shape
    assert m % BLOCK == 0, "rows padded to a multiple of 128"
    a, b = a.contiguous(), b.contiguous()  # no-ops for what fp8_quant returns
    out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _grouped_mm_kernel[grid](
        a, sa.contiguous(), b, sb.contiguous(), out, offsets, m, n, k, n_experts,
        SCALING=_SCALING[granularity], E_POW2=max(16, triton.next_power_of_2(n_experts)),
    )  # fmt: skip
    return out


def _launch_wgrad(a_t, sa, b_t, sb, offsets, granularity, out_dtype):  # noqa: ANN001, ANN202
    n, m = a_t.shape
    k = b_t.shape[0]
    assert m % BLOCK == 0, "rows padded to a multiple of 128"
    a_t, b_t = a_t.contiguous(), b_t.contiguous()
    n_experts = offsets.shape[0]
    out = torch.empty(n_experts, n, k, device=a_t.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), n_experts)  # noqa: E731
    _grouped_mm_wgrad_kernel[grid](
        a_t, sa.contiguous(), b_t, sb.contiguous(), out, offsets, m, n, k, SCALING=_SCALING[granularity]
    )
    return out
