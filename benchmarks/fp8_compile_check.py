"""Compiled against eager FP8 routed experts: output and gradients of one MoE layer, each against bf16 eager.

For each recipe, the MoE layer (gate, dispatch, padded groups, ``Float8GroupedExperts``, combine, shared expert)
runs eager, under ``torch.compile(backend="aot_eager")`` (dynamo + AOTAutograd, no code generation) and under
inductor; the same with the gate's combine weights detached and with the experts kept out of the graph (two
bisections: is the wrong gradient the gate's, does it need the experts inside the graph?); then the experts alone on
padded groups the same three ways. Every row is the relative norm error of the
output y, the input gradient dx and the expert weight gradients dw1, dw2 against the bf16 layer run eagerly: FP8's
own error is 5-9 %; a compiled row far from its eager row is a bug, not FP8.

    python benchmarks/fp8_compile_check.py                  # one GPU, ~1 minute
    python benchmarks/fp8_compile_check.py --device cpu     # the reference kernels (no Triton, no CUTLASS)

Found with it on an H200 (2026-12-02, torch 2.11): the compiled MoE's dx 82 % off for every recipe and both backends,
the rest matching; the experts alone and the CPU (torch 2.13) matching. The cause was torch 2.11's handling of an
in-place op on a tensor an autograd.Function returns (pytorch/pytorch#180642; ``models.moe._scatter_rows``), fixed
here since; with torch 2.11 on the CPU this script showed it too (docs/fp8.md, "A compile bug, found and fixed").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DeepSeekV3Config  # noqa: E402
from models.moe import MoE, padded_rows  # noqa: E402
from models.parallel.fp8_experts import Float8GroupedExperts  # noqa: E402
from models.parallel.fp8_quant import BLOCK, GRANULARITIES  # noqa: E402

CONFIG = {  # widths that are multiples of 128, so every recipe takes every expert GEMM
    "vocab_size": 512,
    "hidden_size": 128,
    "moe_intermediate_size": 128,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
}
MODES = ("eager", "aot_eager", "inductor")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _moe(config: DeepSeekV3Config, granularity: str | None, device: torch.device, variant: str = "") -> MoE:
    """The layer; ``variant`` bisects: "gate detached" (no gradient through the combine weights into the gate),
    "experts eager" (the FP8 experts left out of the compiled graph)."""
    torch.manual_seed(0)
    moe = MoE(config).train()
    moe.reset_parameters(std=0.05)
    if granularity is not None:
        moe.experts = Float8GroupedExperts(moe.experts, granularity)
    if variant == "gate detached":
        moe.gate.register_forward_hook(lambda module, args, out: (out[0].detach(), *out[1:]))
    elif variant == "experts eager":
        moe.experts.forward = torch.compiler.disable(moe.experts.forward)
    return moe.to(device=device, dtype=torch.bfloat16)


def _run(module, mode: str, args: tuple, grad_out: torch.Tensor | None) -> list[torch.Tensor]:  # noqa: ANN001
    torch._dynamo.reset()
    fn = module.forward if mode == "eager" else torch.compile(module.forward, backend=mode)
    x = args[0].clone().requires_grad_(True)
    y = fn(x, *args[1:])
    y = y[0] if isinstance(y, tuple) else y
    if grad_out is None:
        y.float().square().sum().backward()
    else:
        y.backward(grad_out)
    experts = module.experts if isinstance(module, MoE) else module
    return [y.detach(), x.grad, experts.w1.grad, experts.w2.grad]


def check(device: torch.device, tokens: int) -> list[str]:
    config = DeepSeekV3Config.from_preset("tiny", **CONFIG)
    rows = []
    x = torch.randn(4, tokens // 4, config.hidden_size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=torch.bfloat16)
    ref = _run(_moe(config, None, device), "eager", (x,), None)
    for g in (None, *GRANULARITIES):
        for mode in MODES if g is not None else MODES[1:]:
            out = _run(_moe(config, g, device), mode, (x,), None)
            rows.append(("MoE layer", g or "bf16", mode, *(_rel(a, b) for a, b in zip(out, ref, strict=True))))
    for variant in ("gate detached", "experts eager"):
        ref_v = _run(_moe(config, None, device, variant), "eager", (x,), None)
        for g in GRANULARITIES:
            for mode in MODES:
                out = _run(_moe(config, g, device, variant), mode, (x,), None)
                errors = (_rel(a, b) for a, b in zip(out, ref_v, strict=True))
                rows.append((f"MoE layer, {variant}", g, mode, *errors))
    # The experts alone on padded groups (one empty expert), the padding rows masked out of y and dx.
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([300, 0, 129, 17, 400, 128, 1, 250])
    rows_M, offsets, n_rows = padded_rows(counts, torch.repeat_interleave(torch.arange(8), counts), BLOCK)
    xe = torch.zeros(n_rows, config.hidden_size)
    xe[rows_M] = torch.randn(int(counts.sum()), config.hidden_size, generator=gen)
    real = torch.zeros(n_rows, 1)
    real[rows_M] = 1
    dy = torch.randn(n_rows, config.hidden_size, generator=gen) * real  # zero on the padding rows
    xe, dy, real, offsets = (t.to(device) for t in (xe, dy.to(torch.bfloat16), real, offsets))
    xe = xe.to(torch.bfloat16)
    ref = _run(_moe(config, None, device).experts, "eager", (xe, offsets), dy)
    ref[:2] = [torch.where(real.bool(), t, 0) for t in ref[:2]]  # grouped_mm leaves rows past the groups unwritten
    for g in GRANULARITIES:
        for mode in MODES:
            out = _run(_moe(config, g, device).experts, mode, (xe, offsets), dy)
            out[:2] = [torch.where(real.bool(), t, 0) for t in out[:2]]
            rows.append(("experts alone", g, mode, *(_rel(a, b) for a, b in zip(out, ref, strict=True))))
    lines = [
        "| what | recipe | mode | y | dx | dw1 | dw2 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {w} | {g} | {m} | " + " | ".join(f"{v:.4f}" for v in vals) + " |" for w, g, m, *vals in rows]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; relative norm error against the bf16 layer, eager\n")
    print("\n".join(check(device, args.tokens)))


if __name__ == "__main__":
    main()
