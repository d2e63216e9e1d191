"""The LitModule's speed options: activation checkpointing and compile flags, the fast bench-1gpu.yaml."""

import subprocess
import sys

import pytest
import torch

from lightning_modules import DeepSeekV3LitModule, MasterWeightPrecision
from models.parallel import MasterWeightAdamW
from tests.lightning_modules.conftest import ROOT, SMALL_MODEL


def test_activation_checkpointing_option_keeps_names_and_trains():
    plain = DeepSeekV3LitModule(overrides=SMALL_MODEL)
    ac = DeepSeekV3LitModule(overrides=SMALL_MODEL, activation_checkpointing="selective")
    for module in (plain, ac):
        module.configure_model()
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in plain.named_parameters()]
    tokens = torch.randint(0, ac.config.vocab_size, (2, 17))
    out = ac.model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
    out.loss.backward()
    assert all(p.grad is not None for p in ac.model.layers.parameters())
    with pytest.raises(ValueError, match="activation_checkpointing"):
        DeepSeekV3LitModule(overrides=SMALL_MODEL, activation_checkpointing="all")


def test_master_weight_optimizer_from_the_module_groups():
    module = DeepSeekV3LitModule(overrides=SMALL_MODEL, optimizer=lambda p: MasterWeightAdamW(p, lr=1e-3))
    module.configure_model()
    MasterWeightPrecision().convert_module(module)  # what the Trainer does before configure_optimizers
    optimizer = module.configure_optimizers()
    gate = module.model.moe_layers()[0].gate
    assert all(p.dtype == torch.bfloat16 for n, p in module.named_parameters() if ".gate." not in n)
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert [g.get("weight_decay", 1e-2) for g in optimizer.param_groups] == [1e-2, 0.0]
    assert all("master" in optimizer.state[p] for p in optimizer.param_groups[1]["params"])  # bf16 norms


def test_bench_yaml_resolves_the_fast_path():
    yaml = "configs/bench-1gpu.yaml"
    cmd = [sys.executable, "-m", "lightning_modules.cli", "fit", "--config", yaml, "--print_config"]
    printed = subprocess.run(cmd, cwd=ROOT, capture_output=True)
    assert printed.returncode == 0, printed.stderr.decode()
    out = printed.stdout.decode()
    assert "models.parallel.MasterWeightAdamW" in out and "compile: true" in out
    assert "class_path: lightning_modules.MasterWeightPrecision" in out and "precision: null" in out
