"""FP8 routed experts on one GPU: the grouped GEMMs alone, and a whole routed-expert layer forward + backward.

For each expert shape (bench-1gpu's: 64 experts, D 2048, F 1408, 16384 tokens top-6; bench-v3w's: 32 experts,
D 7168, F 2048, 8192 tokens top-8) and a random top-k routing:

1. GEMM TFLOP/s (real rows only, padding not counted) of the forward GEMM x @ [w1; w3]^T and the weight-gradient
   GEMM: bf16 ``torch._grouped_mm``; this project's Triton FP8 kernels per granularity; torch's
   ``_scaled_grouped_mm`` (CUTLASS) as ``fp8_grouped_mm`` calls it (promoted accumulation), tensorwise and rowwise,
   and as torchao calls it (fast accumulation).
2. The routed experts' forward + backward (``MoE.routed`` with that routing: permutation, padding, experts,
   combine), compiled, in ms and peak memory: bf16 ``GroupedExperts``, ``Float8GroupedExperts`` per granularity
   (as dispatched: CUTLASS where it applies; and "<granularity> triton": the Triton kernels only), and torchao
   0.18's rowwise FP8 grouped GEMM (``_to_fp8_rowwise_then_scaled_grouped_mm``, what torchtitan uses) in the same
   layer.

    python benchmarks/fp8_grouped_gemm.py --out bench_out         # one H200: both shapes, ~1 minute
    python benchmarks/fp8_grouped_gemm.py --device cpu --shape tiny --no-compile   # smoke run of the harness
    python benchmarks/fp8_grouped_gemm.py --gemms-only --tiles    # and every Triton tile alone (the autotuner's choice)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DeepSeekV3Config  # noqa: E402
from models.moe import MoE, padded_rows  # noqa: E402
from models.parallel import fp8_grouped_mm as G  # noqa: E402
from models.parallel.fp8_experts import Float8GroupedExperts  # noqa: E402
from models.parallel.fp8_grouped_mm import fp8_grouped_mm, fp8_grouped_mm_wgrad  # noqa: E402
from models.parallel.fp8_quant import BLOCK, GRANULARITIES, quantize_act, quantize_act_t, quantize_weight  # noqa: E402

# name -> (experts, D, F, tokens, top-k)
SHAPES = {
    "bench-1gpu": (64, 2048, 1408, 16384, 6),
    "bench-v3w": (32, 7168, 2048, 8192, 8),
    "tiny": (8, 128, 128, 256, 2),
}


def _time_ms(fn, device: torch.device, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` runs after 3 warm-ups (CUDA events; host clock on the CPU)."""
    import time

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _routing(n_experts: int, tokens: int, top_k: int, device: torch.device):
    """Random distinct top-k experts per token, their (T, K) weights and the (E,) counts."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.rand(tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices.to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    counts = torch.bincount(idx.flatten(), minlength=n_experts).to(torch.int32)
    return weights, idx, counts


def gemm_table(shape: str, device: torch.device, reps: int, tiles: bool = False) -> list[dict]:
    """TFLOP/s of the forward and weight-gradient grouped GEMMs per implementation; with ``tiles``, also each Triton
    tile the autotuner chooses from (``fp8_grouped_mm.TILES``), run alone."""
    n_experts, dim, hidden, tokens, top_k = SHAPES[shape]
    _, idx, counts = _routing(n_experts, tokens, top_k, device)
    rows_real = tokens * top_k
    experts_sorted = idx.flatten().sort().values
    rows, offsets, n_rows = padded_rows(counts, experts_sorted, BLOCK)
    x = torch.zeros(n_rows, dim, device=device, dtype=torch.bfloat16)
    x[rows] = torch.randn(rows_real, dim, device=device, dtype=torch.bfloat16)
    dy = torch.zeros(n_rows, 2 * hidden, device=device, dtype=torch.bfloat16)
    dy[rows] = torch.randn(rows_real, 2 * hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(n_experts, 2 * hidden, dim, device=device, dtype=torch.bfloat16) / dim**0.5
    x_real, dy_real = x[rows].contiguous(), dy[rows].contiguous()
    offsets_real = counts.cumsum(0, dtype=torch.int32)
    flops = 2 * rows_real * 2 * hidden * dim
    out = []

    def add(gemm: str, impl: str, fn, *fn_args, **fn_kwargs) -> None:  # noqa: ANN001
        try:
            ms = _time_ms(functools.partial(fn, *fn_args, **fn_kwargs), device, reps)
            out.append({"shape": shape, "gemm": gemm, "impl": impl, "ms": ms, "tflops": flops / ms / 1e9})
        except Exception as e:  # noqa: BLE001 - one failing implementation must not lose the others
            out.append({"shape": shape, "gemm": gemm, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})

    fwd, wgrad = "fwd x@w^T", "wgrad dy^T@x"
    bf16 = torch.bfloat16
    if device.type == "cuda":
        add(fwd, "bf16 torch._grouped_mm", torch._grouped_mm, x_real, w.transpose(-2, -1), offs=offsets_real)
        add(wgrad, "bf16 torch._grouped_mm", torch._grouped_mm, dy_real.t(), x_real, offs=offsets_real)
    for g in GRANULARITIES:
        xq, sx = quantize_act(x, g)
        wq, sw = quantize_weight(w, g)
        dyq_t, sdy = quantize_act_t(dy, g, offsets)
        xq_t, sx_t = quantize_act_t(x, g, offsets)
        ours = f"fp8 {g} (Triton, ours)"
        add(fwd, ours, G._launch_mm if device.type == "cuda" else fp8_grouped_mm, xq, sx, wq, sw, offsets, g, bf16)
        wgrad_fn = G._launch_wgrad if device.type == "cuda" else fp8_grouped_mm_wgrad
        add(wgrad, ours, wgrad_fn, dyq_t, sdy, xq_t, sx_t, offsets, g, bf16)
        for kernel, gemm, fn, fn_args in [
            ("mm", fwd, G._launch_mm, (xq, sx, wq, sw)),
            ("wgrad", wgrad, G._launch_wgrad, (dyq_t, sdy, xq_t, sx_t)),
        ]:
            for tile in G.TILES[kernel, g == "blockwise"] if tiles and device.type == "cuda" else ():
                m, n, k, warps, stages = tile
                with G.only_tile(kernel, tile):
                    add(gemm, f"{ours[:-1]}, tile {m}x{n}x{k} {warps}w {stages}s)", fn, *fn_args, offsets, g, bf16)
        if g != "blockwise" and device.type == "cuda":  # torch's CUTLASS kernel, as fp8_grouped_mm dispatches to it
            cutlass = f"fp8 {g} torch._scaled_grouped_mm (CUTLASS, promoted: ours)"
            add(fwd, cutlass, G._cutlass_mm, xq, sx, wq, sw, offsets, g, bf16)
            add(wgrad, cutlass, G._cutlass_wgrad, dyq_t, sdy, xq_t, sx_t, offsets, g, bf16)
            if g == "rowwise":  # torchao's setting: 14-bit FP8 accumulation, never promoted
                kw = {"offs": offsets, "out_dtype": bf16, "use_fast_accum": True}
                fast = "fp8 rowwise torch._scaled_grouped_mm (CUTLASS, fast accumulation: torchao's)"
                add(fwd, fast, torch._scaled_grouped_mm, xq, wq.transpose(-2, -1), sx, sw, **kw)
    return out


class _TorchaoRowwiseExperts(torch.nn.Module):
    """The same SwiGLU experts through torchao 0.18's rowwise FP8 grouped GEMM (torchtitan's FP8 expert path)."""

    group_alignment = 16

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm as mm

        x = x.to(torch.bfloat16)
        w1, w2, w3 = (w.transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
        kw = {"pad_token_groups_for_grouped_mm": False}
        h = torch.nn.functional.silu(mm(x, w1, offsets, **kw)) * mm(x, w3, offsets, **kw)
        return mm(h, w2, offsets, **kw)


def _profile(step, impl: str, shape: str, out_dir: Path) -> None:  # noqa: ANN001
    """Kernel-time table of two steps: where the layer's time goes (GEMMs against quantisation)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        step()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90)
    with (out_dir / "fp8_grouped_gemm_profiles.txt").open("a") as f:
        f.write(f"== {shape}, {impl}: two steps\n{table}\n")


