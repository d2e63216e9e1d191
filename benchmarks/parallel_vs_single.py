"""The same run on one process and under ``DeepSeekV3Strategy``: losses and gradient norms step by step.

Runs ``dsv3 fit`` (a subprocess each, as a user would) on two configs for a few steps with per-step logging and
deterministic kernels, reads their TensorBoard scalars and prints one markdown table: ``train/loss`` (the mean over
data-parallel ranks), ``grad_norm`` (over all ranks' shards) and the final ``val/loss``, with their relative
differences, plus each run's wall time. By default ``configs/tiny.yaml`` against ``configs/tiny-fsdp-ep.yaml``
(4 CPU processes, FSDP2 x EP 2): the same model, seed, initial weights (the sharded init on the CPU equals the
one-process init) and global batches (``data.order: global``), so the curves agree to float rounding.

    python benchmarks/parallel_vs_single.py --steps 10 [--out benchmarks/results/parallel_vs_single_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("train/loss", "grad_norm")


def run(config: str, steps: int, save_dir: str) -> tuple[dict[str, list[tuple[int, float]]], float]:
    """``dsv3 fit`` of ``config`` for ``steps`` steps, logging every step; its scalars and wall seconds."""
    args = [sys.executable, "-m", "lightning_modules.cli", "fit", "--config", config]
    args += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.log_every_n_steps=1"]
    args += ["--trainer.deterministic=true", "--trainer.enable_progress_bar=false"]
    args += [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.callbacks.init_args.dirpath={save_dir}/ckpt",
    ]
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return scalars(save_dir), time.perf_counter() - start


def scalars(save_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = Path(save_dir).glob("*/version_*")
    events = EventAccumulator(str(version))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in (*TAGS, "val/loss")}


def table(names: tuple[str, str], runs: list[tuple[dict, float]]) -> str:
    (a, time_a), (b, time_b) = runs
    lines = [
        f"| step | {names[0]} train/loss | {names[1]} | rel. diff | {names[0]} grad_norm | {names[1]} | rel. diff |"
    ]
    lines.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (step, loss_a), (_, loss_b), (_, norm_a), (_, norm_b) in zip(
        a["train/loss"], b["train/loss"], a["grad_norm"], b["grad_norm"], strict=True
    ):
        rel = (abs(loss_a - loss_b) / abs(loss_a), abs(norm_a - norm_b) / abs(norm_a))
        lines.append(
            f"| {step} | {loss_a:.6f} | {loss_b:.6f} | {rel[0]:.1e} | {norm_a:.6f} | {norm_b:.6f} | {rel[1]:.1e} |"
        )
    (_, val_a), (_, val_b) = a["val/loss"][-1], b["val/loss"][-1]
    lines.append("")
    lines.append(
        f"val/loss after the last step: {val_a:.6f} vs {val_b:.6f} (rel. diff {abs(val_a - val_b) / val_a:.1e})"
    )
    lines.append(f"wall time of `dsv3 fit` (start-up, tokenizer, steps, validation): {time_a:.0f} s vs {time_b:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs=2, default=["configs/tiny.yaml", "configs/tiny-fsdp-ep.yaml"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(config, args.steps, f"{tmp}/{i}") for i, config in enumerate(args.configs)]
    names = tuple(Path(c).stem for c in args.configs)
    text = table(names, runs)
    print(text)
    if args.out:
        args.out.write_text(f"`python benchmarks/parallel_vs_single.py --steps {args.steps}`\n\n{text}\n")


if __name__ == "__main__":
    main()
