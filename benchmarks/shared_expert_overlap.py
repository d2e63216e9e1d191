"""Shared experts overlapped with EP's dispatch all-to-all, or not: the time of a forward and backward.

Two (or ``--ranks``) gloo CPU processes, expert parallelism over all of them, a stack of ``--layers`` MoE blocks of
the tiny preset's shape scaled by ``--hidden``; each rank routes ``--tokens`` tokens. Both variants run alternately
in the same processes (``ExpertParallel.overlap_shared_experts`` on / off), after warm-up; the table gives the
median and the spread over ``--reps`` repetitions of each, the slowest rank per repetition.

    python benchmarks/shared_expert_overlap.py [--ranks 2 --tokens 1024 --hidden 256 --layers 4 --reps 20]
        [--out benchmarks/results/shared_expert_overlap_cpu.md]

What it measures on the CPU: whether the shared experts' matmuls proceed while gloo moves the dispatched rows
(gloo's transport runs in its own threads). On GPUs the same order lets NCCL's all-to-all run beside the shared
experts' GEMMs; that needs the multi-GPU run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import DeepSeekV3Config
from models.moe import MoE
from models.parallel.expert_parallel import ExpertParallel, apply_expert_parallel
from models.parallel.mesh import ParallelDims, submesh


def _config(hidden: int) -> DeepSeekV3Config:
    return DeepSeekV3Config.from_preset(
        "tiny", hidden_size=hidden, moe_intermediate_size=hidden, n_shared_experts=2, seq_aux_alpha=0.0
    )


def _set_overlap(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        wrapper = getattr(m, "expert_parallel", None)
        if isinstance(wrapper, ExpertParallel):
            wrapper.overlap_shared_experts = on


def _worker(rank: int, args: argparse.Namespace, rdzv: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=args.ranks)
    mesh = ParallelDims(dp_shard=args.ranks, ep=args.ranks).resolve(args.ranks).build_mesh("cpu")
    config = _config(args.hidden)
    torch.manual_seed(0)
    model = nn.Sequential(*[MoE(config) for _ in range(args.layers)])
    with torch.no_grad():  # the same full weights on every rank; EP keeps each rank's experts
        for p in model.parameters():
            p.normal_(std=0.02)
    apply_expert_parallel(model, submesh(mesh, "ep"))
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank), requires_grad=True)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        h = x
        for moe in model:
            h = h + moe(h)[0]
        h.square().mean().backward()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
        return elapsed.item()

    times: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(args.warmup + args.reps):
        for on in (True, False) if rep % 2 else (False, True):  # alternate which goes first
            _set_overlap(model, on)
            t = step()
            if rep >= args.warmup:
                times[on].append(t)
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens each rank routes")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(
            _worker, args=(args, os.path.join(tmp, "rdzv"), out), nprocs=args.ranks, start_method="spawn"
        )
        times = torch.load(out)
    config = _config(args.hidden)
    lines = [
        f"{args.ranks} gloo ranks, EP {args.ranks}, {args.layers} MoE layers (hidden {args.hidden}, "
        f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok}, {config.n_shared_experts} shared "
        f"of width {args.hidden}), {args.tokens} tokens per rank, forward + backward, {args.reps} reps each:",
        "",
        "| shared experts | median ms | min ms | max ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for on, name in ((False, "after the routed experts"), (True, "during the dispatch all-to-all")):
        t = [1e3 * v for v in times[on]]
        lines.append(f"| {name} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} |")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    lines += ["", f"median without / with the overlap: {ratio:.3f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