def experts_config(n_experts: int, dim: int, hidden: int, top_k: int) -> DeepSeekV3Config:
    """A config whose MoE has these routed experts (one group: any top-k routing); the rest the tiny preset's."""
    return DeepSeekV3Config.from_preset(
        "tiny",
        hidden_size=dim,
        moe_intermediate_size=hidden,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        n_group=1,
        topk_group=1,
    )


def layer_table(shape: str, device: torch.device, reps: int, compile: bool, profile_dir: Path | None) -> list[dict]:
    """ms and peak GiB of the routed experts' forward + backward (``MoE.routed``) per implementation."""
    n_experts, dim, hidden, tokens, top_k = SHAPES[shape]
    config = experts_config(n_experts, dim, hidden, top_k)
    weights, idx, counts = _routing(n_experts, tokens, top_k, device)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    flops = 3 * 2 * tokens * top_k * 3 * hidden * dim
    out = []
    # "<granularity> triton": the Triton kernels where fp8_grouped_mm would take torch's CUTLASS kernel
    triton_only = [f"{g} triton" for g in GRANULARITIES if g != "blockwise"]
    for impl in ("bf16", *GRANULARITIES, *triton_only, "torchao rowwise"):
        moe = MoE(config).to(device=device, dtype=torch.bfloat16)
        moe.reset_parameters(std=0.02)
        G.backend = "triton" if impl.endswith(" triton") else "auto"
        if impl.split()[0] in GRANULARITIES:
            moe.experts = Float8GroupedExperts(moe.experts, impl.split()[0])
        elif impl == "torchao rowwise":
            moe.experts = _TorchaoRowwiseExperts(moe.experts)
        routed = torch.compile(moe.routed) if compile else moe.routed

        def step(routed=routed) -> None:  # noqa: ANN001
            routed(x, weights, idx, counts).backward(grad)

        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            ms = _time_ms(step, device, reps)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
            if profile_dir is not None and device.type == "cuda":
                _profile(step, impl, shape, profile_dir)
            out.append({"shape": shape, "impl": impl, "ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak})
        except Exception as e:  # noqa: BLE001
            out.append({"shape": shape, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
        del moe, routed
        G.backend = "auto"
        x.grad = None
        torch._dynamo.reset()
    return out


def markdown(gemms: list[dict], layers: list[dict], header: str) -> str:
    lines = [header, "", "| shape | GEMM | implementation | ms | TFLOP/s |", "| --- | --- | --- | ---: | ---: |"]
    for r in gemms:
        cells = f"{r['ms']:.3f} | {r['tflops']:.0f}" if "ms" in r else f"{r['error']} | —"
        lines.append(f"| {r['shape']} | {r['gemm']} | {r['impl']} | {cells} |")
    lines += [
        "",
        "| shape | routed experts fwd+bwd | ms | TFLOP/s (model FLOPs) | x bf16 | peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    bf16 = {r["shape"]: r["ms"] for r in layers if r["impl"] == "bf16" and "ms" in r}
    for r in layers:
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['error']} | — | — | — |")
            continue
        ratio = f"{bf16[r['shape']] / r['ms']:.2f}" if r["shape"] in bf16 else "—"
        lines.append(
            f"| {r['shape']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.0f} | {ratio} | {r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="bench-1gpu,bench-v3w", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="eager layer timings (the quantisation unfused)")
    p.add_argument("--profile", action="store_true", help="write each layer's kernel-time table to --out")
    p.add_argument("--gemms-only", action="store_true", help="only the GEMM table (no layer, nothing compiled)")
    p.add_argument("--tiles", action="store_true", help="also time each Triton tile the autotuner chooses from")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    gemms, layers = [], []
    for shape in args.shape.split(","):
        gemms += gemm_table(shape, device, args.reps, args.tiles)
        if not args.gemms_only:
            layers += layer_table(
                shape, device, args.reps, not args.no_compile, Path(args.out) if args.profile else None
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"`python benchmarks/fp8_grouped_gemm.py {' '.join(sys.argv[1:])}`\n\n{name}, torch {torch.__version__}, {date}"
    )
    table = markdown(gemms, layers, header)
    (Path(args.out) / "fp8_grouped_gemm.md").write_text(table + "\n")
    (Path(args.out) / "fp8_grouped_gemm.json").write_text(json.dumps({"gemms": gemms, "layers": layers}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
