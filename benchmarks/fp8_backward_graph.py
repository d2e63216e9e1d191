"""Which FP8 GEMMs the compiled FP8 MoE layer's graphs hold, with ``_scatter_rows`` in place (as before d032222) and
out of place (the fix): the custom-op counts of the forward and backward graphs AOTAutograd hands the compiler.

The layer runs 6 FP8 GEMMs (2 forward; backward: 2 input gradients ``fp8_grouped_mm``, 2 weight gradients, the
second, of [w1; w3], as two ``fp8_grouped_mm_wgrad`` calls since 2026-12-06: 3 calls). Under torch 2.11, the in-place
version's backward graph holds one input-gradient GEMM: the gradient routed to the wrong slot (pytorch/pytorch#180642)
left ``dx = da13 @ w13`` unused, and it was dropped. So the FP8-expert speeds measured before the fix timed 5 of the
6 GEMMs. CPU, seconds:

    python benchmarks/fp8_backward_graph.py
"""

from __future__ import annotations

import collections
import sys
import warnings
from pathlib import Path

import torch
from torch._dynamo.backends.common import aot_autograd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.moe as moe  # noqa: E402
from models import DeepSeekV3Config  # noqa: E402
from models.parallel.fp8 import FP8Config, convert_to_fp8  # noqa: E402


def _in_place(x_MD: torch.Tensor, rows_M: torch.Tensor, n_rows: int) -> torch.Tensor:
    return x_MD.new_zeros(n_rows, x_MD.shape[1]).index_copy_(0, rows_M, x_MD)  # the code before d032222


def graph_ops(recipe: str = "tensorwise") -> dict[str, dict[str, dict[str, int]]]:
    """{variant: {"fw"|"bw": {custom op: count}}} for the compiled FP8 MoE layer."""
    config = DeepSeekV3Config.from_preset(
        "tiny", hidden_size=128, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, vocab_size=512,
    )  # fmt: skip
    fixed, out = moe._scatter_rows, {}
    try:
        for name, scatter in (("in place (before the fix)", _in_place), ("out of place (main)", fixed)):
            moe._scatter_rows = scatter
            torch.manual_seed(0)
            layer = moe.MoE(config)
            layer.reset_parameters(0.02)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert_to_fp8(layer, FP8Config(recipe, experts=True), device="cpu")
            counts: dict[str, dict[str, int]] = {}

            def counting(tag: str, counts: dict = counts):  # noqa: ANN202
                def compiler(gm, example_inputs):  # noqa: ANN001, ANN202
                    ops = (str(n.target) for n in gm.graph.nodes if n.op == "call_function")
                    counts[tag] = dict(collections.Counter(op for op in ops if op.startswith("dsv3.")))
                    return gm.forward

                return compiler

            torch._dynamo.reset()
            backend = aot_autograd(fw_compiler=counting("fw"), bw_compiler=counting("bw"))
            compiled = torch.compile(layer, backend=backend)
            x = torch.randn(2, 64, 128, requires_grad=True)
            y, _ = compiled(x)
            y.float().pow(2).sum().backward()
            out[name] = counts
    finally:
        moe._scatter_rows = fixed
        torch._dynamo.reset()
    return out


def main() -> None:
    print(f"torch {torch.__version__}")
    for name, counts in graph_ops().items():
        print(f"{name}: forward {counts['fw']}, backward {counts['bw']}")


if __name__ == "__main__":
    main()
