"""``SweepRunner`` (trials as subprocesses, N at a time, resume, Ctrl-C), the summary, and ``main``."""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sweeps.config import Param, SweepConfig, format_value
from sweeps.samplers import ListSampler, OptunaSampler
from sweeps.trials import Trial, load_result, log_tail, read_metric, trial_command, write_json

FINISHED = ("completed", "pruned")  # statuses a rerun skips


@dataclass
class _Running:
    trial: Trial
    proc: subprocess.Popen
    log: Any
    slot: int
    start: float


class SweepRunner:
    """Runs the trials of a sweep, ``parallel`` at a time, and writes ``result.json`` files and the summary."""

    def __init__(self, cfg: SweepConfig, poll_s: float = 0.2, grace_s: float = 15.0) -> None:
        self.cfg, self.poll_s, self.grace_s = cfg, poll_s, grace_s
        self.sampler = OptunaSampler(cfg) if cfg.method == "tpe" else ListSampler(cfg)
        self.gpu_slots = _gpu_slots(cfg.parallel)
        self.trials: list[Trial] = []
        self.running: dict[int, _Running] = {}

    def plan(self) -> list[Trial]:
        """All trials of the sweep; those with a finished ``result.json`` on disk are loaded, not rerun."""
        trials = []
        for index in range(len(self.sampler)):
            previous = load_result(self.cfg.sweep_dir / f"trial_{index:03d}")
            if previous and previous.get("status") in FINISHED and self.sampler.resume(index, previous):
                known = set(Trial.__dataclass_fields__)
                trials.append(Trial(**{k: v for k, v in previous.items() if k in known}))
            else:  # a rerun keeps the parameters of a failed/interrupted attempt (TPE)
                trials.append(Trial(index, self.sampler.preview(index, previous)))
        if any(t.status in FINISHED for t in trials):
            self._check_same_base()
        return trials

    def _check_same_base(self) -> None:
        """Finished trials only compare with new ones when the base run and the metric are unchanged."""
        saved_path = self.cfg.sweep_dir / "sweep.yaml"
        if not saved_path.is_file():
            return
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = yaml.safe_load(self.cfg.to_yaml())
        changed = [k for k in ("base", "metric", "mode", "command") if k in saved and saved[k] != now[k]]
        if changed:
            raise ValueError(
                f"{changed} differ from the finished trials' ({saved_path}); their results would not compare. "
                "Use a new name (or out_dir), or restore the old settings"
            )

    def run(self) -> int:
        """Run the unfinished trials; 0 if every trial completed (or was pruned), 1 if some failed, 130 on Ctrl-C."""
        self.trials = self.plan()
        self.cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.sweep_dir / "sweep.yaml").write_text(self.cfg.to_yaml())
        todo = iter([t for t in self.trials if t.status not in FINISHED])
        skipped = sum(t.status in FINISHED for t in self.trials)
        if skipped:
            print(f"[sweep] {self.cfg.name}: {skipped}/{len(self.trials)} trials already finished, skipping them")
        try:
            with _sigterm_as_interrupt():
                self._loop(todo)
        except KeyboardInterrupt:
            print(f"[sweep] interrupted: stopping {len(self.running)} running trial(s)", file=sys.stderr)
            self._stop_all()
            self.write_summary()
            return 130
        self.write_summary()
        return 0 if all(t.status in FINISHED for t in self.trials) else 1

    def _loop(self, todo: Iterator[Trial]) -> None:
        pending = next(todo, None)
        while pending is not None or self.running:
            free = [s for s in range(self.cfg.parallel) if s not in {r.slot for r in self.running.values()}]
            if pending is not None and free:
                self._start(pending, free[0])
                pending = next(todo, None)
                continue
            for run in list(self.running.values()):
                if run.proc.poll() is not None:
                    self._finish(run)
            time.sleep(self.poll_s)

    def _start(self, trial: Trial, slot: int) -> None:
        self.sampler.ask(trial)
        trial_dir = self.cfg.sweep_dir / trial.name
        if trial_dir.exists():  # a failed or interrupted attempt: start clean, one TensorBoard run per trial
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        env = {**os.environ, **{k: str(v) for k, v in self.cfg.env.items()}, "PYTHONUNBUFFERED": "1"}
        if self.gpu_slots:
            env["CUDA_VISIBLE_DEVICES"] = trial.device = self.gpu_slots[slot]
        elif self.cfg.parallel > 1 and "OMP_NUM_THREADS" not in env:  # CPU: share the cores, don't oversubscribe
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.cfg.parallel))
        cmd = trial_command(self.cfg, trial)
        log = open(trial_dir / "trial.log", "wb")  # noqa: SIM115 (closed in _finish / _stop_all)
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        try:  # own session: Ctrl-C reaches only the sweep, which then stops each trial's process group itself
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as err:  # e.g. a `command` that does not exist: this trial fails, the sweep goes on
            log.close()
            trial.status, trial.error = "failed", f"cannot start {cmd[0]!r}: {err}"
            self.sampler.tell(trial)
            write_json(trial_dir / "result.json", asdict(trial))
            print(f"[sweep] {trial.name} failed: {trial.error}", file=sys.stderr)
            return
        trial.status = "running"
        self.running[trial.index] = _Running(trial, proc, log, slot, time.monotonic())
        device = f" on CUDA_VISIBLE_DEVICES={trial.device}" if trial.device else ""
        print(f"[sweep] {trial.name} started{device}: {_short(trial.params)}")

    def _finish(self, run: _Running) -> None:
        trial = run.trial
        del self.running[trial.index]
        run.log.close()
        trial.returncode, trial.duration_s = run.proc.returncode, round(time.monotonic() - run.start, 2)
        trial_dir = self.cfg.sweep_dir / trial.name
        found = read_metric(trial_dir, self.cfg.metric)
        trial.value, trial.step = found if found else (None, None)
        if trial.returncode != 0:
            trial.status, trial.error = "failed", log_tail(trial_dir / "trial.log")
        elif found is None:
            trial.status = "failed"
            trial.error = f"the run logged no {self.cfg.metric!r} scalar; does it validate (val_check_interval)?"
        elif isinstance(self.sampler, OptunaSampler) and self.sampler.was_pruned(trial):
            trial.status = "pruned"
        else:
            trial.status = "completed"
        self.sampler.tell(trial)
        write_json(trial_dir / "result.json", asdict(trial))
        shown = "-" if trial.value is None else f"{trial.value:.5g}"
        print(f"[sweep] {trial.name} {trial.status}: {self.cfg.metric}={shown} ({trial.duration_s:.0f}s)")
        if trial.status == "failed":
            print(f"[sweep] {trial.name} log tail:\n{(trial.error or '')[-1500:]}", file=sys.stderr)

    def _stop_all(self) -> None:
        for run in self.running.values():
            _signal_group(run.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for run in self.running.values():
            try:
                run.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(run.proc, signal.SIGKILL)
                run.proc.wait()
        for run in list(self.running.values()):
            trial = run.trial
            run.log.close()
            trial.status, trial.returncode = "interrupted", run.proc.returncode
            trial.duration_s = round(time.monotonic() - run.start, 2)
            self.sampler.abandon(trial)
            write_json(self.cfg.sweep_dir / trial.name / "result.json", asdict(trial))
        self.running.clear()

    def write_summary(self) -> Path:
        """Write ``summary.csv`` (trials ranked by the metric) and print it as a table."""
        rows = summary_rows(self.cfg, self.trials)
        path = self.cfg.sweep_dir / "summary.csv"
        tmp = path.with_name(".summary.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerows(rows)
        os.replace(tmp, path)
        print(format_table(rows))
        print(f"[sweep] summary: {path}  |  tensorboard --logdir {self.cfg.sweep_dir}")
        return path


def summary_rows(cfg: SweepConfig, trials: list[Trial]) -> list[list[Any]]:
    """Header + one row per trial, best metric first; trials without a value last, in index order."""
    keys = [p.key for p in cfg.space]

    def rank(t: Trial) -> tuple[int, float, int]:
        if t.value is None or math.isnan(t.value):
            return (2, 0.0, t.index)
        return (0 if t.status == "completed" else 1, t.value if cfg.mode == "min" else -t.value, t.index)

    rows: list[list[Any]] = [["trial", "status", cfg.metric, "step", *keys, "duration_s"]]
    for t in sorted(trials, key=rank):
        rows.append([t.name, t.status, t.value, t.step, *(t.params.get(k) for k in keys), t.duration_s])
    return rows


def format_table(rows: list[list[Any]]) -> str:
    """Plain fixed-width table."""

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(text[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in text)


def _gpu_slots(parallel: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` per slot when there are several GPUs: disjoint groups, or round-robin if too few."""
    count = torch.cuda.device_count()
    if count <= 1:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    if parallel >= count:
        return [ids[s % count] for s in range(parallel)]
    per = count // parallel
    return [",".join(ids[s * per : (s + 1) * per]) for s in range(parallel)]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a scheduler's stop) like Ctrl-C, so the trials are stopped and the summary written."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in params.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3 sweep",
        description="Run a hyperparameter sweep of `dsv3 fit` trials (see docs/sweeps.md).",
    )
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/tiny_lr.yaml")
    parser.add_argument("--parallel", type=int, help="trials at once (overrides the YAML's parallel)")
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir", help="root of the sweep dirs (YAML: out_dir)")
    parser.add_argument("--name", help="sweep name, the directory under out_dir (YAML: name)")
    parser.add_argument("--num_trials", "--num-trials", dest="num_trials", type=int, help="random/tpe trial count")
    parser.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true", help="print the commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dsv3 sweep``: run (or resume) the sweep of ``--config``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = SweepConfig.from_yaml(
            args.config, parallel=args.parallel, out_dir=args.out_dir, name=args.name, num_trials=args.num_trials
        )
        if args.dry_run:
            if cfg.method == "tpe":
                print("[sweep] dry run of a tpe sweep: showing the first trial with the space's first values")
            trials = ListSampler(cfg).params if cfg.method != "tpe" else [{p.key: _first(p) for p in cfg.space}]
            for index, params in enumerate(trials):
                print(shlex.join(trial_command(cfg, Trial(index, params))))
            return 0
        return SweepRunner(cfg).run()
    except (ValueError, FileNotFoundError) as err:
        print(f"dsv3 sweep: error: {err}", file=sys.stderr)
        return 2


def _first(p: Param) -> Any:
    return p.values[0] if p.kind == "choice" else p.low
