"""The multi-GPU configs' real layouts, built on the meta device: the mesh of their world size, the shards of a rank.

``configs/moonlight-16b-a3b.yaml`` (8 GPUs) and ``configs/deepseek-v3-671b.yaml`` (3072 GPUs) are plans: no test
machine has their GPUs. Here one rank of each is played with a fake process group: the YAML's
``DeepSeekV3Strategy`` layout is resolved for ``devices x num_nodes`` ranks and checked against the model, the
mesh is built, the model is parallelized on the meta device as ``configure_model`` does, and the rank's local
shards must be its share of every parameter, within the memory of an 80 GB GPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from lightning_modules.cli import DSV3CLI
from lightning_modules.strategy import PARAM_DTYPES, DeepSeekV3Strategy
from models import DeepSeekV3, DeepSeekV3Config
from models.parallel.mesh import ParallelDims
from models.parallel.parallelize import parallelize

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# No GPU and no Hub here: the CPU stands in for the GPUs (the Trainer is only built), the default BPE for the
# tokenizer (the plan uses the preset's real vocabulary below).
OFFLINE = ["--trainer.accelerator=cpu", "--data.path=text", "--data.name=null", "--data.tokenizer=null"]
OFFLINE += ["--data.val_fraction=0"]


def _plan(name: str) -> tuple[DSV3CLI, ParallelDims, int]:
    cli = DSV3CLI(args=["--config", str(CONFIGS / f"{name}.yaml"), *OFFLINE], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSeekV3Strategy)
    world = strategy.num_nodes * strategy.num_processes
    strategy.check_model(cli.model.config)
    return cli, strategy.parallel_dims.resolve(world), world


@pytest.mark.parametrize(
    ("name", "rank", "layout", "gb"),
    [
        # (pp, dp_replicate, efsdp, ep); GB of fp32 state per GPU, as the configs' comments say
        ("moonlight-16b-a3b", 5, (1, 1, 1, 8), 31.9),
        ("deepseek-v3-671b", 3071, (1, 12, 4, 64), 42.6),
    ],
)
def test_plan_builds_its_mesh_and_shards_on_meta(name, rank, layout, gb):
    cli, dims, world = _plan(name)
    assert dims.shape == layout
    config = dataclasses.replace(cli.model.config, vocab_size=DeepSeekV3Config.from_preset(name).vocab_size)
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = dims.build_mesh("cpu")
        with torch.device("meta"):
            model = DeepSeekV3(config)
        precision = cli.trainer.precision
        parallelize(model, mesh, param_dtype=PARAM_DTYPES[precision], ranks_per_node=cli.trainer.num_devices)
        local = 0
        for name_, p in model.named_parameters():
            assert isinstance(p, DTensor), name_
            shards = dims.ep * dims.efsdp if ".experts." in name_ else dims.dp_shard
            # its share, give or take the padding of one row of the sharded dimension
            assert p.to_local().numel() <= p.numel() / shards + p.numel() / p.shape[0], name_
            local += p.to_local().numel()
    finally:
        dist.destroy_process_group()
    state_gb = 16 * local / 1e9  # fp32 parameter, gradient and two AdamW moments per local element
    assert state_gb == pytest.approx(gb, abs=0.05)
    assert state_gb >= 0.999 * 16 * config.num_params() / 1e9 / world  # the rank holds (about) its share
