"""Every YAML under configs/ parses and instantiates through the dsv3 CLI (the shared pieces of configs/base/ alone
too); big models are built on meta only; how configs compose (include:, repeated --config, checkpoint folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules import DeepSeekV3LitModule
from lightning_modules.cli import DSV3CLI, main
from lightning_modules.config_include import config_chain, expand_config_args
from models import DeepSeekV3, DeepSeekV3Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
BASE_PIECES = sorted((CONFIG_DIR / "base").glob("*.yaml"))  # configs/sweeps/ holds sweep files: tests/sweeps

# What a CPU-only, offline test machine must change: no GPU, no Hub tokenizer or dataset.
ON_THIS_MACHINE = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--data.path=text",
    "--data.name=null",
    "--data.tokenizer=null",
    "--data.val_fraction=0",
    "--data.vocab_size=1024",
]


def test_all_configs_found():
    assert {p.stem for p in CONFIGS} >= {"tiny", "bench-1gpu", "moonlight-16b-a3b", "deepseek-v3-671b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_as_written(path):
    cli = DSV3CLI(args=["--config", str(path), *ON_THIS_MACHINE], run=False)
    full = cli.parser.parse_args(expand_config_args(["--config", str(path)]))  # GPU strategy, data keys as written
    assert path.stem.startswith(full.model.preset)  # named after its preset (tiny-fsdp-ep: tiny)
    model = cli.model
    assert isinstance(model, DeepSeekV3LitModule) and model.model is None  # nothing allocated yet
    preset = DeepSeekV3Config.from_preset(full.model.preset, vocab_size=cli.datamodule.vocab_size)
    for key, value in (full.model.overrides or {}).items():
        setattr(preset, key, value)
    assert model.config == preset
    with torch.device("meta"):  # the planning view: every parameter, no memory
        net = DeepSeekV3(model.config)
    assert sum(p.numel() for p in net.parameters()) == model.config.num_params()
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert {"ExpertBiasBalancing", "MoELoadMonitor", "Preemption"} <= set(names)
    # last.ckpt is always the newest state: a periodic last, and the preemption handler saves through it
    assert names[-1] == "BestAndLastCheckpoint" and cli.trainer.callbacks[-1].last_every_n_train_steps > 0


def test_tiny_trains_on_the_cpu_as_written():
    cli = DSV3CLI(args=["--config", str(CONFIGS[[p.stem for p in CONFIGS].index("tiny")])], run=False)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert cli.trainer.precision == "32-true" and cli.trainer.gradient_clip_val == 1.0
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size


def test_every_yaml_is_a_config_or_a_base_piece_or_a_sweep():
    every = set(CONFIG_DIR.rglob("*.yaml"))
    stages = set((CONFIG_DIR / "context_extension").glob("*.yaml"))  # from a checkpoint: test_context_extension.py
    assert every == set(CONFIGS) | set(BASE_PIECES) | set((CONFIG_DIR / "sweeps").glob("*.yaml")) | stages
    assert {p.stem for p in BASE_PIECES} >= {"trainer", "callbacks", "optimizer"}


@pytest.mark.parametrize("path", BASE_PIECES, ids=lambda p: p.stem)
def test_base_piece_loads_alone(path):
    cli = DSV3CLI(args=["--config", str(path), *ON_THIS_MACHINE], run=False)
    assert isinstance(cli.model, DeepSeekV3LitModule)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_print_config_is_the_merged_whole(path, capsys):
    with pytest.raises(SystemExit):
        DSV3CLI(args=["--config", str(path), "--print_config"], run=False)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "include" not in printed
    trainer = printed["trainer"]
    assert trainer["gradient_clip_val"] == 1.0 and trainer["logger"]["init_args"]["save_dir"] == "runs"
    assert trainer["logger"]["init_args"]["name"] == path.stem  # the base logger, named by the config
    assert trainer["callbacks"][-1]["class_path"].endswith("BestAndLastCheckpoint")  # last: flags reach it
    assert printed["model"]["optimizer"]["init_args"]["betas"] == [0.9, 0.95]


def test_checkpoints_go_to_the_loggers_name_for_every_version():
    cli = DSV3CLI(args=["--config", str(CONFIG_DIR / "tiny.yaml"), "--trainer.logger.init_args.name=exp"], run=False)
    assert cli.trainer.checkpoint_callback.dirpath == os.path.realpath("runs/exp/checkpoints")
    given = DSV3CLI(
        args=["--config", str(CONFIG_DIR / "tiny.yaml"), "--trainer.callbacks.init_args.dirpath=ck"], run=False
    )
    assert given.trainer.checkpoint_callback.dirpath == os.path.realpath("ck")  # an explicit dirpath stays


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_includes_merge_before_the_file_and_once_per_command_line(tmp_path):
    (tmp_path / "parts").mkdir()
    clip = _write(tmp_path / "parts" / "clip.yaml", {"trainer": {"gradient_clip_val": 0.5, "max_steps": 7}})
    _write(tmp_path / "parts" / "steps.yaml", {"include": "clip.yaml", "trainer": {"max_steps": 9}})
    a = _write(tmp_path / "a.yaml", {"include": ["parts/steps.yaml"], "trainer": {"gradient_clip_val": 0.25}})
    b = _write(tmp_path / "b.yaml", {"include": ["parts/clip.yaml"], "trainer": {"log_every_n_steps": 3}})
    assert config_chain(a) == [clip, str(tmp_path / "parts" / "steps.yaml"), a]
    args = expand_config_args(["fit", "--config", a, f"--config={b}", "--trainer.max_steps=11"])
    assert args == [
        "fit",
        *sum((["--config", f] for f in config_chain(a)), []),
        "--config",
        b,
        "--trainer.max_steps=11",
    ]
    assert expand_config_args(args) == args
    cli = DSV3CLI(args=["--config", a, "--config", b, *ON_THIS_MACHINE], run=False)
    # clip.yaml, then steps.yaml, then a.yaml; b.yaml's include of clip.yaml does not undo a.yaml's 0.25.
    assert cli.trainer.gradient_clip_val == 0.25 and cli.trainer.max_steps == 9 and cli.trainer.log_every_n_steps == 3


def test_bad_includes_are_one_line_errors(tmp_path, capsys):
    loop = _write(tmp_path / "loop.yaml", {"include": "loop2.yaml"})
    _write(tmp_path / "loop2.yaml", {"include": "loop.yaml"})
    missing = _write(tmp_path / "missing.yaml", {"include": ["base/nothing.yaml"]})
    wrong = _write(tmp_path / "wrong.yaml", {"include": {"a": 1}})
    for path, message in ((loop, "include cycle"), (missing, "nothing.yaml (included by"), (wrong, "list of paths")):
        assert main(["fit", "--config", path]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 2  # the error line and the traceback hint
