"""Hyperparameter sweeps over ``dsv3 fit``: grid, random and Optuna TPE (with pruning), one TensorBoard run per trial.

A sweep YAML names a base run (fit YAMLs + fixed ``--key=value`` overrides), a metric and a search space over
any ``dsv3 fit`` flag. Each trial is an ordinary ``dsv3 fit`` subprocess logging to
``<out_dir>/<name>/trial_NNN/`` (its TensorBoard version directory), so TensorBoard's HParams tab compares the
trials. The metric is read back from the trial's event files. Each trial leaves a ``result.json`` (status,
metric, params; written atomically), so rerunning the same command skips finished trials and reruns failed
ones; ``summary.csv`` ranks the trials. Ctrl-C terminates the running trials, marks them ``interrupted``,
writes the summary and exits with 130.

Example::

    dsv3 sweep --config configs/sweeps/tiny_lr.yaml --parallel 2
    tensorboard --logdir runs/sweeps/tiny_lr
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

DEFAULT_COMMAND = (sys.executable, "-m", "lightning_modules.cli", "fit")
FINISHED = ("completed", "pruned")  # statuses a rerun skips
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
METHODS = ("grid", "random", "tpe")
OPTUNA_MISSING = "method 'tpe' needs optuna: pip install 'dsv3[sweep]' (or pip install optuna)"


# ---------------------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One searched flag: ``choice`` over ``values``, or ``uniform``/``loguniform``/``int`` on ``[low, high]``."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: int = 1

    def grid(self) -> list[Any]:
        """The values a grid sweep takes (choice values, or every ``step``-th integer in ``[low, high]``)."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step))
        raise ValueError(
            f"space.{self.key}: a grid cannot enumerate a {self.kind} range; use a list of values "
            "(or method: random / tpe)"
        )

    def sample(self, rng: random.Random) -> Any:
        """One random draw."""
        if self.kind == "choice":
            return rng.choice(self.values)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.choice(self.grid())

    def optuna_distribution(self) -> Any:
        """The matching ``optuna.distributions`` object."""
        from optuna import distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution(self.values)
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), step=self.step)
        return d.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")


def parse_param(key: str, spec: Any) -> Param:
    """Parse one ``space`` entry: a list (choice) or ``{choice|uniform|loguniform|int: [...], step: n}``."""
    if isinstance(spec, list):
        spec = {"choice": spec}
    kinds = [k for k in DISTRIBUTIONS if isinstance(spec, dict) and k in spec]
    extra = set(spec) - {*DISTRIBUTIONS, "step"} if isinstance(spec, dict) else set()
    if len(kinds) != 1 or extra:
        raise ValueError(
            f"space.{key}: expected a list of values or a mapping with one of {list(DISTRIBUTIONS)} "
            f"(e.g. {{loguniform: [1.0e-4, 1.0e-2]}}), got {spec!r}; fixed values belong in base.overrides"
        )
    kind, arg = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"space.{key}.choice must be a non-empty list, got {arg!r}")
        return Param(key, kind, values=tuple(arg))
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float) for v in arg)):
        raise ValueError(f"space.{key}.{kind} must be [low, high] numbers, got {arg!r}")
    low, high = arg
    step = spec.get("step", 1)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"space.{key}.{kind}: need low < high{' and low > 0' if kind == 'loguniform' else ''}")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int) and isinstance(step, int) and step > 0):
        raise ValueError(f"space.{key}.int: low, high and step must be integers (step > 0), got {spec!r}")
    return Param(key, kind, low=low, high=high, step=step)


