"""MaxVio of the tiny preset trained with and without aux-loss-free balancing (ExpertBiasBalancing).

Trains the ``tiny`` preset twice from the same initialisation on the same batches (the bundled Shakespeare
corpus through ``PretrainDataModule``, or random tokens), once with ``ExpertBiasBalancing`` and once without,
and records every optimizer step's MaxVio (``MoELoadMonitor``, over the whole global batch) and losses. The
complementary sequence-wise balance loss (``seq_aux_alpha``, 1e-4 by default) is on in both runs, as in the report.

    python benchmarks/maxvio_curve.py                       # CPU or GPU, Shakespeare, writes docs/figures/
    python benchmarks/maxvio_curve.py --dump-batches b.pt   # tokenize once (needs `datasets`), then
    python benchmarks/maxvio_curve.py --batches b.pt        # train from the saved batches (e.g. on a GPU box)
    python benchmarks/maxvio_curve.py --batches b.pt --batch-size 8 --seq-len 128 --steps 400 --parallel  # 2 CPUs

Outputs: ``<out>/maxvio_tiny.csv`` (step, run, MaxVio mean/max over layers, per-layer MaxVio, losses) and
``<out>/maxvio_tiny.png``.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks import ExpertBiasBalancing, MoECounts, MoELoadMonitor, ThroughputMonitor  # noqa: E402
from models import DeepSeekV3, DeepSeekV3Config  # noqa: E402

RUNS = ("with_balancing", "without_balancing")


class _Module(pl.LightningModule):
    def __init__(self, config: DeepSeekV3Config, lr: float) -> None:
        super().__init__()
        self.model = DeepSeekV3(config)
        self.moe_counts = MoECounts(self.model)  # read by the MoE callbacks
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(batch[:, :-1], labels=batch[:, 1:], return_logits=False)
        self.log("train/ce_loss", out.ce_loss)
        self.log("train/balance_loss", out.balance_loss)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1)


class _Recorder(Logger):
    """Keeps every logged scalar by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    name = "recorder"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})


def shakespeare_batches(steps: int, batch_size: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    from datamodules import PretrainDataModule

    dm = PretrainDataModule(vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size)
    dm.setup("fit")
    batches = []
    while len(batches) < steps:
        for batch in dm.train_dataloader():
            batches.append(batch)
            if len(batches) == steps:
                break
    return torch.stack(batches)  # (N, B, S+1)


def run(config: DeepSeekV3Config, batches: torch.Tensor, balance: bool, args: argparse.Namespace) -> dict:
    pl.seed_everything(0, verbose=False)
    module = _Module(config, args.lr)
    recorder = _Recorder()
    callbacks = [
        MoELoadMonitor(log_every_n_steps=1, image_every_n_steps=10**9),
        ThroughputMonitor(log_every_n_steps=100),
    ]
    if balance:
        callbacks.insert(0, ExpertBiasBalancing(gamma=args.gamma))
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=len(batches),
        precision=args.precision,
        logger=recorder,
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(list(batches.long()), batch_size=None))
    perf = [{k: round(v, 4) for k, v in r.items() if k.startswith("perf/")} for r in recorder.rows.values()]
    seconds = time.perf_counter() - start
    name = "with" if balance else "without"
    print(f"{name} balancing: {len(batches)} steps in {seconds:.0f} s; last throughput {[p for p in perf if p][-1:]}")
    return recorder.rows


def _run_one_thread(*args) -> dict:
    torch.set_num_threads(1)
    return run(*args)


def write_csv(path: Path, results: dict[str, dict], layer_ids: list[int]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "run",
                "step",
                "max_vio",
                "max_vio_max",
                *[f"layer{i}_max_vio" for i in layer_ids],
                "ce_loss",
                "balance_loss",
            ]
        )
        for name, rows in results.items():
            for step in sorted(s for s in rows if "moe/max_vio" in rows[s]):
                r = rows[step]
                layers = [f"{r[f'moe/layer{i}/max_vio']:.4f}" for i in layer_ids]
                # Lightning logs a batch's training_step values under the step count before its optimizer step.
                logged = rows.get(step - 1, {})
                losses = [f"{logged.get(k, float('nan')):.4f}" for k in ("train/ce_loss", "train/balance_loss")]
                writer.writerow(
                    [name, step, f"{r['moe/max_vio']:.4f}", f"{r['moe/max_vio_max']:.4f}", *layers, *losses]
                )


