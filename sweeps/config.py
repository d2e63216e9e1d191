"""The sweep YAML: search space (choice, uniform, loguniform, int), grid and random expansion, ``SweepConfig``."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_COMMAND = (sys.executable, "-m", "lightning_modules.cli", "fit")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
METHODS = ("grid", "random", "tpe")


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
        raw = yaml.load(Path(path).read_text(), Loader=YamlLoader) or {}
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


class YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-3`` is a float (PyYAML's YAML 1.1 rules read it as a string)."""


YamlLoader.add_implicit_resolver(
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