def parse_space(raw: dict[str, Any]) -> list[Param]:
    """Parse the ``space`` mapping (flag -> distribution), keeping its order."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("space must be a non-empty mapping of dsv3 fit flags to values or distributions")
    return [parse_param(_flag(key), spec) for key, spec in raw.items()]


def grid_trials(space: list[Param]) -> list[dict[str, Any]]:
    """Cartesian product of the grid values, last key varying fastest."""
    keys = [p.key for p in space]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(p.grid() for p in space))]


def random_trials(space: list[Param], num_trials: int, seed: int) -> list[dict[str, Any]]:
    """``num_trials`` independent random draws; trial i is the same for the same seed (resume relies on it)."""
    rng = random.Random(seed)
    return [{p.key: p.sample(rng) for p in space} for _ in range(num_trials)]


# ---------------------------------------------------------------------------------------------- config
@dataclass
class SweepConfig:
    """A sweep, as read from ``configs/sweeps/<name>.yaml``.

    Attributes:
        name: Sweep name; trials go to ``<out_dir>/<name>/trial_NNN/``.
        configs: Base ``dsv3 fit`` YAML(s), passed as ``--config`` in order (last wins).
        overrides: Fixed ``dsv3 fit`` flags for every trial, ``{key: value}`` (passed as ``--key=value``).
        space: Searched flags: ``{key: [values]}`` or ``{key: {choice|uniform|loguniform|int: ..., step: n}}``.
        metric: Scalar tag read from each trial's TensorBoard events (last logged value).
        mode: ``min`` or ``max``.
        method: ``grid``, ``random`` or ``tpe`` (Optuna TPE with pruning; needs ``dsv3[sweep]``).
        num_trials: Trials for random/tpe (grid: the product of the value lists).
        seed: Seed of the random draws and of the TPE sampler.
        parallel: Trials run at once; with several GPUs each trial gets its own (round-robin).
        out_dir: Root of the sweep directories.
        pruner: TPE only: ``{type: median|none, n_startup_trials, n_warmup_steps}``.
        command: Program each trial runs, before the flags (default: this python, ``-m lightning_modules.cli fit``).
        env: Extra environment variables for each trial.
    """

    name: str
    space: list[Param]
    configs: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/loss"
    mode: str = "min"
    method: str = "grid"
    num_trials: int | None = None
    seed: int = 0
    parallel: int = 1
    out_dir: str = "runs/sweeps"
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    command: list[str] = field(default_factory=lambda: list(DEFAULT_COMMAND))
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.overrides = {_flag(k): v for k, v in self.overrides.items()}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for any inconsistent setting."""
        if not re.fullmatch(r"[\w.-]+", str(self.name)):
            raise ValueError(f"name must be a plain directory name (letters, digits, _ . -), got {self.name!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.method != "grid" and (not isinstance(self.num_trials, int) or self.num_trials < 1):
            raise ValueError(f"num_trials must be a positive integer for method {self.method!r}, got {self.num_trials}")
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise ValueError(f"parallel must be an integer >= 1, got {self.parallel!r}")
        if self.pruner.get("type", "median") not in ("median", "none"):
            raise ValueError(f"pruner.type must be 'median' or 'none', got {self.pruner.get('type')!r}")
        self._validate_base()

    def _validate_base(self) -> None:
        for path in self.configs:
            if not Path(path).is_file():
                raise ValueError(f"base.configs: {path!r} is not a file (paths are relative to the working directory)")
        both = sorted({p.key for p in self.space} & set(self.overrides))
        if both:
            raise ValueError(f"{both} appear in both space and base.overrides; keep each flag in one place")
        if self.method == "grid":
            grid_trials(self.space)  # raises for ranges a grid cannot enumerate

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SweepConfig:
        """Load a sweep YAML; keyword arguments (e.g. from the command line) replace top-level keys."""
        raw = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        base = raw.pop("base", {}) or {}
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__ if f not in ("configs", "overrides")})
        unknown += [f"base.{k}" for k in sorted(set(base) - {"configs", "overrides"})]
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; see docs/sweeps.md for the sweep YAML format")
        configs = base.get("configs") or []
        configs = [configs] if isinstance(configs, str) else list(configs)
        raw.setdefault("name", Path(path).stem)
        space = parse_space(raw.pop("space", None))
        return cls(space=space, configs=configs, overrides=dict(base.get("overrides") or {}), **raw)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_yaml(self) -> str:
        """The resolved sweep config, saved beside the trials."""
        raw = asdict(self)
        raw["space"] = {p.key: _param_spec(p) for p in self.space}
        raw["base"] = {"configs": raw.pop("configs"), "overrides": raw.pop("overrides")}
        return yaml.safe_dump(raw, sort_keys=False)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-3`` is a float (PyYAML's YAML 1.1 rules read it as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _flag(key: str) -> str:
    return str(key).removeprefix("--")


def _param_spec(p: Param) -> Any:
    if p.kind == "choice":
        return list(p.values)
    return {p.kind: [p.low, p.high], **({"step": p.step} if p.kind == "int" else {})}


def format_value(value: Any) -> str:
    """A value as jsonargparse reads it back: YAML/JSON literals, floats with a dot (``1.0e-05``)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- trials
@dataclass
class Trial:
    """One run of ``dsv3 fit``; ``result.json`` in its directory is this object as JSON."""

    index: int
    params: dict[str, Any]
    status: str = "pending"  # pending | running | completed | pruned | failed | interrupted
    value: float | None = None
    step: int | None = None
    returncode: int | None = None
    duration_s: float | None = None
    device: str | None = None
    optuna_trial: int | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return f"trial_{self.index:03d}"


_LIST_KEY = re.compile(r"^(?P<list>[\w.]+)\[(?P<sel>[^\]]+)\]\.(?P<rest>[\w.]+)$")


def resolve_list_flags(configs: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    """Turn ``trainer.callbacks[Name].init_args.x`` keys into one ``trainer.callbacks`` flag holding the whole list.

    LightningCLI flags can only reach the last element of a list of classes, so the sweep edits the list the
    base configs define (the last config that sets it wins) and passes it whole. ``Name`` is a class name,
    a full class path (appended when absent) or an index.
    """
    plain: dict[str, Any] = {}
    lists: dict[str, list[dict[str, Any]]] = {}
    for key, value in flags.items():
        match = _LIST_KEY.match(key)
        if match is None:
            plain[key] = value
            continue
        items = lists.setdefault(match["list"], _list_from_configs(configs, match["list"]))
        node = _select_item(items, match["sel"], key)
        *parents, leaf = match["rest"].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {**plain, **lists}


def _list_from_configs(configs: list[str], dotted: str) -> list[dict[str, Any]]:
    found: Any = []
    for path in configs:
        node: Any = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found = node
    found = found if isinstance(found, list) else [found]
    return [{"class_path": item} if isinstance(item, str) else dict(item) for item in found]


def _select_item(items: list[dict[str, Any]], selector: str, key: str) -> dict[str, Any]:
    if selector.isdigit():
        if int(selector) >= len(items):
            raise ValueError(f"{key}: index {selector} is past the {len(items)} items the base configs define")
        return items[int(selector)]
    name = selector.rsplit(".", 1)[-1]  # by class name: configs may spell the path short (callbacks.X) or long
    hits = [item for item in items if item["class_path"].rsplit(".", 1)[-1] == name]
    if len(hits) > 1:
        raise ValueError(f"{key}: {len(hits)} items are {selector}; select one by index, e.g. [0]")
    if hits:
        return hits[0]
    if "." not in selector:
        raise ValueError(
            f"{key}: the base configs define no {selector} in this list; give its full class path "
            "(e.g. callbacks.expert_bias_balancing.ExpertBiasBalancing) to add one"
        )
    items.append({"class_path": selector, "init_args": {}})
    return items[-1]


def trial_command(cfg: SweepConfig, trial: Trial) -> list[str]:
    """The ``dsv3 fit`` command line of a trial: base configs, fixed overrides, logger placement, swept values.

    The TensorBoard logger is set explicitly (its other ``init_args`` in the base config are kept), and two
    callbacks are appended: ``SweepHParams`` (swept values in the HParams tab) and, for TPE, ``OptunaPruning``.
    """
    cmd = list(cfg.command)
    for path in cfg.configs:
        cmd += ["--config", path]
    logger = {
        "trainer.logger": "lightning.pytorch.loggers.TensorBoardLogger",
        "trainer.logger.init_args.save_dir": cfg.out_dir,
        "trainer.logger.init_args.name": cfg.name,
        "trainer.logger.init_args.version": trial.name,
    }
    flags = resolve_list_flags(cfg.configs, {**cfg.overrides, **trial.params})
    for key, value in {**flags, **logger}.items():
        cmd.append(f"--{key}={format_value(value)}")
    hparams = {"class_path": "lightning_modules.sweep.SweepHParams", "init_args": {"params": trial.params}}
    cmd.append(f"--trainer.callbacks+={json.dumps(hparams)}")
    if trial.optuna_trial is not None and cfg.pruner.get("type", "median") != "none":
        pruning = {
            "class_path": "lightning_modules.sweep.OptunaPruning",
            "init_args": {
                "storage": str(cfg.sweep_dir / "optuna.journal"),
                "study_name": cfg.name,
                "trial_number": trial.optuna_trial,
                "monitor": cfg.metric,
                "pruner": cfg.pruner,
            },
        }
        cmd.append(f"--trainer.callbacks+={json.dumps(pruning)}")
    return cmd


def read_metric(log_dir: Path, tag: str) -> tuple[float, int] | None:
    """Last ``(value, step)`` of scalar ``tag`` in the TensorBoard event files of ``log_dir`` (None if absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    last = None
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                if last is None or (event.wall_time, event.step) >= (last[2], last[1]):
                    last = (event.value, event.step, event.wall_time)
    return None if last is None else (float(last[0]), int(last[1]))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename), so a killed sweep never leaves half a result."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def load_result(trial_dir: Path) -> dict[str, Any] | None:
    path = trial_dir / "result.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def log_tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a trial's log (its stderr and stdout)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------------------------------------- samplers
class ListSampler:
    """Grid and random sweeps: a fixed list of parameter sets, trial i always the i-th."""

    def __init__(self, cfg: SweepConfig) -> None:
        if cfg.method == "grid":
            self.params = grid_trials(cfg.space)
        else:
            self.params = random_trials(cfg.space, cfg.num_trials, cfg.seed)

    def __len__(self) -> int:
        return len(self.params)

    def resume(self, index: int, previous: dict[str, Any]) -> bool:
        """Whether a finished trial found on disk matches trial ``index`` of this sweep."""
        if previous["params"] != self.params[index]:
            raise ValueError(
                f"trial_{index:03d} was run with {previous['params']}, but this sweep now gives "
                f"{self.params[index]}; use a new name (or out_dir) for a changed sweep"
            )
        return True

    def ask(self, trial: Trial) -> None:
        trial.params = dict(self.params[trial.index])

    def tell(self, trial: Trial) -> None:
        pass

    def abandon(self, trial: Trial) -> None:
        pass


class OptunaSampler:
    """Optuna TPE over a file-based journal (``optuna.journal`` in the sweep dir), shared with the trials' pruning.

    The study keeps every attempt; a failed or interrupted trial directory is rerun with the same
    parameters (enqueued), so reruns do not skew the search.
    """

    def __init__(self, cfg: SweepConfig) -> None:
        try:
            import optuna
        except ImportError as err:
            raise ValueError(OPTUNA_MISSING) from err
        self.optuna = optuna
        self.num_trials = cfg.num_trials
        self.distributions = {p.key: p.optuna_distribution() for p in cfg.space}
        cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.study = optuna.create_study(
            study_name=cfg.name,
            storage=journal_storage(cfg.sweep_dir / "optuna.journal"),
            sampler=optuna.samplers.TPESampler(seed=cfg.seed),
            pruner=make_pruner(cfg.pruner),
            direction="minimize" if cfg.mode == "min" else "maximize",
            load_if_exists=True,
        )
        for stale in self.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            self.study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # left by a killed sweep
        self.running: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.num_trials

    def resume(self, index: int, previous: dict[str, Any]) -> bool:
        return True

    def ask(self, trial: Trial) -> None:
        if trial.params:  # a rerun: same parameters as before
            self.study.enqueue_trial(trial.params, skip_if_exists=False)
        otrial = self.study.ask(self.distributions)
        self.running[trial.index] = otrial
        trial.params, trial.optuna_trial = dict(otrial.params), otrial.number

    def tell(self, trial: Trial) -> None:
        state = self.optuna.trial.TrialState
        otrial = self.running.pop(trial.index)
        if trial.status == "completed" and trial.value is not None and math.isfinite(trial.value):
            self.study.tell(otrial, trial.value)
        else:  # a diverged (NaN) run counts as failed
            self.study.tell(otrial, state=state.PRUNED if trial.status == "pruned" else state.FAIL)

    def was_pruned(self, trial: Trial) -> bool:
        """Whether the trial's ``OptunaPruning`` callback stopped it (the ``pruned`` user attribute)."""
        number = self.running[trial.index].number
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        return bool(frozen.user_attrs.get("pruned"))

    def abandon(self, trial: Trial) -> None:
        if trial.index in self.running:
            self.study.tell(self.running.pop(trial.index), state=self.optuna.trial.TrialState.FAIL)


def make_pruner(spec: dict[str, Any]) -> Any:
    """``{type: median, n_startup_trials: 5, n_warmup_steps: 0, interval_steps: 1}`` or ``{type: none}``.

    Built in the sweep and again in each trial's callback: an Optuna study does not store its pruner.
    """
    import optuna

    args = {k: v for k, v in spec.items() if k != "type"}
    if spec.get("type", "median") == "none":
        return optuna.pruners.NopPruner()
    try:
        return optuna.pruners.MedianPruner(**args)
    except TypeError as err:
        raise ValueError(f"pruner: {err}; MedianPruner takes n_startup_trials, n_warmup_steps, interval_steps") from err


def journal_storage(path: Path) -> Any:
    """Optuna's multi-process-safe file storage (the trials report intermediate values into it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


# ---------------------------------------------------------------------------------------------- runner
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
                trials.append(Trial(index, dict(previous["params"]) if previous else {}))
        return trials

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
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        # Own session: Ctrl-C reaches only the sweep, which then stops each trial's process group itself.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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


# ---------------------------------------------------------------------------------------------- trial callbacks
class SweepHParams(Callback):
    """Adds a trial's swept values to the hyperparameters its loggers record, for TensorBoard's HParams tab.

    Swept flags such as the optimizer's ``lr`` or a callback's ``gamma`` are not LitModule hyperparameters.
    TensorBoard keeps the first hparams record of a run, so this writes the full set (module and datamodule
    hyperparameters plus the swept values, under their flag names) in ``setup``, before Lightning's own.

    Args:
        params: The trial's swept values, ``{flag: value}``.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.loggers:
            return
        hparams = dict(trainer.datamodule.hparams_initial) if trainer.datamodule is not None else {}
        hparams.update(pl_module.hparams)  # incl. what the module adds after save_hyperparameters
        hparams.update(self.params)
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)


