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

Modules: ``config`` (the YAML, the space), ``trials`` (command line, metric, result files), ``samplers``
(grid/random lists, Optuna TPE), ``runner`` (subprocesses, resume, Ctrl-C, summary, ``main``), ``callbacks``
(added to each trial: ``SweepHParams``, ``OptunaPruning``).
"""

from sweeps.callbacks import OptunaPruning, SweepHParams
from sweeps.config import Param, SweepConfig, grid_trials, parse_space, random_trials
from sweeps.runner import SweepRunner, main
from sweeps.trials import Trial, trial_command

__all__ = [
    "OptunaPruning",
    "Param",
    "SweepConfig",
    "SweepHParams",
    "SweepRunner",
    "Trial",
    "grid_trials",
    "main",
    "parse_space",
    "random_trials",
    "trial_command",
]
