"""The LitModule's speed options: activation checkpointing and compile flags, the fast bench-1gpu.yaml."""

import json

import pytest
import torch

from lightning_modules import DeepSeekV3LitModule, MasterWeightPrecision
from lightning_modules.cli import DSV3CLI
from models.parallel import MasterWeightAdamW
from tests.configs.test_configs import ON_THIS_MACHINE
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


def test_bench_yaml_builds_the_fast_path():
    # configs/bench-1gpu.yaml as dsv3 fit builds it (its model shrunk): bf16 parameters under MasterWeightAdamW with
    # the YAML's weight decay on matrices only, fp32 gate buffers, compiled blocks.
    args = [
        "--config",
        str(ROOT / "configs" / "bench-1gpu.yaml"),
        *ON_THIS_MACHINE,
        "--model.preset=tiny",
        "--data.seq_len=32",
    ]
    cli = DSV3CLI(args=[*args, "--model.overrides", json.dumps(SMALL_MODEL)], run=False)
    module = cli.model
    module.configure_model()
    cli.trainer.precision_plugin.convert_module(module)  # what the Trainer does before configure_optimizers
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MasterWeightAdamW) and cli.trainer.gradient_clip_val == 1.0
    assert isinstance(cli.trainer.precision_plugin, MasterWeightPrecision)
    gate = module.model.moe_layers()[0].gate
    assert all(p.dtype == torch.bfloat16 for n, p in module.named_parameters() if ".gate." not in n)
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all("master" in optimizer.state[p] for p in optimizer.param_groups[1]["params"])  # bf16 norms
    assert all(block._compiled_call_impl is not None for block in module.model.layers)
