"""Tests of ``dsv3 sweep``: space expansion, trial commands, resume, failures, Ctrl-C, TPE pruning, real fit runs.

Most runner tests use ``fake_fit.py`` (same flags in, TensorBoard ``val/loss`` out, no torch) so that they take
seconds; ``test_tiny_lr_sweep_end_to_end`` runs the shipped example through the real ``dsv3 fit``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import sweeps
from sweeps import Param, SweepConfig, Trial, config, runner, trials
from sweeps.samplers import journal_storage
from tests.lightning_modules.conftest import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[2]
FAKE = [sys.executable, str(Path(__file__).with_name("fake_fit.py"))]
LR = "model.optimizer.init_args.lr"


def write_sweep(tmp_path: Path, **fields) -> Path:
    raw = {
        "name": "demo",
        "out_dir": str(tmp_path / "runs"),
        "command": FAKE,
        "base": {"overrides": {"trainer.max_steps": 20}},
        "space": {LR: [1.0e-3, 3.0e-3], "fake.gamma": [0.0, 0.5]},
    }
    raw.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def results(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("trial_*/result.json"))}


def summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- space
def test_grid_is_the_cartesian_product_in_order():
    space = sweeps.parse_space({"--a": [1, 2], "b": {"choice": ["x", "y", "z"]}, "c": {"int": [2, 6], "step": 2}})
    trials = sweeps.grid_trials(space)
    assert len(trials) == 2 * 3 * 3
    assert trials[0] == {"a": 1, "b": "x", "c": 2}
    assert trials[1] == {"a": 1, "b": "x", "c": 4}  # last key varies fastest
    assert trials[-1] == {"a": 2, "b": "z", "c": 6}


def test_random_draws_are_seeded_and_in_range():
    space = sweeps.parse_space(
        {"lr": {"loguniform": [1.0e-5, 1.0e-2]}, "w": {"uniform": [0.1, 0.3]}, "e": {"int": [4, 16], "step": 4}}
    )
    first, again = sweeps.random_trials(space, 50, seed=3), sweeps.random_trials(space, 50, seed=3)
    assert first == again != sweeps.random_trials(space, 50, seed=4)
    assert all(1e-5 <= t["lr"] <= 1e-2 and 0.1 <= t["w"] <= 0.3 and t["e"] in (4, 8, 12, 16) for t in first)
    # loguniform spreads over decades: about half the draws below the geometric midpoint 3.2e-4
    below = sum(t["lr"] < math.sqrt(1e-5 * 1e-2) for t in first)
    assert 15 <= below <= 35


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (0.1, "fixed values belong in base.overrides"),
        ({"uniform": [1.0, 0.5]}, "low < high"),
        ({"loguniform": [0.0, 1.0]}, "low > 0"),
        ({"int": [1, 4], "step": 0}, "step > 0"),
        ({"choice": []}, "non-empty list"),
        ({"normal": [0, 1]}, "expected a list of values"),
    ],
)
def test_bad_space_entries_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        config.parse_param("model.x", spec)
    assert "space.model.x" in str(err.value)


def test_grid_rejects_continuous_ranges(tmp_path):
    path = write_sweep(tmp_path, space={LR: {"loguniform": [1.0e-4, 1.0e-2]}})
    with pytest.raises(ValueError, match="grid cannot enumerate"):
        SweepConfig.from_yaml(path)
    assert SweepConfig.from_yaml(path, method="random", num_trials=3).num_trials == 3


def test_optuna_distributions_match_the_space():
    pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert Param("a", "loguniform", low=1e-4, high=1e-2).optuna_distribution() == FloatDistribution(
        1e-4, 1e-2, log=True
    )
    assert Param("a", "int", low=2, high=8, step=2).optuna_distribution() == IntDistribution(2, 8, step=2)
    assert Param("a", "choice", values=(1, "x")).optuna_distribution() == CategoricalDistribution((1, "x"))


# ---------------------------------------------------------------------------------------------- config / command
def test_yaml_reads_exponent_floats_and_rejects_mistakes(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"space:\n  {LR}: [1e-3, 3e-4]\nbase:\n  overrides: {{trainer.max_steps: 5}}\n")
    cfg = SweepConfig.from_yaml(path)
    assert cfg.name == "s" and cfg.space[0].values == (1e-3, 3e-4)  # floats, not the strings PyYAML 1.1 gives
    path.write_text(f"space:\n  {LR}: [1e-3]\nbase:\n  overrides: {{{LR}: 0.1}}\n")
    with pytest.raises(ValueError, match="both space and base.overrides"):
        SweepConfig.from_yaml(path)
    path.write_text(f"space:\n  {LR}: [1e-3]\nmetrc: val/loss\n")
    with pytest.raises(ValueError, match=r"unknown keys \['metrc'\]"):
        SweepConfig.from_yaml(path)
    path.write_text(f"space:\n  {LR}: [1e-3]\nbase:\n  configs: [nope.yaml]\n")
    with pytest.raises(ValueError, match="nope.yaml"):
        SweepConfig.from_yaml(path)
    path.write_text(f"space:\n  {LR}: [1e-3]\nmethod: random\n")
    with pytest.raises(ValueError, match="num_trials"):
        SweepConfig.from_yaml(path)


def test_format_value_round_trips_through_yaml():
    for value in (1e-05, 3e-3, 0.1, 16, True, None, "adamw", [1, 2], {"a": 1.5}):
        text = config.format_value(value)
        assert yaml.load(text, Loader=config.YamlLoader) == value, text
    assert config.format_value(1e-05) == "1.0e-05"


def test_trial_command_places_the_run_and_edits_callback_lists(tmp_path):
    ebb = "callbacks.expert_bias_balancing.ExpertBiasBalancing"
    base = tmp_path / "fit.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {"class_path": ebb, "init_args": {"gamma": 1}},
                        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                    ]
                }
            }
        )
    )
    cfg = SweepConfig(
        name="s",
        configs=[str(base)],
        out_dir="out",
        overrides={
            "--trainer.max_steps": 5,
            "trainer.callbacks[LearningRateMonitor].init_args.logging_interval": "step",
        },
        space=sweeps.parse_space({LR: [1e-3], "trainer.callbacks[ExpertBiasBalancing].init_args.gamma": [0.01]}),
    )
    params = {LR: 1e-5, "trainer.callbacks[ExpertBiasBalancing].init_args.gamma": 0.01}
    cmd = sweeps.trial_command(cfg, Trial(7, params))
    assert cmd[: len(config.DEFAULT_COMMAND)] == list(config.DEFAULT_COMMAND)
    assert cmd[len(config.DEFAULT_COMMAND) :][:2] == ["--config", str(base)]
    flags = dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith("--") and "=" in arg and "+=" not in arg)
    assert flags["trainer.max_steps"] == "5" and flags[LR] == "1.0e-05"
    assert flags["trainer.logger.init_args.save_dir"] == "out"
    assert flags["trainer.logger.init_args.name"] == "s" and flags["trainer.logger.init_args.version"] == "trial_007"
    callbacks = json.loads(flags["trainer.callbacks"])  # both list edits in one flag, order and other args kept
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == ["ExpertBiasBalancing", "LearningRateMonitor"]
    assert callbacks[0]["init_args"] == {"gamma": 0.01}
    assert callbacks[1]["init_args"] == {"logging_interval": "step"}
    hparams = json.loads(cmd[-1].split("=", 1)[1])
    assert cmd[-1].startswith("--trainer.callbacks+=") and hparams["init_args"]["params"] == params
    with pytest.raises(ValueError, match="no Missing in this list"):
        trials.resolve_list_flags([str(base)], {"trainer.callbacks[Missing].init_args.x": 1})
    added = trials.resolve_list_flags([str(base)], {"trainer.callbacks[a.b.New].init_args.x": 1})["trainer.callbacks"]
    assert added[-1] == {"class_path": "a.b.New", "init_args": {"x": 1}}


def test_each_trial_checkpoints_into_its_own_directory(tmp_path):
    base = tmp_path / "fit.yaml"
    base.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "lightning.ModelCheckpoint"}]}}))
    cfg = SweepConfig(name="s", configs=[str(base)], out_dir="out", space=sweeps.parse_space({LR: [1e-3]}))
    cmd = trials.trial_command(cfg, Trial(7, {LR: 1e-5}))
    checkpoint = json.loads(next(a for a in cmd if a.startswith("--trainer.callbacks=")).split("=", 1)[1])
    assert checkpoint[0]["init_args"] == {"dirpath": "out/s/trial_007/checkpoints"}


def test_callback_lists_come_from_the_files_a_config_includes():
    # configs/tiny.yaml takes its callbacks from configs/base/callbacks.yaml, as dsv3 fit reads it.
    key = "trainer.callbacks[ExpertBiasBalancing].init_args.gamma"
    callbacks = trials.resolve_list_flags([str(ROOT / "configs" / "tiny.yaml")], {key: 0.01})["trainer.callbacks"]
    names = [c["class_path"].rsplit(".", 1)[-1] for c in callbacks]
    assert names[0] == "ExpertBiasBalancing" and names[-1] == "BestAndLastCheckpoint" and len(names) >= 4
    assert callbacks[0]["init_args"] == {"gamma": 0.01}


# ---------------------------------------------------------------------------------------------- runner (fake trials)
def test_grid_sweep_ranks_trials_and_resume_skips_finished(tmp_path, capsys):
    path = write_sweep(tmp_path, parallel=2, base={"overrides": {"trainer.max_steps": 20, "fake.sleep": 1}})
    assert sweeps.main(["--config", str(path)]) == 0
    sweep_dir = tmp_path / "runs" / "demo"
    done = results(sweep_dir)
    assert sorted(done) == [f"trial_00{i}" for i in range(4)]
    assert all(r["status"] == "completed" and r["step"] == 20 for r in done.values())
    # each trial got its own swept values; fake val/loss at step 20 = 2 + |log10(lr) + 2.5| + gamma + 1/20
    argv = json.loads((sweep_dir / "trial_003" / "fake_argv.json").read_text())["flags"]
    assert argv[LR] == "0.003" and argv["fake.gamma"] == "0.5"
    expected = 2 + abs(math.log10(3e-3) + 2.5) + 0.5 + 0.05
    assert done["trial_003"]["value"] == pytest.approx(expected, rel=1e-6)
    rows = summary(sweep_dir)
    assert [r["trial"] for r in rows] == ["trial_002", "trial_000", "trial_003", "trial_001"]  # best first
    assert rows[0][LR] == "0.003" and float(rows[0]["val/loss"]) < float(rows[-1]["val/loss"])
    assert "trial_002  completed" in capsys.readouterr().out
    times = [json.loads((sweep_dir / f"trial_00{i}" / "fake_times.json").read_text()) for i in range(4)]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in zip(times, times[1:], strict=False))  # ran two at a time

    logs = {t: (sweep_dir / t / "trial.log").stat().st_mtime_ns for t in done}
    assert sweeps.main(["--config", str(path)]) == 0  # rerun: nothing to do
    assert {t: (sweep_dir / t / "trial.log").stat().st_mtime_ns for t in done} == logs
    assert "4/4 trials already finished" in capsys.readouterr().out


def test_failed_trial_is_recorded_and_rerun(tmp_path, monkeypatch, capsys):
    overrides = {"trainer.max_steps": 20, "fake.fail_if_env": "FAKE_FAIL"}
    path = write_sweep(tmp_path, base={"overrides": overrides}, space={LR: [1.0e-3, 3.0e-3]})
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert sweeps.main(["--config", str(path), "--num_trials", "2"]) == 1  # grid: num_trials is ignored
    sweep_dir = tmp_path / "runs" / "demo"
    failed = results(sweep_dir)
    assert [r["status"] for r in failed.values()] == ["failed", "failed"]
    assert failed["trial_000"]["returncode"] == 1
    assert "fake trial failed on purpose" in failed["trial_000"]["error"]
    assert "fake trial failed on purpose" in (sweep_dir / "trial_000" / "trial.log").read_text()
    assert "fake trial failed on purpose" in capsys.readouterr().err

    # One trial finished meanwhile (as if run elsewhere), the other is rerun, the finished one kept.
    done = dict(failed["trial_001"], status="completed", value=1.0, step=20)
    (sweep_dir / "trial_001" / "result.json").write_text(json.dumps(done))
    monkeypatch.delenv("FAKE_FAIL")
    assert sweeps.main(["--config", str(path)]) == 0
    after = results(sweep_dir)
    assert after["trial_000"]["status"] == "completed" and after["trial_001"]["value"] == 1.0
    assert [r["trial"] for r in summary(sweep_dir)] == ["trial_001", "trial_000"]


def test_changed_sweep_refuses_to_mix_with_old_results(tmp_path, capsys):
    path = write_sweep(tmp_path, space={LR: [1.0e-3]})
    assert sweeps.main(["--config", str(path)]) == 0
    write_sweep(tmp_path, space={LR: [2.0e-3]})
    assert sweeps.main(["--config", str(path)]) == 2  # a clear error, nothing overwritten
    assert results(tmp_path / "runs" / "demo")["trial_000"]["params"] == {LR: 1e-3}
    write_sweep(tmp_path, space={LR: [1.0e-3]}, base={"overrides": {"trainer.max_steps": 40}})
    assert sweeps.main(["--config", str(path)]) == 2  # same values, another base run: not comparable
    assert "differ from the finished trials" in capsys.readouterr().err


def test_one_bad_trial_does_not_stop_the_others(tmp_path):
    path = write_sweep(tmp_path, space={LR: [1.0e-3, 3.0e-3], "fake.fail": [False, True]}, parallel=2)
    assert sweeps.main(["--config", str(path)]) == 1
    statuses = {r["params"]["fake.fail"]: set() for r in results(tmp_path / "runs" / "demo").values()}
    for r in results(tmp_path / "runs" / "demo").values():
        statuses[r["params"]["fake.fail"]].add(r["status"])
    assert statuses == {False: {"completed"}, True: {"failed"}}
    rows = summary(tmp_path / "runs" / "demo")
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "failed"]


def test_a_command_that_cannot_start_fails_its_trials(tmp_path, capsys):
    path = write_sweep(tmp_path, command=[str(tmp_path / "no-such-program")], space={LR: [1.0e-3, 3.0e-3]})
    assert sweeps.main(["--config", str(path)]) == 1
    done = results(tmp_path / "runs" / "demo")
    assert [r["status"] for r in done.values()] == ["failed", "failed"]
    assert "no-such-program" in done["trial_000"]["error"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie is dead; only its parent's reaper is missing


def test_ctrl_c_stops_trials_marks_them_and_exits_130(tmp_path):
    # The trials sleep far longer than the wait for their pid files, so on a loaded machine too Ctrl-C reaches
    # the sweep while both run (they are killed by it, so the sleep costs nothing).
    path = write_sweep(tmp_path, base={"overrides": {"fake.sleep": 900}}, parallel=2)
    sweep_dir = tmp_path / "runs" / "demo"
    pid_files = [sweep_dir / "trial_000" / "fake_pid", sweep_dir / "trial_001" / "fake_pid"]

    def press_ctrl_c_once_both_trials_run() -> None:
        deadline = time.monotonic() + 300
        while not all(p.exists() and p.read_text() for p in pid_files) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, inside the sweep's loop

    threading.Thread(target=press_ctrl_c_once_both_trials_run, daemon=True).start()
    assert sweeps.main(["--config", str(path)]) == 130
    pids = [int(p.read_text()) for p in pid_files]
    assert not any(_alive(pid) for pid in pids)
    done = results(sweep_dir)
    assert sorted(done) == ["trial_000", "trial_001"]  # trials 2 and 3 never started
    assert {r["status"] for r in done.values()} == {"interrupted"}
    rows = summary(sweep_dir)
    assert [r["status"] for r in rows] == ["interrupted", "interrupted", "pending", "pending"]
    assert rows[-1][LR] == "0.003" and rows[-1]["fake.gamma"] == "0.5"  # a grid's pending trials are known


def test_gpu_slots_round_robin(monkeypatch):
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runner._gpu_slots(2) == ["0,1", "2,3"]  # each trial its own devices
    assert runner._gpu_slots(6) == ["0", "1", "2", "3", "0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert runner._gpu_slots(4) == ["4", "5", "6", "7"]
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 1)
    assert runner._gpu_slots(3) == []


def test_trials_get_their_own_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = write_sweep(tmp_path, parallel=2, base={"overrides": {"fake.sleep": 1}})
    assert sweeps.main(["--config", str(path)]) == 0
    sweep_dir = tmp_path / "runs" / "demo"
    seen = {}
    for name, r in results(sweep_dir).items():
        env = json.loads((sweep_dir / name / "fake_argv.json").read_text())["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == r["device"]
        times = json.loads((sweep_dir / name / "fake_times.json").read_text())
        seen[name] = (r["device"], times)
    # trials that overlapped in time ran on different GPUs
    for (dev_a, (s_a, e_a)), (dev_b, (s_b, e_b)) in itertools.combinations(seen.values(), 2):
        if s_a < e_b and s_b < e_a:
            assert dev_a != dev_b
    assert {d for d, _ in seen.values()} == {"0", "1"}


# ---------------------------------------------------------------------------------------------- TPE and pruning
def test_tpe_sweep_records_trials_in_the_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    path = write_sweep(
        tmp_path,
        method="tpe",
        num_trials=3,
        seed=1,
        space={LR: {"loguniform": [1.0e-4, 1.0e-1]}, "fake.gamma": {"uniform": [0.0, 1.0]}},
        pruner={"type": "none"},
    )
    assert sweeps.main(["--config", str(path)]) == 0
    sweep_dir = tmp_path / "runs" / "demo"
    done = results(sweep_dir)
    study = optuna.load_study(study_name="demo", storage=journal_storage(sweep_dir / "optuna.journal"))
    by_number = {t.number: t for t in study.trials}
    for r in done.values():
        trial = by_number[r["optuna_trial"]]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == pytest.approx(r["value"]) and trial.params == r["params"]
        assert r["value"] == pytest.approx(2.05 + abs(math.log10(r["params"][LR]) + 2.5) + r["params"]["fake.gamma"])
    # A rerun adds no trials.
    assert sweeps.main(["--config", str(path)]) == 0
    storage = journal_storage(sweep_dir / "optuna.journal")
    assert len(optuna.load_study(study_name="demo", storage=storage).trials) == 3


def test_tpe_reruns_failed_trials_with_their_parameters(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    overrides = {"fake.fail_if_env": "FAKE_FAIL"}
    space = {LR: {"loguniform": [1.0e-4, 1.0e-1]}}
    path = write_sweep(tmp_path, method="tpe", num_trials=2, base={"overrides": overrides}, space=space)
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert sweeps.main(["--config", str(path)]) == 1
    sweep_dir = tmp_path / "runs" / "demo"
    failed = results(sweep_dir)
    monkeypatch.delenv("FAKE_FAIL")
    assert sweeps.main(["--config", str(path)]) == 0
    rerun = results(sweep_dir)
    assert {t: r["params"] for t, r in rerun.items()} == {t: r["params"] for t, r in failed.items()}
    assert all(r["status"] == "completed" for r in rerun.values())
    study = optuna.load_study(study_name="demo", storage=journal_storage(sweep_dir / "optuna.journal"))
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]  # every attempt is kept in the study


def test_optuna_pruning_callback_stops_a_bad_run(tmp_path):
    optuna = pytest.importorskip("optuna")
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    storage_path = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="s", storage=journal_storage(storage_path))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for _ in range(2):  # two finished trials with low intermediate losses
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.5}, distributions=dist, value=0.1, intermediate_values={2: 0.1, 4: 0.1, 6: 0.1}
            )
        )
    number = study.ask(dist).number

    class BadModel(BoringModel):
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", torch.tensor(5.0))

    pruning = sweeps.OptunaPruning(
        str(storage_path), "s", number, pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0}
    )
    trainer = Trainer(
        max_steps=6,
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BadModel())
    assert trainer.global_step == 2  # stopped at the first validation
    frozen = optuna.load_study(study_name="s", storage=journal_storage(storage_path)).trials[number]
    assert frozen.user_attrs["pruned"] is True and frozen.intermediate_values == {2: 5.0}


def test_missing_optuna_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    path = write_sweep(tmp_path, method="tpe", num_trials=2, space={LR: {"loguniform": [1.0e-4, 1.0e-2]}})
    assert sweeps.main(["--config", str(path)]) == 2
    assert "pip install 'dsv3[sweep]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real dsv3 fit
SMALL_RUN = {  # the CLI tests' small model and data (tests/lightning_modules/conftest.py), 4 steps
    "model.overrides": json.dumps(SMALL_MODEL),
    "data.vocab_size": 1024,
    "data.seq_len": 32,
    "data.batch_size": 2,
    "data.val_batches": 2,
    "trainer.max_steps": 4,
    "trainer.val_check_interval": 2,
    "model.lr_scheduler.init_args.warmup_steps": 1,
    "model.lr_scheduler.init_args.decay_start_tokens": 128,  # 2 steps of 2 x 32 tokens
    "model.lr_scheduler.init_args.decay_tokens": 128,
    "trainer.enable_progress_bar": False,
}


def test_dry_run_prints_the_real_commands(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert sweeps.main(["--config", "configs/sweeps/tiny_lr.yaml", "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(" -m lightning_modules.cli fit --config configs/tiny.yaml " in x for x in lines)
    assert sweeps.main(["--config", "configs/sweeps/tiny_tpe.yaml", "--dry_run"]) == 0


def test_tiny_lr_sweep_end_to_end(tmp_path, monkeypatch):
    """The shipped example, cut to 2 trials of 4 steps of a small model, through the real ``dsv3 fit``.

    Checks the trials ran with their values (different LRs, different losses), the metric is the logged
    ``val/loss``, the swept flags are in each run's HParams record, and checkpoints stay in the trial dirs.
    """
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    monkeypatch.chdir(ROOT)
    raw = yaml.load((ROOT / "configs/sweeps/tiny_lr.yaml").read_text(), Loader=config.YamlLoader)
    lr_key, gamma_key = raw["space"]
    raw["space"] = {lr_key: raw["space"][lr_key][:2], gamma_key: raw["space"][gamma_key][:1]}
    raw["base"]["overrides"].update(SMALL_RUN)
    raw.update(out_dir=str(tmp_path), parallel=2)
    path = tmp_path / "tiny_lr.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert sweeps.main(["--config", str(path)]) == 0
    sweep_dir = tmp_path / raw["name"]
    done = results(sweep_dir)
    assert sorted(done) == ["trial_000", "trial_001"]
    assert all(r["status"] == "completed" for r in done.values())
    assert {r["params"][lr_key] for r in done.values()} == set(raw["space"][lr_key])
    assert done["trial_000"]["value"] != done["trial_001"]["value"]  # the LR reached the optimizer
    assert all(math.log(100) < r["value"] < math.log(1024) + 1 for r in done.values())  # a real cross-entropy
    for name, r in done.items():
        acc = EventAccumulator(str(sweep_dir / name))
        acc.Reload()
        assert acc.Tensors("val/loss")[-1].step == r["step"]
        assert acc.Tensors("hp_metric")[-1].tensor_proto.float_val[0] == pytest.approx(r["value"])
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
        logged = metadata.parse_session_start_info_plugin_data(content).hparams
        for key, value in r["params"].items():  # the swept flags, under their names, in the HParams tab
            assert logged[key].number_value == pytest.approx(value), key
        assert logged["preset"].string_value == "tiny"  # the module's own hyperparameters are kept
        assert list((sweep_dir / name / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_tpe_sweep_with_pruning_end_to_end(tmp_path, monkeypatch):
    """configs/sweeps/tiny_tpe.yaml, cut to 3 small trials, through the real ``dsv3 fit`` with ``OptunaPruning``."""
    optuna = pytest.importorskip("optuna")
    monkeypatch.chdir(ROOT)
    raw = yaml.load((ROOT / "configs/sweeps/tiny_tpe.yaml").read_text(), Loader=config.YamlLoader)
    raw["space"].pop("model.overrides.n_routed_experts")  # SMALL_MODEL sets the expert layout
    raw["space"].pop("model.overrides.mtp_loss_weight")
    raw["base"]["overrides"].update(SMALL_RUN, **{"trainer.max_steps": 6})
    raw.update(out_dir=str(tmp_path), num_trials=3, pruner={"type": "median", "n_startup_trials": 1})
    path = tmp_path / "tiny_tpe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert sweeps.main(["--config", str(path)]) == 0
    sweep_dir = tmp_path / raw["name"]
    done = results(sweep_dir)
    study = optuna.load_study(study_name=raw["name"], storage=journal_storage(sweep_dir / "optuna.journal"))
    by_number = {t.number: t for t in study.trials}
    assert len(done) == 3 and done["trial_000"]["status"] == "completed"
    for r in done.values():
        trial = by_number[r["optuna_trial"]]
        assert trial.state.name == {"completed": "COMPLETE", "pruned": "PRUNED"}[r["status"]]
        assert trial.intermediate_values  # the callback reported each validation from inside the trial


def test_dsv3_sweep_reaches_the_sweeps_package(capsys):
    from lightning_modules.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    assert "usage: dsv3 sweep" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad sweep YAMLs
@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nspace: [\n", "not valid YAML (while parsing a flow node"),
        ("- name: x\n- space: {}\n", "a sweep YAML is a mapping of keys (name, base, metric, space, ...), not a list"),
    ],
)
def test_unreadable_sweep_yaml_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert sweeps.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsv3 sweep: error: {path}: ") and message in err[0]


def test_a_misspelled_space_key_fails_before_any_trial(tmp_path, capsys):
    """The real fit parser reads the first trial's flags; a typo in space fails the sweep, not each trial."""
    path = tmp_path / "typo.yaml"
    space = {"model.optimizer.init_args.lrr": [1e-3, 3e-3]}
    raw = {"name": "typo", "out_dir": str(tmp_path / "runs"), "base": {"configs": [str(ROOT / "configs/tiny.yaml")]}}
    path.write_text(yaml.safe_dump({**raw, "space": space}))
    assert sweeps.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "dsv3 fit does not accept the trials' flags" in err and "Option 'lrr' is not accepted" in err
    assert not (tmp_path / "runs" / "typo").exists()  # no trial started
