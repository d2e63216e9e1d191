"""Where trial parameters come from: a fixed list (grid, random) or an Optuna TPE study in a journal file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sweeps.config import SweepConfig, grid_trials, random_trials
from sweeps.trials import Trial

OPTUNA_MISSING = "method 'tpe' needs optuna: pip install 'dsv3[sweep]' (or pip install optuna)"


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

    def preview(self, index: int, previous: dict[str, Any] | None) -> dict[str, Any]:
        """Parameters of a trial not yet run (shown in the summary)."""
        return dict(self.params[index])

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
            sampler=optuna.samplers.TPESampler(seed=cfg.seed, constant_liar=cfg.parallel > 1),
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

    def preview(self, index: int, previous: dict[str, Any] | None) -> dict[str, Any]:
        """A failed or interrupted attempt's parameters (rerun as they were), else unknown until asked."""
        return dict(previous["params"]) if previous else {}

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
