"""``Preemption``: on SIGTERM/SIGUSR1, save ``last.ckpt`` at the current step and exit non-zero so it is requeued.

SLURM and Kubernetes send SIGTERM (SLURM also SIGUSR1 ahead of the time limit with ``--signal=USR1@90``) and kill
the job a grace period later. Lightning 2.6 exits 0 without a checkpoint on SIGTERM (so a scheduler sees success
and does not requeue), and with several ranks its handler calls a collective from inside the signal handler.
Here the handler only records the signal. After an optimizer step the ranks agree on it (one 1-element
all-reduce every ``check_every_n_steps`` steps; none on a single process, where every step is checked), then
every rank saves ``last.ckpt`` of that same step through ``BestAndLastCheckpoint`` (atomically), and the run
ends with ``Preempted``, a ``SystemExit`` with code 128 + the signal number (143 for SIGTERM) that the ``dsv3``
CLI reports in one line. ``--ckpt_path last`` then resumes at the next step exactly. Under SLURM with Lightning's
``auto_requeue`` (its default), the requeue signal (SIGUSR1) also requeues the job with ``scontrol requeue``,
as Lightning's own handler does.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint import BestAndLastCheckpoint

log = logging.getLogger(__name__)


class Preempted(SIGTERMException):
    """The run stopped at a stop signal after saving ``last.ckpt``; exits with code 128 + the signal number."""

    def __init__(self, signum: int, step: int, path: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.path = signum, step, path

    def __str__(self) -> str:
        return (
            f"stopped by {signal.Signals(self.signum).name} after step {self.step}; saved {self.path}: resume with "
            "--ckpt_path last"
        )


class Preemption(Callback):
    """Save the current step and stop when the job is told to (see the module docstring).

    Args:
        signals: Signal names that stop the run.
        check_every_n_steps: With several ranks, agree on a received signal every this many optimizer steps
            (a 1-element all-reduce and a host sync each time). Keep ``check_every_n_steps`` x step time plus
            the checkpoint write well inside the scheduler's grace period. A single process checks every step.
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1"), check_every_n_steps: int = 10):
        unknown = [name for name in signals if name not in signal.Signals.__members__]
        if unknown or not signals:
            raise ValueError(f"Preemption signals={list(signals)}: give signal names such as SIGTERM, SIGUSR1")
        if check_every_n_steps < 1:
            raise ValueError(f"Preemption check_every_n_steps={check_every_n_steps} must be >= 1")
        self.signals = [signal.Signals[name] for name in signals]
        self.check_every_n_steps = check_every_n_steps
        self._received = 0  # the signal number, set by the handler
        self._checked_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._checkpoint: BestAndLastCheckpoint | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, BestAndLastCheckpoint)]
        if stage == "fit" and not found:
            raise ValueError(
                "trainer.callbacks: Preemption saves through a callbacks.BestAndLastCheckpoint; add one (it keeps "
                "last.ckpt current)"
            )
        self._checkpoint = found[0] if found else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After Lightning's own registration (in Trainer._run), which these handlers replace for these signals.
        self._received = 0
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in self.signals}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self._received:
            log.warning("Received %s: saving a checkpoint and stopping after this step.", signal.Signals(signum).name)
            self._received = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if step == self._checked_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._checked_step = step
        if trainer.world_size > 1 and step % self.check_every_n_steps:
            return
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        self._checkpoint.save_last_now(trainer)
        if signum == _slurm_requeue_signal(trainer) and trainer.is_global_zero:
            _requeue_slurm_job()
        raise Preempted(signum, step, str(self._checkpoint.last_path))

    def _agreed_signal(self, trainer: Trainer) -> int:
        """The signal any rank received (the largest number), the same on every rank."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self._received
        flag = torch.tensor([self._received], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank of every mesh dim
        return int(flag.item())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # before Lightning's teardown puts back the handlers it found

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _slurm_requeue_signal(trainer: Trainer) -> int | None:
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal
    return None


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (or array task), as Lightning's SLURM handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    if result.returncode:
        log.warning("scontrol requeue %s failed with exit code %d", job, result.returncode)
    else:
        log.warning("Requeued SLURM job %s", job)
