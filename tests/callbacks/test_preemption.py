"""Preemption for real: a `dsv3 fit` subprocess gets SIGTERM mid-run, saves that step, exits 143, resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from callbacks import Preemption
from lightning_modules.cli import DSV3CLI
from tests.lightning_modules.conftest import ROOT, small_args
from tests.lightning_modules.test_cli import RecordLosses

# Bitwise-reproducible CPU kernels, so the resumed losses can equal the straight run's exactly.
EXACT = {"deterministic": "true", "log_every_n_steps": 1, "val_check_interval": 1000}


def _start_fit(tmp_path: Path, *extra: str, config: Path | None = None) -> subprocess.Popen:
    args = small_args(tmp_path, max_steps=200, **EXACT)
    if config is not None:
        args[2:2] = ["--config", str(config)]  # after configs/tiny.yaml, before the flags
    args += ["--trainer.callbacks.init_args.last_every_n_train_steps=2", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as the one_thread fixture here
    cmd = [sys.executable, "-m", "lightning_modules.cli", "fit", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_sigterm_saves_the_current_step_exits_143_and_resumes_exactly(tmp_path):
    last = tmp_path / "ckpt" / "last.ckpt"
    proc = _start_fit(tmp_path)
    _wait_for(last, proc)  # step 2 is saved: training is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = _step(last)
    assert 2 <= stopped < 200
    assert f"stopped by SIGTERM after step {stopped}; saved {last}: resume with --ckpt_path last" in err

    steps = {"max_steps": stopped + 2, **EXACT}
    straight = RecordLosses()
    DSV3CLI(args=["fit", *small_args(tmp_path / "straight", **steps)], trainer_defaults={"callbacks": [straight]})
    resumed = RecordLosses()
    args = [*small_args(tmp_path, **steps), "--ckpt_path", "last"]
    DSV3CLI(args=["fit", *args], trainer_defaults={"callbacks": [resumed]})
    assert sorted(resumed.losses) == [stopped + 1, stopped + 2]  # it continues at the next step
    for step in resumed.losses:
        assert resumed.losses[step] == straight.losses[step], step  # bitwise, with deterministic kernels


@pytest.mark.distributed
def test_ranks_agree_on_the_step_when_only_one_rank_is_signalled(tmp_path):
    """Two DDP ranks (gloo); SIGTERM reaches rank 1 only. Both stop after the same step, a multiple of the check
    interval, and the checkpoint written there is whole."""
    last = tmp_path / "ckpt" / "last.ckpt"
    callbacks = tmp_path / "callbacks.yaml"  # tiny.yaml's list, with a Preemption that checks every 3 steps
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: callbacks.Preemption, init_args: {check_every_n_steps: 3}}\n"
        "    - {class_path: callbacks.BestAndLastCheckpoint, init_args: {monitor: val/loss}}\n"
    )
    proc = _start_fit(tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp", config=callbacks)
    _wait_for(last, proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ranks = [int(pid) for pid in children if "lightning_modules.cli" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(ranks) == 1, children  # Lightning's launcher started rank 1 as our child
    os.kill(ranks[0], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = _step(last)
    assert stopped % 3 == 0 and f"after step {stopped}" in err


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="SIGTEM"):
        Preemption(signals=["SIGTEM"])
    with pytest.raises(ValueError, match="check_every_n_steps=0 must be >= 1"):
        Preemption(check_every_n_steps=0)


def test_slurm_requeue_signal_runs_scontrol_requeue(tmp_path, monkeypatch):
    """Under SLURMEnvironment(auto_requeue) the requeue signal requeues the job, as Lightning's own handler does."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from callbacks.preemption import _requeue_slurm_job, _slurm_requeue_signal

    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/called\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=SLURMEnvironment()))
    assert _slurm_requeue_signal(trainer) == signal.SIGUSR1
    trainer._accelerator_connector.cluster_environment = SLURMEnvironment(auto_requeue=False)
    assert _slurm_requeue_signal(trainer) is None
    _requeue_slurm_job()
    assert (tmp_path / "called").read_text().split() == ["requeue", "4242"]