class OptunaPruning(Callback):
    """Reports the monitored metric to the trial's Optuna study after each validation; stops the run when pruned.

    The sweep adds it to each TPE trial (``--trainer.callbacks+=...``). Rank 0 reports and decides; the
    decision is broadcast so every rank stops together. A pruned run ends normally (``trainer.should_stop``)
    and is marked with the trial's user attribute ``pruned``.

    Args:
        storage: Path of the study's Optuna journal file.
        study_name: Study name (the sweep name).
        trial_number: Optuna trial number of this run.
        monitor: Metric to report, as logged (``val/loss``).
        pruner: The sweep's ``pruner`` settings (see ``make_pruner``).
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str = "val/loss",
        pruner: dict[str, Any] | None = None,
    ) -> None:
        self.storage, self.study_name, self.trial_number, self.monitor = storage, study_name, trial_number, monitor
        self.pruner = dict(pruner or {"type": "median"})
        self._trial: Any = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            try:
                import optuna
            except ImportError as err:
                raise ImportError(OPTUNA_MISSING) from err
            storage = journal_storage(Path(self.storage))
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=make_pruner(self.pruner))
            study_id = storage.get_study_id_from_name(self.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero:
            value = float(trainer.callback_metrics[self.monitor])
            trial = self._optuna_trial()
            trial.report(value, step=trainer.global_step)
            prune = trial.should_prune()
            if prune:
                trial.set_user_attr("pruned", True)
                print(f"[sweep] trial {self.trial_number} pruned at step {trainer.global_step}: {self.monitor}={value}")
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True


# ---------------------------------------------------------------------------------------------- CLI
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
                print(" ".join(trial_command(cfg, Trial(index, params))))
            return 0
        return SweepRunner(cfg).run()
    except (ValueError, FileNotFoundError) as err:
        print(f"dsv3 sweep: error: {err}", file=sys.stderr)
        return 2


def _first(p: Param) -> Any:
    return p.values[0] if p.kind == "choice" else p.low


if __name__ == "__main__":
    sys.exit(main())
