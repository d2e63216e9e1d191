"""Callbacks the sweep adds to each trial: swept values in the HParams tab, Optuna pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_modules.module import log_hparams_record
from sweeps.samplers import OPTUNA_MISSING, journal_storage, make_pruner


class SweepHParams(Callback):
    """Adds a trial's swept values to the hyperparameters its loggers record, for TensorBoard's HParams tab.

    Swept flags such as the optimizer's ``lr`` or a callback's ``gamma`` are not LitModule hyperparameters.
    TensorBoard keeps the first hparams record of a run, so this writes the full set (module and datamodule
    hyperparameters plus the swept values, under their flag names) in ``setup``, before Lightning's own. The
    record names ``hp_metric`` (NaN until the LitModule logs the validation loss): Lightning writes no record
    at all when the logger has ``default_hp_metric: false`` and no metric is given.

    Args:
        params: The trial's swept values, ``{flag: value}``.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            log_hparams_record(trainer, pl_module, extra=self.params)


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
