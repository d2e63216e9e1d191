"""Executed pipeline schedules, timed: per-rank timelines of F, B, I, W and communication waits, and the measured
idle (bubble) time against the DualPipe report's formulas.

Runs the same DeepSeekV3 (``--layers`` main blocks, no MTP so that loop-placed schedules can run it too) on
``--ranks`` gloo CPU processes (one thread each) under 1F1B, Interleaved1F1B, ZBV and DualPipeV without and with
the F&B overlap, at the same global batch and micro-batch count, and times every stage call of the last step:

    python benchmarks/pipeline_schedule.py                  # 2 ranks, 8 layers, 8 micro-batches
    python benchmarks/pipeline_schedule.py --ranks 4 --layers 8 --microbatches 8

Bubble formulas (DeepSeek-V3 report, table 2; DualPipe's README for DualPipeV on PP/2 devices), with F, B, W the
forward, full-backward and weight-backward times of one chunk and F&B an overlapped forward+backward pair, all
measured here on the V schedules' chunks (layers / (2 x ranks) blocks; a 1F1B stage is two chunks):
  1F1B      (PP - 1)(F + B)          PP = ranks, per stage
  ZB1P      (PP - 1)(F + B - 2W)     PP = ranks, per stage
  DualPipeV (PP/2 - 1)(F&B + B - 3W) PP = 2 x ranks chunks, per chunk
The measured bubble of a run is each rank's step time minus its busy time (union of its compute spans), averaged
over ranks. Writes ``<out>/pipeline_schedule.md`` (table), ``.json`` (timelines) and ``docs/figures/
pipeline_schedule.svg``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.parallel.pipeline as pipeline_module  # noqa: E402
from models import DeepSeekV3, DeepSeekV3Config  # noqa: E402
from models.parallel.pipeline import (  # noqa: E402
    PipelineConfig,
    build_pipeline,
    prune_to_stages,
    stage_layer_ranges,
    stages_of_rank,
)

RUNS = [  # (label, schedule, overlap)
    ("1F1B", "1F1B", False),
    ("Interleaved1F1B", "Interleaved1F1B", False),
    ("ZBV", "ZBVZeroBubble", False),
    ("DualPipeV (F&B sequential)", "DualPipeV", False),
    ("DualPipeV (F&B overlapped)", "DualPipeV", True),
]
COLORS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868", "wait": "#bbbbbb"}


def _config(args: argparse.Namespace) -> DeepSeekV3Config:
    return DeepSeekV3Config.from_preset(
        "tiny", num_hidden_layers=args.layers, num_nextn_predict_layers=0, vocab_size=512, max_position_embeddings=512
    )


class Recorder:
    """Wraps a rank's PipelineStage calls and the schedule's p2p waits to record (kind, stage, mb, start, end)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.on = False

    def span(self, kind: str, stage: int, mb: int | None, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.on:
                self.events.append(dict(kind=kind, stage=stage, mb=mb, start=start, end=time.perf_counter()))

    def wrap_stage(self, stage) -> None:  # noqa: ANN001
        forward, backward, weight = stage.forward_one_chunk, stage.backward_one_chunk, stage.backward_weight_one_chunk
        idx = stage.stage_index
        stage.forward_one_chunk = lambda mb, *a, **k: self.span("F", idx, mb, forward, mb, *a, **k)

        def backward_one_chunk(mb, loss=None, full_backward=True, last_backward=False):  # noqa: ANN001, ANN202
            kind = "B" if full_backward else "I"
            return self.span(
                kind, idx, mb, backward, mb, loss=loss, full_backward=full_backward, last_backward=last_backward
            )

        stage.backward_one_chunk = backward_one_chunk
        stage.backward_weight_one_chunk = lambda mb, **k: self.span("W", idx, mb, weight, mb, **k)

    def wrap_waits(self) -> None:
        import torch.distributed.pipelining.schedules as schedules

        wait = schedules._wait_batch_p2p

        def recorded(work):  # noqa: ANN001, ANN202
            return self.span("wait", -1, None, wait, work)

        schedules._wait_batch_p2p = recorded
        pipeline_module._wait_batch_p2p = recorded


def _run(rank: int, args: argparse.Namespace, schedule: str, overlap: bool, out: str) -> None:
    torch.set_num_threads(1)
    config, world = _config(args), args.ranks
    pipeline = PipelineConfig(schedule=schedule, n_microbatches=args.microbatches, overlap=overlap)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    prune_to_stages(model, stage_layer_ranges(config, pipeline, world), stages_of_rank(pipeline, world, rank))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    micro = args.batch // args.microbatches
    runner = build_pipeline(model, pipeline, dist.group.WORLD, micro, args.seq, torch.device("cpu"))
    recorder = Recorder()
    for stage in runner.pipeline_stages:
        recorder.wrap_stage(stage)
    recorder.wrap_waits()
    generator = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        tokens = torch.randint(config.vocab_size, (args.batch, args.seq + 1), generator=generator)
        recorder.on = step == args.steps - 1
        dist.barrier()
        start = time.perf_counter()
        runner.step(tokens)
        end = time.perf_counter()
        for p in model.parameters():
            p.grad = None
    t0 = torch.tensor([start], dtype=torch.float64)
    dist.all_reduce(t0, op=dist.ReduceOp.MIN)  # perf_counter is CLOCK_MONOTONIC: one clock for the host
    record = dict(rank=rank, start=start - t0.item(), end=end - t0.item(), events=recorder.events, t0=t0.item())
    for e in record["events"]:
        e["start"] -= t0.item()
        e["end"] -= t0.item()
    Path(f"{out}-rank{rank}.json").write_text(json.dumps(record))


def _worker(rank: int, args: argparse.Namespace, schedule: str, overlap: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}.rdzv", rank=rank, world_size=args.ranks)
    try:
        _run(rank, args, schedule, overlap, out)
    finally:
        dist.destroy_process_group()


def _union(spans: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(spans):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def _summarise(records: list[dict]) -> dict:
    compute = ("F", "B", "I", "W")
    step = [r["end"] - r["start"] for r in records]
    busy = [_union([(e["start"], e["end"]) for e in r["events"] if e["kind"] in compute]) for r in records]
    durations: dict[str, list[float]] = {k: [] for k in compute}
    for r in records:
        for e in r["events"]:
            if e["kind"] in compute:
                durations[e["kind"]].append(e["end"] - e["start"])
    mean = {k: (sum(v) / len(v) if v else 0.0) for k, v in durations.items()}
    idle = [s - b for s, b in zip(step, busy, strict=True)]
    fraction = sum(i / s for i, s in zip(idle, step, strict=True)) / len(idle)
    counts = {k: len(v) for k, v in durations.items()}
    return dict(step=max(step), idle=sum(idle) / len(idle), idle_fraction=fraction, mean=mean, count=counts)


def _overlap_pairs(records: list[dict]) -> float:
    """Mean wall time of a concurrent (F, B) pair on one rank: from the earlier start to the later end."""
    spans = []
    for r in records:
        fs = [e for e in r["events"] if e["kind"] == "F"]
        bs = [e for e in r["events"] if e["kind"] == "B"]
        for f in fs:
            for b in bs:
                if b["start"] < f["end"] and f["start"] < b["end"]:
                    spans.append(max(f["end"], b["end"]) - min(f["start"], b["start"]))
    return sum(spans) / len(spans) if spans else 0.0


def _svg(runs: list[tuple[str, list[dict]]], path: Path) -> None:
    width, label_w, row_h, gap = 1100, 230, 18, 14
    scale = (width - label_w - 20) / max(r["end"] for _, recs in runs for r in recs)
    rows = sum(len(recs) for _, recs in runs)
    height = rows * row_h + len(runs) * gap + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">']
    out.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    y = 10
    for label, recs in runs:
        for r in sorted(recs, key=lambda r: r["rank"]):
            out.append(f'<text x="4" y="{y + 13}" font-size="11">{html.escape(label)}, rank {r["rank"]}</text>')
            out.append(
                f'<rect x="{label_w}" y="{y + 1}" width="{(r["end"] - r["start"]) * scale:.1f}" height="{row_h - 2}" '
                'fill="#f4f4f4" stroke="#999" stroke-width="0.5"/>'
            )
            for e in r["events"]:
                x, w = label_w + e["start"] * scale, max(0.5, (e["end"] - e["start"]) * scale)
                # A concurrent F/B pair: B in the lower half of the row, F in the upper half.
                half = e["kind"] == "B" and any(
                    f["kind"] == "F" and f["start"] < e["end"] and e["start"] < f["end"] for f in r["events"]
                )
                top, h = (y + row_h / 2, row_h / 2 - 1) if half else (y + 1, row_h - 2)
                if e["kind"] == "F" and any(
                    b["kind"] == "B" and b["start"] < e["end"] and e["start"] < b["end"] for b in r["events"]
                ):
                    h = row_h / 2 - 1
                text = f"{e['stage']}{e['kind']}{e['mb'] if e['mb'] is not None else ''}"
                out.append(
                    f'<rect x="{x:.1f}" y="{top:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{COLORS[e["kind"]]}">'
                    f"<title>{text} {1e3 * (e['end'] - e['start']):.1f} ms</title></rect>"
                )
            y += row_h
        y += gap
    x = label_w
    for kind, color in COLORS.items():
        name = {"wait": "p2p wait"}.get(kind, kind)
        out.append(f'<rect x="{x}" y="{y + 4}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="{y + 14}" font-size="11">{name}</text>')
        x += 90
    out.append(f'<text x="{x + 20}" y="{y + 14}" font-size="11">time axis shared by all rows; one training step</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="the last one is timed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/pipeline_schedule.svg"))
    parser.add_argument("--plot-json", type=Path, help="only redraw the figure from a pipeline_schedule.json")
    args = parser.parse_args()
    if args.plot_json is not None:
        _svg([tuple(run) for run in json.loads(args.plot_json.read_text())["runs"]], args.figure)
        return
    args.out = args.out.resolve()  # file:// rendezvous URLs need an absolute path
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    runs, summaries = [], {}
    for label, schedule, overlap in RUNS:
        tag = str(args.out / f".pipeline_{schedule}_{int(overlap)}")
        mp.start_processes(_worker, args=(args, schedule, overlap, tag), nprocs=args.ranks, start_method="fork")
        records = [json.loads(Path(f"{tag}-rank{r}.json").read_text()) for r in range(args.ranks)]
        for r in range(args.ranks):
            Path(f"{tag}-rank{r}.json").unlink()
        Path(f"{tag}.rdzv").unlink(missing_ok=True)
        runs.append((label, records))
        summaries[label] = _summarise(records) | {"pair": _overlap_pairs(records)}
        print(f"{label}: step {summaries[label]['step'] * 1e3:.0f} ms, idle {summaries[label]['idle'] * 1e3:.0f} ms")
    _report(args, runs, summaries)


def _report(args: argparse.Namespace, runs: list, summaries: dict) -> None:
    pp = args.ranks
    chunk = summaries["ZBV"]["mean"]  # V chunks with I/W split everywhere: F, I (= B - W), W per chunk
    f, w = chunk["F"], chunk["W"]
    b = summaries["DualPipeV (F&B sequential)"]["mean"]["B"] or chunk["I"] + w
    fb = summaries["DualPipeV (F&B overlapped)"]["pair"] or f + b
    predicted = {
        "1F1B": (pp - 1) * (2 * f + 2 * b),
        "ZB1P": (pp - 1) * (2 * f + 2 * b - 4 * w),
        "DualPipeV": (pp - 1) * (fb + b - 3 * w),
    }
    lines = [
        f"# Pipeline schedules on {pp} gloo CPU ranks ({platform.processor() or platform.machine()}, 1 thread each)",
        "",
        f"`python benchmarks/pipeline_schedule.py --ranks {pp} --layers {args.layers} --microbatches "
        f"{args.microbatches} --batch {args.batch} --seq {args.seq}`, {time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}; tiny preset, {args.layers} layers, no MTP; the last of {args.steps} steps timed.",
        "",
        f"Per chunk ({args.layers // (2 * pp)} blocks, micro-batch {args.batch // args.microbatches} x {args.seq}): "
        f"F {f * 1e3:.1f} ms, B {b * 1e3:.1f} ms, W {w * 1e3:.1f} ms, F&B overlapped {fb * 1e3:.1f} ms "
        f"(F + B = {(f + b) * 1e3:.1f} ms).",
        "",
        "| schedule | step (ms) | measured idle per rank (ms) | idle fraction | report's formula | formula (ms) |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    formula = {
        "1F1B": ("(PP-1)(F+B), per stage", predicted["1F1B"]),
        "DualPipeV (F&B sequential)": ("(PP/2-1)(F&B+B-3W), F&B = F+B", (pp - 1) * (f + 2 * b - 3 * w)),
        "DualPipeV (F&B overlapped)": ("(PP/2-1)(F&B+B-3W)", predicted["DualPipeV"]),
    }
    for label, s in summaries.items():
        name, value = formula.get(label, ("", None))
        lines.append(
            f"| {label} | {s['step'] * 1e3:.0f} | {s['idle'] * 1e3:.0f} | {100 * s['idle_fraction']:.1f} % | {name} | "
            + (f"{value * 1e3:.0f} |" if value is not None else " |")
        )
    lines += [
        "",
        f"ZB1P's formula at the same PP and chunk times: {predicted['ZB1P'] * 1e3:.0f} ms "
        "(torch has no one-stage zero-bubble schedule to run).",
    ]
    (args.out / "pipeline_schedule.md").write_text("\n".join(lines) + "\n")
    (args.out / "pipeline_schedule.json").write_text(json.dumps({"summaries": summaries, "runs": runs}))
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    _svg(runs, args.figure)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
