"""Every YAML under configs/ parses and instantiates through the dsv3 CLI; big models are built on meta only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules import DeepSeekV3LitModule
from lightning_modules.cli import DSV3CLI
from models import DeepSeekV3, DeepSeekV3Config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))

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
    full = cli.parser.parse_args(["--config", str(path)])  # the GPU strategy and data keys as written
    assert full.model.preset == path.stem
    model = cli.model
    assert isinstance(model, DeepSeekV3LitModule) and model.model is None  # nothing allocated yet
    preset = DeepSeekV3Config.from_preset(path.stem, vocab_size=cli.datamodule.vocab_size)
    for key, value in (full.model.overrides or {}).items():
        setattr(preset, key, value)
    assert model.config == preset
    with torch.device("meta"):  # the planning view: every parameter, no memory
        net = DeepSeekV3(model.config)
    assert sum(p.numel() for p in net.parameters()) == model.config.num_params()
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert {"ExpertBiasBalancing", "MoELoadMonitor", "ModelCheckpoint"} <= set(names)


def test_tiny_trains_on_the_cpu_as_written():
    cli = DSV3CLI(args=["--config", str(CONFIGS[[p.stem for p in CONFIGS].index("tiny")])], run=False)
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert cli.trainer.precision == "32-true" and cli.trainer.gradient_clip_val == 1.0
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size
