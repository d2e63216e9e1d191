"""The dsv3 CLI in-process: training smoke test, exact resume, checkpoint hyperparameters, error messages."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules.cli import DSV3CLI, main
from tests.lightning_modules.conftest import ROOT, TINY_YAML


class RecordLosses(Callback):
    """Per optimizer step: the training loss, as the loop saw it."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def _fit(args: list[str]) -> tuple[DSV3CLI, RecordLosses]:
    recorder = RecordLosses()
    cli = DSV3CLI(args=["fit", *args], trainer_defaults={"callbacks": [recorder]})
    return cli, recorder


def test_fit_logs_every_metric_and_writes_checkpoints(small, tmp_path):
    cli, rec = _fit(small(max_steps=4, val_check_interval=2, log_every_n_steps=1))
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/ce_loss", "train/mtp_loss", "train/balance_loss", "lr", "grad_norm"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/tokens_seen"] == 4 * 2 * 32
    assert metrics["hp_metric"] == metrics["val/loss"]
    torch.testing.assert_close(metrics["val/ppl"], metrics["val/loss"].exp())
    assert sorted(rec.losses) == [1, 2, 3, 4]
    # the model config followed the data: vocabulary from the tokenizer, no value written twice
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["model_config"]["hidden_size"] == 32 and "tokenizer" in ckpt
    # TensorBoard got the scalars and the hparams (with hp_metric)
    events = list((tmp_path / "runs").rglob("events.out.tfevents*"))
    assert events and (tmp_path / "runs" / "tiny" / "version_0" / "hparams.yaml").is_file()
    tags = set()
    for event in events:
        accumulator = EventAccumulator(str(event))
        accumulator.Reload()
        tags |= set(accumulator.summary_metadata)
    assert "_hparams_/session_start_info" in tags  # the HParams tab lists the run


def test_lr_schedule_and_clipping_reach_the_optimizer(small):
    cli, _ = _fit(small(max_steps=3, val_check_interval=3, gradient_clip_val=1e-6))
    opt = cli.trainer.optimizers[0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.ndim == 1 for p in opt.param_groups[1]["params"])
    # tiny.yaml: 20 warm-up steps to 3e-3; after 3 updates the LR of step 4 is 4/20 of the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 4 / 20)
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"


def test_resume_reproduces_the_uninterrupted_run(small, tmp_path):
    """Stop after step 3 (a mid-run checkpoint), resume from it: steps 4-6 equal the uninterrupted run's."""
    ckpt_every = ["--trainer.callbacks.init_args.every_n_train_steps=3", "--trainer.callbacks.init_args.save_top_k=-1"]
    full, full_rec = _fit(small(max_steps=6, val_check_interval=3) + ckpt_every)
    mid = next((tmp_path / "ckpt").glob("step000003*.ckpt"))
    resumed, resumed_rec = _fit(small(max_steps=6, val_check_interval=3) + ["--ckpt_path", str(mid)])
    assert sorted(resumed_rec.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_rec.losses[step] == pytest.approx(full_rec.losses[step], abs=1e-6, rel=0), step
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for name, tensor in full_state.items():  # weights and the expert-bias buffers
        torch.testing.assert_close(resumed_state[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert resumed.model.tokens_seen == full.model.tokens_seen


def test_explicit_flags_win_over_checkpoint_hparams(small, trained_ckpt):
    ckpt = str(trained_ckpt)
    assert torch.load(ckpt, weights_only=True)["model_config"]["mtp_loss_weight"] == 0.3
    cli = DSV3CLI(args=["validate", *small(), "--model.overrides.mtp_loss_weight=0.05", "--ckpt_path", ckpt])
    assert cli.model.config.mtp_loss_weight == 0.05  # plain LightningCLI would restore 0.3 from the checkpoint
    assert cli.model.config.hidden_size == 32


def test_checkpoint_supplies_what_the_command_line_leaves_out(small, trained_ckpt):
    ckpt = str(trained_ckpt)
    args = [a for a in small() if not a.startswith("{")]  # drop the model overrides: take them from the checkpoint
    args.remove("--model.overrides")
    cli = DSV3CLI(args=["validate", *args, "--ckpt_path", ckpt])
    assert cli.model.config.hidden_size == 32
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


def test_bad_input_gets_one_clear_line(small, tmp_path, capsys):
    assert main(["fit", *small(), "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt: no such file" in capsys.readouterr().err
    assert main(["fit", *small(), "--model.overrides.hiden_size=64"]) == 2
    assert "unknown keys ['hiden_size'] in model.overrides" in capsys.readouterr().err
    assert main(["fit", *small(), "--data.seq_len=2048"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_step: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY_YAML, "--config", str(typo)])
    assert "max_step" in capsys.readouterr().err


def test_checkpoint_of_another_shape_is_refused(small, trained_ckpt, capsys):
    ckpt = str(trained_ckpt)
    assert main(["validate", *small(), "--model.overrides.hidden_size=48", "--ckpt_path", ckpt]) == 2
    err = capsys.readouterr().err
    assert "another shape" in err and "hidden_size: checkpoint 32, config 48" in err


def test_console_script_exits_with_the_commands_status(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", "generate", "--ckpt_path", str(tmp_path / "none.ckpt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.startswith("dsv3 generate: error: --ckpt_path")


def test_print_config_is_a_whole_config_that_reprints_itself(tmp_path, capsys):
    def printed(*configs: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    first = printed(TINY_YAML)
    (tmp_path / "full.yaml").write_text(first)
    assert printed(str(tmp_path / "full.yaml")) == first  # nothing left out, nothing taken from elsewhere


def test_validate_logs_into_one_folder_however_often_it_runs(small, trained_ckpt, tmp_path):
    for _ in range(2):
        assert main(["validate", *small(), "--ckpt_path", str(trained_ckpt)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["validate"]
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "validate"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [2, 2]  # the checkpoint's step, once per run
