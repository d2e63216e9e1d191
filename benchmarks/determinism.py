"""Run-to-run reproducibility of training, and what it costs: the MoE dispatch backward, before and after.

Trains the ``tiny`` preset (configs/tiny.yaml's model, AdamW, clip 1.0) for ``--steps`` steps twice from the same
initialisation and data, in three modes, and reports the largest loss difference between the two runs; then times
forward + backward of one batch in the three modes, interleaved (so that a shared machine's load drifts alike for
all), and reports the median:

* ``scatter-add``: the dispatch ``x_TD[order_TK // K]`` with autograd's backward (an index_put_ accumulate: the
  order of the atomic/threaded adds varies), as on main before the fix;
* ``gather-sum`` (the default now): ``models.moe._Dispatch``, whose backward gathers and sums the K copies;
* ``deterministic``: ``torch.use_deterministic_algorithms(True)`` on top of scatter-add (``--trainer.deterministic
  true``).

    python benchmarks/determinism.py                 # CPU, tiny preset, batch 16 x 256 as configs/tiny.yaml
    python benchmarks/determinism.py --device cuda --preset bench-1gpu --batch-size 2 --seq-len 4096
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import models.moe as moe
from models import DeepSeekV3, DeepSeekV3Config


def _scatter_add_routed(self, x_TD, weights_TK, topk_idx_TK, counts_E):  # noqa: ANN001, ANN202
    """``MoE.routed`` with the dispatch of main before the fix: plain indexing, autograd's scatter-add backward."""
    top_k = topk_idx_TK.shape[1]
    order_TK = topk_idx_TK.flatten().argsort(stable=True)
    inverse_TK = torch.empty_like(order_TK).scatter_(0, order_TK, torch.arange(order_TK.numel(), device=x_TD.device))
    out_TKD = self.experts(x_TD[order_TK // top_k], counts_E.cumsum(0, dtype=torch.int32))
    out_TKD = moe._Permute.apply(out_TKD, inverse_TK, order_TK)
    y_TD = (out_TKD.view(-1, top_k, out_TKD.shape[-1]).float() * weights_TK.unsqueeze(-1)).sum(dim=1)
    return y_TD.to(out_TKD.dtype)


@contextlib.contextmanager
def mode(name: str):
    routed, deterministic = moe.MoE.routed, torch.are_deterministic_algorithms_enabled()
    if name != "gather-sum":
        moe.MoE.routed = _scatter_add_routed
    torch.use_deterministic_algorithms(name == "deterministic")
    try:
        yield
    finally:
        moe.MoE.routed = routed
        torch.use_deterministic_algorithms(deterministic)


def build(args) -> DeepSeekV3:
    torch.manual_seed(0)
    config = DeepSeekV3Config.from_preset(args.preset, vocab_size=args.vocab_size)
    with torch.device(args.device):
        model = DeepSeekV3(config)
    model.init_weights()
    return model


def forward_backward(model: DeepSeekV3, batch: torch.Tensor) -> torch.Tensor:
    loss = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False).loss
    loss.backward()
    return loss


def train(args, batches: torch.Tensor) -> list[float]:
    """Losses of ``len(batches)`` AdamW steps from the seed-0 initialisation."""
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for batch in batches:
        loss = forward_backward(model, batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def step_times(args, batch: torch.Tensor, modes: tuple[str, ...]) -> dict[str, list[float]]:
    """Forward + backward of ``batch``, the modes taking turns ``--reps`` times."""
    model, times = build(args), {name: [] for name in modes}
    for rep in range(args.reps + 1):
        for name in modes:
            with mode(name):
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                forward_backward(model, batch).item()  # .item() waits for the device
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(1)
    batches = torch.randint(0, args.vocab_size, (args.steps, args.batch_size, args.seq_len + 1), generator=generator)
    batches = batches.to(args.device)
    modes = ("scatter-add", "gather-sum", "deterministic")
    print(
        f"{args.preset}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    times = step_times(args, batches[0], modes)
    print("| backward of the dispatch | max abs loss diff, run 1 vs 2 | first differing step | fwd+bwd ms (median) |")
    print("| --- | ---: | ---: | ---: |")
    for name in modes:
        with mode(name):
            a, b = train(args, batches), train(args, batches)
        first = next((i + 1 for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), "-")
        worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
        print(f"| {name} | {worst:.2e} | {first} | {statistics.median(times[name]) * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