def plot(path: Path, results: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_vio, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, rows), color in zip(results.items(), ("tab:blue", "tab:red"), strict=False):
        steps = sorted(s for s in rows if "moe/max_vio" in rows[s])
        label = name.replace("_", " ")
        ax_vio.plot(steps, [rows[s]["moe/max_vio"] for s in steps], color=color, label=f"{label} (mean over layers)")
        worst = [rows[s]["moe/max_vio_max"] for s in steps]
        ax_vio.plot(steps, worst, color=color, alpha=0.3, label=f"{label} (worst layer)")
        loss_steps = [s for s in steps if s - 1 in rows and "train/ce_loss" in rows[s - 1]]
        ax_loss.plot(loss_steps, [rows[s - 1]["train/ce_loss"] for s in loss_steps], color=color, label=label)
    ax_vio.set(xlabel="optimizer step", ylabel="MaxVio of the global batch", yscale="log", title=title)
    ax_loss.set(xlabel="optimizer step", ylabel="train cross-entropy", title="next-token loss")
    ax_vio.legend(fontsize=8)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def read_csv(path: Path) -> dict[str, dict]:
    """The results dict of a CSV written by ``write_csv`` (to re-plot without training)."""
    results: dict[str, dict] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            rows = results.setdefault(row["run"], {})
            step = int(row["step"])
            rows.setdefault(step, {}).update(
                {"moe/max_vio": float(row["max_vio"]), "moe/max_vio_max": float(row["max_vio_max"])}
            )
            rows.setdefault(step - 1, {})["train/ce_loss"] = float(row["ce_loss"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gamma", type=float, default=1e-3, help="bias update speed (report: 0.001)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--data", choices=("shakespeare", "random"), default="shakespeare")
    parser.add_argument("--batches", type=Path, help="train on batches saved by --dump-batches")
    parser.add_argument("--dump-batches", type=Path, help="tokenize, save the batches here, and stop")
    parser.add_argument("--parallel", action="store_true", help="run both trainings at once, one CPU thread each")
    parser.add_argument("--plot-csv", type=Path, help="only re-plot this CSV (to --out/maxvio_tiny.png)")
    parser.add_argument("--title", default=None, help="plot title (default: the run's shape and device)")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()

    if args.plot_csv is not None:
        plot(args.out / "maxvio_tiny.png", read_csv(args.plot_csv), args.title or "tiny preset")
        return
    vocab_size = DeepSeekV3Config.from_preset("tiny").vocab_size
    if args.batches is not None:
        batches = torch.load(args.batches).long()[: args.steps, : args.batch_size, : args.seq_len + 1]
    elif args.data == "shakespeare":
        batches = shakespeare_batches(args.steps, args.batch_size, args.seq_len, vocab_size)
    else:
        generator = torch.Generator().manual_seed(0)
        batches = torch.randint(0, vocab_size, (args.steps, args.batch_size, args.seq_len + 1), generator=generator)
    if args.dump_batches is not None:
        torch.save(batches.to(torch.int16), args.dump_batches)
        print(f"saved {tuple(batches.shape)} batches to {args.dump_batches}")
        return

    config = DeepSeekV3Config.from_preset("tiny", max_position_embeddings=max(1024, args.seq_len))
    if args.parallel:  # one process per run, one thread each (CPU)
        with multiprocessing.get_context("fork").Pool(len(RUNS)) as pool:
            rows = pool.starmap(_run_one_thread, [(config, batches, name == RUNS[0], args) for name in RUNS])
        results = dict(zip(RUNS, rows, strict=True))
    else:
        results = {name: run(config, batches, name == RUNS[0], args) for name in RUNS}
    layer_ids = [i for i in range(config.num_hidden_layers + config.num_nextn_predict_layers) if config.is_moe_layer(i)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "maxvio_tiny.csv", results, layer_ids)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    title = (
        args.title
        or f"tiny preset, {batches.shape[1]}x{batches.shape[2] - 1} tokens/step, gamma={args.gamma}, {device}"
    )
    plot(args.out / "maxvio_tiny.png", results, title)
    for name, rows in results.items():
        marks = [s for s in (1, 50, 100, 200, 300, 500, 750, 1000) if s in rows and "moe/max_vio" in rows[s]]
        print(name, ", ".join(f"step {s}: {rows[s]['moe/max_vio']:.3f}" for s in marks))


if __name__ == "__main__":
    main()
