"""One trial: its ``dsv3 fit`` command line, its metric read back from TensorBoard, its ``result.json``."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.config_include import config_files
from sweeps.config import SweepConfig, YamlLoader, format_value


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
    return {**lists, **plain}  # whole lists first: a plain `trainer.callbacks.init_args.x` then edits the last item


def _list_from_configs(configs: list[str], dotted: str) -> list[dict[str, Any]]:
    found: Any = []
    for path in config_files(configs):  # with the files they include, as dsv3 fit reads them
        node: Any = yaml.load(Path(path).read_text(), Loader=YamlLoader) or {}
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

    The TensorBoard logger is set explicitly (its other ``init_args`` in the base config are kept), a
    ``ModelCheckpoint`` of the base config writes into the trial directory, and two callbacks are appended:
    ``SweepHParams`` (swept values in the HParams tab) and, for TPE, ``OptunaPruning``.
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
    flags = resolve_list_flags(cfg.configs, {**_checkpoint_placement(cfg, trial), **cfg.overrides, **trial.params})
    for key, value in {**flags, **logger}.items():
        cmd.append(f"--{key}={format_value(value)}")
    hparams = {"class_path": "sweeps.callbacks.SweepHParams", "init_args": {"params": trial.params}}
    cmd.append(f"--trainer.callbacks+={json.dumps(hparams)}")
    if trial.optuna_trial is not None and cfg.pruner.get("type", "median") != "none":
        pruning = {
            "class_path": "sweeps.callbacks.OptunaPruning",
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


def _checkpoint_placement(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    """A base config's fixed ``ModelCheckpoint.dirpath`` would make the trials overwrite each other's checkpoints."""
    items = _list_from_configs(cfg.configs, "trainer.callbacks")
    if sum(item["class_path"].rsplit(".", 1)[-1] == "ModelCheckpoint" for item in items) != 1:
        return {}
    return {"trainer.callbacks[ModelCheckpoint].init_args.dirpath": str(cfg.sweep_dir / trial.name / "checkpoints")}


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
