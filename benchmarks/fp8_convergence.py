"""BF16 against FP8 training on real text: same model, data, seed and schedule; loss curves and the final gap.

Each run is ``DeepSeekV3LitModule`` under a Lightning Trainer (the ``dsv3 fit`` path): bf16 parameters with fp32
master weights and moments (``MasterWeightAdamW``, as ``configs/bench-1gpu.yaml``), compiled blocks, aux-loss-free
balancing, and ``model.fp8`` = none or a recipe. The data are the bundled Shakespeare corpus tokenised by the
project's datamodule (4096-token BPE), held-out plays for validation.

The model (``CONVERGENCE_MODEL``): 8 layers of width 1024 with 32 routed experts (top-4) of width 512, 0.41B
parameters (0.1B active), every FP8 dimension a multiple of 128 so that blockwise converts what it would at V3's
widths (all but ``wkv_a``, whose 576 outputs are not).

    python benchmarks/fp8_convergence.py --dump-batches conv.pt             # CPU: tokenise once (needs datasets)
    python benchmarks/fp8_convergence.py --batches conv.pt --runs none,blockwise,tensorwise --out out/   # GPU
    python benchmarks/fp8_convergence.py --plot-csv out/fp8_convergence.csv --out docs/figures          # re-plot
    python benchmarks/fp8_convergence.py --plot-csv out/s0/*.csv out/s1/*.csv --out merged/   # one process a seed

Outputs: ``fp8_convergence.csv`` (run, step, train CE, validation CE where measured) and ``fp8_convergence.png``;
the summary printed last gives each FP8 run's gap to BF16 of the same seed: the mean training CE of the last 100
steps, and the final validation CE, against the report's 0.25 % bar; with several seeds, the mean, min and max of
each recipe's paired gaps beside bf16's own gap between seeds (the noise floor any FP8 gap must clear).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONVERGENCE_MODEL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "q_lora_rank": 512,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 32,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 1024,
}
TAIL = 100  # steps averaged for the final training loss


def dump_batches(path: Path, steps: int, batch_size: int, seq_len: int, val_batches: int) -> None:
    """Tokenise the corpus with the project's datamodule and save train and validation batches (int16)."""
    from datamodules import PretrainDataModule

    dm = PretrainDataModule(vocab_size=4096, seq_len=seq_len, batch_size=batch_size, val_batches=val_batches)
    dm.setup("fit")
    train = []
    while len(train) < steps:
        for batch in dm.train_dataloader():
            train.append(batch)
            if len(train) == steps:
                break
    val = list(dm.val_dataloader())
    data = {"train": torch.stack(train).to(torch.int16), "val": torch.stack(val).to(torch.int16), "vocab": 4096}
    torch.save(data, path)
    print(f"saved train {tuple(data['train'].shape)}, val {tuple(data['val'].shape)} to {path}")


class _Recorder:
    """A Lightning logger keeping every logged scalar by step."""

    def __new__(cls):  # noqa: ANN204 - defined lazily: Lightning is imported only for training
        from lightning.pytorch.loggers import Logger

        class Recorder(Logger):
            name, version = "recorder", 0

            def __init__(self) -> None:
                super().__init__()
                self.rows: dict[int, dict[str, float]] = {}

            def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
                pass

            def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
                self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

        return Recorder()


# The dense linears' names, for runs that keep them out of FP8 (only the routed experts converted).
DENSE_LINEARS = ["*.attn.*", "*.ffn.w1", "*.ffn.w2", "*.ffn.w3", "*.shared_experts.*", "*.eh_proj"]


def run_seed(run: str) -> int:
    """A run's seed (initialisation and everything Lightning seeds): ``<run>@<seed>``, 0 without the suffix. The
    batches are the same in every run: ``none@1`` against ``none`` is the bf16 noise floor of the FP8 gaps."""
    _, _, seed = run.partition("@")
    return int(seed) if seed else 0


def run_label(run: str) -> str:
    """``none`` (and ``none@<seed>``) as bf16 in tables and legends."""
    return run.replace("none", "bf16", 1) if run.startswith("none") else run


def run_config(run: str) -> dict | None:
    """A run's ``model.fp8``: ``none`` (bf16); ``<recipe>`` (dense linears only); ``<recipe>+experts`` (and the routed
    experts); ``<recipe>+experts-only`` (the routed experts only, every dense linear kept in bf16); any of them with
    ``@<seed>`` (``run_seed``)."""
    run = run.partition("@")[0]
    if run == "none":
        return None
    recipe, _, what = run.partition("+")
    if what not in ("", "experts", "experts-only"):
        raise ValueError(f"run {run!r}: expected none, <recipe>, <recipe>+experts or <recipe>+experts-only")
    return {"recipe": recipe, "experts": bool(what), "exclude": DENSE_LINEARS if what == "experts-only" else []}


