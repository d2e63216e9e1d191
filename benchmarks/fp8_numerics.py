"""FP8 numerics on the GPU: this project's kernels and compiled quantisation against plain-PyTorch references.

Three levels, each printed as a table as soon as it is done:

1. **GEMMs.** Per granularity, at bench-1gpu's expert shape (64 experts, D 2048, F 1408, rows padded per expert)
   and a dense linear (one group), the forward (x w^T), input-gradient (dy w) and weight-gradient (dy^T x) GEMMs:
   the Triton kernel against the float64 product of the same dequantised FP8 operands (what the kernel must
   compute: only accumulation error may remain), both against the float64 product of the unquantised operands
   (the FP8 quantisation error), and ``proj`` = <out, ref> / <ref, ref> - 1, a systematic shrink (< 0) or growth of
   the result that a random error does not give. Rows past the last group must come out zero.
2. **Quantisation.** Each quantiser compiled (inductor) against eager: FP8 bytes and scales must be identical.
3. **Layers.** ``Float8GroupedExperts`` (and ``BlockwiseLinear``) forward + backward against the bf16 layer on
   the same inputs and weights: relative error and ``proj`` of y, dx and each weight gradient, for the kernels in
   eager mode, the kernels compiled, and the kernels replaced by a float64 loop over experts (eager): kernels
   equal to the loop = the kernels are right; compiled equal to eager = the compiled quantisation is right.

    python benchmarks/fp8_numerics.py --out bench_out          # one H200, ~4 minutes (quant: 15 compiles)
    python benchmarks/fp8_numerics.py --device cpu --small     # the harness on a CPU (the reference path)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fp8_grouped_gemm import experts_config  # noqa: E402
from models.moe import MoE, padded_rows  # noqa: E402
from models.parallel import fp8_grouped_mm as G  # noqa: E402
from models.parallel.fp8 import BlockwiseLinear  # noqa: E402
from models.parallel.fp8_experts import Float8GroupedExperts  # noqa: E402
from models.parallel.fp8_quant import (  # noqa: E402
    BLOCK,
    E4M3,
    E5M2,
    GRANULARITIES,
    dequantize,
    quantize_act,
    quantize_act_t,
    quantize_weight,
    quantize_weight_t,
)


def _metrics(out: torch.Tensor, ref: torch.Tensor) -> str:
    out, ref = out.double(), ref.double()
    rel = ((out - ref).norm() / ref.norm()).item()
    proj = ((out * ref).sum() / (ref * ref).sum() - 1).item()
    return f"{rel:.2e} ({proj:+.1e})"


def _loop(a_MK: torch.Tensor, b_ENK: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float64 rows of expert e times b[e]^T, rows past the groups zero."""
    a_MK, b_ENK = a_MK.double(), b_ENK.double()
    out = a_MK.new_zeros(a_MK.shape[0], b_ENK.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = a_MK[start:end] @ b_ENK[e].t()
        start = end
    return out


def _loop_wgrad(a_NM: torch.Tensor, b_KM: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float64 (E, N, K): expert e's columns of a times those of b, transposed."""
    a_NM, b_KM = a_NM.double(), b_KM.double()
    out = a_NM.new_zeros(offsets.numel(), a_NM.shape[0], b_KM.shape[0])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[e] = a_NM[:, start:end] @ b_KM[:, start:end].t()
        start = end
    return out


def loop_mm(a, sa, b, sb, offsets, granularity, out_dtype):  # noqa: ANN001, ANN201, ARG001
    """``fp8_grouped_mm`` as a float64 loop over the experts of the dequantised operands."""
    return _loop(dequantize(a, sa), dequantize(b, sb), offsets).to(out_dtype)


def loop_wgrad(a_t, sa, b_t, sb, offsets, granularity, out_dtype):  # noqa: ANN001, ANN201
    """``fp8_grouped_mm_wgrad`` as a float64 loop over the experts."""
    a, b = (G._dequantize_t(q, s, offsets, granularity) for q, s in ((a_t, sa), (b_t, sb)))
    return _loop_wgrad(a, b, offsets).to(out_dtype)


@contextlib.contextmanager
def loop_kernels():
    """Run the custom ops' bodies as the float64 loops above (the ops stay the same, so compile sees no change)."""
    saved = G._launch_mm, G._launch_wgrad
    G._launch_mm, G._launch_wgrad = loop_mm, loop_wgrad
    try:
        yield
    finally:
        G._launch_mm, G._launch_wgrad = saved


def gemm_table(device: torch.device, small: bool) -> str:
    n_experts, dim, hidden, tokens, top_k = (8, 256, 256, 512, 2) if small else (64, 2048, 1408, 8192, 6)
    gen = torch.Generator().manual_seed(0)
    idx = torch.rand(tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices
    counts = torch.bincount(idx.flatten(), minlength=n_experts)
    counts[1] = 0  # an empty expert
    rows, offsets, n_rows = padded_rows(counts, torch.repeat_interleave(torch.arange(n_experts), counts), BLOCK)
    real = int(counts.sum())
    cases = {
        "experts": (n_rows, rows, offsets, n_experts, dim, 2 * hidden),
        "dense": (tokens, torch.arange(tokens), torch.tensor([tokens], dtype=torch.int32), 1, dim, dim),
    }
    lines = [
        "| case | granularity | GEMM | kernel vs FP8 ref (proj) | FP8 ref vs exact (proj) | kernel vs exact | "
        "rows past groups |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, (m, rows_m, offs, e, k, n) in cases.items():
        x = torch.zeros(m, k)
        x[rows_m] = torch.randn(rows_m.numel(), k, generator=gen)
        dy = torch.zeros(m, n)
        dy[rows_m] = torch.randn(rows_m.numel(), n, generator=gen) * 1e-3  # gradients are small
        w = torch.randn(e, n, k, generator=gen) / k**0.5
        x, dy, w = (t.to(device, torch.bfloat16) for t in (x, dy, w))
        offs = offs.to(device)
        for g in GRANULARITIES:
            grad_fp8 = E5M2 if g == "tensorwise" else E4M3
            gemms = {
                "fwd x@w^T": (G.fp8_grouped_mm, (*quantize_act(x, g), *quantize_weight(w, g)), (x, w)),
                "dgrad dy@w": (
                    G.fp8_grouped_mm,
                    (*quantize_act(dy, g, grad_fp8), *quantize_weight_t(w, g)),
                    (dy, w.transpose(1, 2)),
                ),
                "wgrad dy^T@x": (
                    G.fp8_grouped_mm_wgrad,
                    (*quantize_act_t(dy, g, offs, grad_fp8), *quantize_act_t(x, g, offs)),
                    None,
                ),
            }
            for name, (op, operands, exact_operands) in gemms.items():
                kernel = op(*operands, offs, g, torch.float32)
                if op is G.fp8_grouped_mm:
                    ref = loop_mm(*operands, offs, g, torch.float64)
                    exact = _loop(*exact_operands, offs)
                    past = kernel[int(offs[-1]) :].abs().max().item() if int(offs[-1]) < m else 0.0
                else:
                    ref = loop_wgrad(*operands, offs, g, torch.float64)
                    exact = _loop_wgrad(dy.t(), x.t(), offs)
                    past = float("nan")
                lines.append(
                    f"| {case} ({real if case == 'experts' else tokens} rows) | {g} | {name} | {_metrics(kernel, ref)} "
                    f"| {_metrics(ref, exact)} | {_metrics(kernel, exact)} | {past:.1e} |"
                )
    return "\n".join(lines)


def quant_table(device: torch.device, small: bool) -> str:
    m, k = (512, 256) if small else (8192, 2048)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(device, torch.bfloat16)
    w = torch.randn(4, k, k, generator=gen).to(device, torch.bfloat16)
    offs = torch.tensor([m // 4, m // 2, m // 2, m], dtype=torch.int32, device=device)
    lines = ["| quantiser | granularity | FP8 bytes differ | max scale rel diff |", "| --- | --- | ---: | ---: |"]
    quantisers = {
        "quantize_act": lambda g: quantize_act(x, g),
        "quantize_act (E5M2)": lambda g: quantize_act(x, g, E5M2),
        "quantize_act_t": lambda g: quantize_act_t(x, g, offs),
        "quantize_weight": lambda g: quantize_weight(w, g),
        "quantize_weight_t": lambda g: quantize_weight_t(w, g),
    }
    for name, fn in quantisers.items():
        for g in GRANULARITIES:
            torch._dynamo.reset()
            (q, s), (qc, sc) = fn(g), torch.compile(fn)(g)
            differ = (q.view(torch.uint8) != qc.view(torch.uint8)).sum().item()
            srel = ((s - sc).abs() / s.abs()).max().item()
            lines.append(f"| {name} | {g} | {differ} / {q.numel()} | {srel:.1e} |")
    return "\n".join(lines)


def layer_table(device: torch.device, small: bool) -> str:
    n_experts, dim, hidden, tokens, top_k = (8, 256, 256, 512, 2) if small else (64, 2048, 1408, 8192, 6)
    config = experts_config(n_experts, dim, hidden, top_k)
    torch.manual_seed(0)
    bf16 = MoE(config).to(device=device, dtype=torch.bfloat16)
    bf16.reset_parameters(std=0.02)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        weights, idx, _ = bf16.gate(x.float())
    counts = torch.bincount(idx.flatten(), minlength=n_experts).to(torch.int32)
    dy = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16) * 1e-3

    def run(moe: MoE, compiled: bool) -> dict[str, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        for p in moe.parameters():
            p.grad = None
        routed = torch.compile(moe.routed) if compiled else moe.routed
        y = routed(xi, weights, idx, counts)
        y.backward(dy)
        return {"y": y, "dx": xi.grad, **{n: getattr(moe.experts, n).grad for n in ("w1", "w2", "w3")}}

    want = run(bf16, False)
    lines = [
        "| layer | granularity | path | " + " | ".join(f"{k} vs bf16 (proj)" for k in want) + " |",
        "| --- | --- | --- |" + " --- |" * len(want),
    ]
    for g in GRANULARITIES:
        moe = MoE(config).to(device=device, dtype=torch.bfloat16)
        moe.load_state_dict(bf16.state_dict())
        moe.experts = Float8GroupedExperts(moe.experts, g)
        results = {}
        for path in ("kernels eager", "kernels compiled", "float64 loop eager"):
            torch._dynamo.reset()
            with loop_kernels() if path.startswith("float64") else contextlib.nullcontext():
                results[path] = run(moe, compiled=path.endswith("compiled"))
            cells = " | ".join(_metrics(results[path][k], want[k]) for k in want)
            lines.append(f"| routed experts | {g} | {path} | {cells} |")
        cells = " | ".join(_metrics(results["kernels eager"][k], results["float64 loop eager"][k]) for k in want)
        lines.append(f"| routed experts | {g} | kernels vs float64 loop | {cells} |")
        cells = " | ".join(_metrics(results["kernels compiled"][k], results["kernels eager"][k]) for k in want)
        lines.append(f"| routed experts | {g} | compiled vs eager | {cells} |")
    # The dense blockwise linear against nn.Linear (bf16), at a dense linear's shape.
    linear = torch.nn.Linear(dim, 2 * dim, bias=False, device=device, dtype=torch.bfloat16)
    ours = BlockwiseLinear.from_float(linear)
    xl = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    dyl = torch.randn(tokens, 2 * dim, device=device, dtype=torch.bfloat16) * 1e-3
    outs = {}
    for name, module, ctx in (
        ("bf16", linear, contextlib.nullcontext),
        ("kernels", ours, contextlib.nullcontext),
        ("float64 loop", ours, loop_kernels),
    ):
        xi = xl.clone().requires_grad_(True)
        linear.weight.grad = None
        with ctx():
            y = module(xi)
            y.backward(dyl)
        outs[name] = (y, xi.grad, linear.weight.grad)
    for name in ("kernels", "float64 loop"):
        cells = " | ".join(_metrics(a, b) for a, b in zip(outs[name], outs["bf16"], strict=True))
        lines.append(f"| BlockwiseLinear | blockwise | {name} | {cells} | | |")
    cells = " | ".join(_metrics(a, b) for a, b in zip(outs["kernels"], outs["float64 loop"], strict=True))
    lines.append(f"| BlockwiseLinear | blockwise | kernels vs float64 loop | {cells} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run)")
    p.add_argument("--parts", default="gemm,layer,quant", help="comma list of gemm, layer, quant")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = f"`python benchmarks/fp8_numerics.py {' '.join(sys.argv[1:])}` on {name}, torch {torch.__version__}"
    print(header, flush=True)
    parts = {"gemm": gemm_table, "quant": quant_table, "layer": layer_table}
    with (args.out / "fp8_numerics.md").open("w") as f:
        f.write(header + "\n")
        for part in args.parts.split(","):
            table = parts[part](device, args.small)
            print(f"\n{table}", flush=True)
            f.write(f"\n{table}\n")


if __name__ == "__main__":
    main()