def train(run: str, data: dict, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """One training run; returns the logged scalars by step."""
    import lightning.pytorch as pl

    from callbacks import ExpertBiasBalancing
    from lightning_modules import DeepSeekV3LitModule, MasterWeightPrecision, WarmupStableCosineLR
    from models.parallel import MasterWeightAdamW

    # Each run compiles afresh: dynamo's cache limit (8 entries a function) counts the entries of earlier runs, and
    # the third run of a process hit it (Block.forward: dense and MoE blocks, train and eval, per run).
    torch._dynamo.reset()
    pl.seed_everything(run_seed(run), verbose=False)
    steps = data["train"].shape[0]
    tokens_per_step = data["train"].shape[1] * (data["train"].shape[2] - 1)
    module = DeepSeekV3LitModule(
        preset="tiny",
        overrides={**CONVERGENCE_MODEL, **args.model_overrides, "vocab_size": data["vocab"]},
        seq_len=data["train"].shape[-1] - 1,
        optimizer=lambda p: MasterWeightAdamW(p, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        lr_scheduler=lambda o: WarmupStableCosineLR(
            o,
            warmup_steps=steps // 10,
            decay_start_tokens=steps // 2 * tokens_per_step,
            decay_tokens=(steps - steps // 2) * tokens_per_step,
            final_lr_ratio=0.1,
        ),
        compile=args.compile,
        fp8=run_config(run),
    )
    recorder = _Recorder()
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        plugins=[MasterWeightPrecision()],  # bf16 parameters, fp32 masters in MasterWeightAdamW (bench-1gpu's)
        max_steps=steps,
        gradient_clip_val=1.0,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=recorder,
        log_every_n_steps=1,
        callbacks=[ExpertBiasBalancing(gamma=1e-3)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(list(data["train"].long()), batch_size=None)
    val = torch.utils.data.DataLoader(list(data["val"].long()), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val)
    print(f"{run}: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return recorder.rows


def write_csv(path: Path, results: dict[str, dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "train_ce", "val_ce"])
        for run, rows in results.items():
            for step in sorted(rows):
                train_ce, val_ce = rows[step].get("train/ce_loss"), rows[step].get("val/loss")
                if train_ce is None and val_ce is None:
                    continue
                fmt = lambda v: "" if v is None else f"{v:.5f}"  # noqa: E731
                writer.writerow([run, step, fmt(train_ce), fmt(val_ce)])


def read_csv(path: Path) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            entry = results.setdefault(row["run"], {}).setdefault(int(row["step"]), {})
            if row["train_ce"]:
                entry["train/ce_loss"] = float(row["train_ce"])
            if row["val_ce"]:
                entry["val/loss"] = float(row["val_ce"])
    return results


def _series(rows: dict, key: str) -> tuple[list[int], list[float]]:
    steps = sorted(s for s in rows if key in rows[s])
    return steps, [rows[s][key] for s in steps]


def bf16_run_of(run: str, runs) -> str | None:  # noqa: ANN001 - any container of run names
    """The bf16 run an FP8 run is compared with: ``none@<its seed>``, else ``none`` (seed 0), else None."""
    return next((name for name in (f"none@{run_seed(run)}", "none") if name in runs), None)


def summary(results: dict[str, dict]) -> str:
    """Each run's final losses and its relative gap to the bf16 run of its seed (``none@<seed>``; ``none`` where that
    seed has none), then, over seeds, the mean and spread of each recipe's paired gaps against bf16's own spread."""
    finals = {}
    for run, rows in results.items():
        _, train_ce = _series(rows, "train/ce_loss")
        _, val_ce = _series(rows, "val/loss")
        finals[run] = (sum(train_ce[-TAIL:]) / len(train_ce[-TAIL:]), val_ce[-1] if val_ce else float("nan"))

    lines = [
        f"| run | train CE (mean of last {TAIL} steps) | gap to bf16 | final val CE | gap to bf16 | bf16 run |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    paired: dict[str, list[float]] = {}
    for run, (tr, va) in finals.items():
        ref = bf16_run_of(run, finals)
        if ref is None or run_config(run) is None:  # no bf16 run, or a bf16 run itself
            gaps, ref_label = ["—", "—"], "—"
        else:
            rel = [100 * (a / b - 1) for a, b in zip((tr, va), finals[ref], strict=True)]
            gaps, ref_label = [f"{g:+.3f} %" for g in rel], run_label(ref)
            if run_seed(ref) == run_seed(run):
                paired.setdefault(run.partition("@")[0], []).append(rel[0])
        lines.append(f"| {run_label(run)} | {tr:.4f} | {gaps[0]} | {va:.4f} | {gaps[1]} | {ref_label} |")
    bf16_runs = sorted((run for run in finals if run_config(run) is None), key=run_seed)
    base = bf16_runs[0] if bf16_runs else None  # the noise floor: bf16 at its other seeds against its lowest seed
    floor = [100 * (finals[run][0] / finals[base][0] - 1) for run in bf16_runs[1:]]
    floor_name = f"bf16 at other seeds vs bf16 at seed {run_seed(base) if base else 0} (the noise floor)"
    rows = ([(floor_name, floor)] if floor else []) + [
        (f"{recipe} vs bf16 of the same seed", gaps) for recipe, gaps in paired.items()
    ]
    if any(len(g) > 1 for _, g in rows) or floor:
        lines += ["", "| train CE gap, over seeds | runs | mean | min | max |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, gaps in rows:
            mean = sum(gaps) / len(gaps)
            lines.append(f"| {name} | {len(gaps)} | {mean:+.3f} % | {min(gaps):+.3f} % | {max(gaps):+.3f} % |")
    return "\n".join(lines)


def plot(path: Path, results: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(12, 4.2))
    window = 25
    smooth = lambda v: [
        sum(v[max(0, i - window + 1) : i + 1]) / len(v[max(0, i - window + 1) : i + 1]) for i in range(len(v))
    ]  # noqa: E501, E731
    for run, rows in results.items():
        label = run_label(run) if run.startswith("none") else f"fp8 {run}"
        steps, ce = _series(rows, "train/ce_loss")
        ax.plot(steps, smooth(ce), label=f"{label} train (mean of {window})", lw=1)
        vsteps, vce = _series(rows, "val/loss")
        ax.plot(vsteps, vce, "o--", ms=3, label=f"{label} validation")
        ref_steps, ref = _series(results.get(bf16_run_of(run, results), {}), "train/ce_loss")
        if run_config(run) is not None and steps == ref_steps:  # each FP8 run against the bf16 run of its seed
            gap = [100 * (a / b - 1) for a, b in zip(smooth(ce), smooth(ref), strict=True)]
            ax_gap.plot(steps, gap, label=label, lw=1)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title=title, ylim=(None, None))
    ax_gap.axhline(0.25, color="k", ls=":", lw=1, label="report's 0.25 % bar")
    ax_gap.axhline(-0.25, color="k", ls=":", lw=1)
    ax_gap.set(xlabel="optimizer step", ylabel="train CE gap to bf16 (%)", title=f"relative gap (mean of {window})")
    gaps = [line.get_ydata()[window:] for line in ax_gap.get_lines()[:-2]]  # past the first window's transient
    top = max([2.0] + [max(g, default=0) for g in gaps])
    bottom = min([-1.0] + [min(g, default=0) for g in gaps])
    ax_gap.set_ylim(1.1 * bottom, 1.1 * top)
    ax.legend(fontsize=7)
    ax_gap.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump-batches", type=Path, help="tokenise the corpus, save the batches here, and stop")
    p.add_argument("--batches", type=Path, help="train on batches saved by --dump-batches")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument(
        "--runs", default="none,blockwise+experts,tensorwise", help="none (bf16) and FP8 runs (see run_config)"
    )
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--model-overrides", type=json.loads, default={}, help="JSON changes to CONVERGENCE_MODEL")
    p.add_argument("--plot-csv", type=Path, nargs="+", help="only re-plot these CSVs (their runs merged) into --out")
    p.add_argument("--title", default=None)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dump_batches is not None:
        dump_batches(args.dump_batches, args.steps, args.batch_size, args.seq_len, args.val_batches)
        return
    if args.plot_csv is not None:
        results = {run: rows for path in args.plot_csv for run, rows in read_csv(path).items()}
        if len(args.plot_csv) > 1:
            write_csv(args.out / "fp8_convergence.csv", results)  # the merged runs
    else:
        data = torch.load(args.batches)
        data["train"], data["val"] = data["train"][: args.steps], data["val"][: args.val_batches]
        results = {}
        runs = args.runs.split(",")
        for run in runs:
            run_config(run), run_seed(run)  # noqa: B018 - a bad name fails before any training
        for run in runs:
            results[run] = train(run, data, args)
            write_csv(args.out / "fp8_convergence.csv", results)  # after each run: a timeout keeps the finished
    from models import DeepSeekV3Config

    config = DeepSeekV3Config.from_preset("tiny", **{**CONVERGENCE_MODEL, **args.model_overrides, "vocab_size": 4096})
    title = args.title or f"{config.num_params() / 1e9:.2f}B-param MoE on Shakespeare, same data and seed"
    try:
        plot(args.out / "fp8_convergence.png", results, title)
    except ImportError:
        print("matplotlib missing: no plot (re-plot later with --plot-csv)")
    print(summary(results))


if __name__ == "__main__":
    main()
