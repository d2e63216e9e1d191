"""benchmarks/train_throughput.py: the Lightning peer is what ``dsv3 fit --config`` builds, and its CPU smoke runs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput as tt  # noqa: E402

from lightning_modules.cli import DSV3CLI  # noqa: E402
from models import DeepSeekV3Config  # noqa: E402
from models.parallel import MasterWeightAdamW  # noqa: E402

SMOKE = ["--device", "cpu", "--preset", "tiny", "--seq-len", "32", "--warmup", "1", "--steps", "1"]


def test_lightning_peer_is_built_from_the_config_through_the_cli(one_thread):
    args = tt.parse_args([*SMOKE, "--lightning-config", str(ROOT / "configs" / "bench-1gpu.yaml")])
    config = DeepSeekV3Config.from_preset("tiny", max_position_embeddings=32)
    v = tt.Variant("ours-lightning", micro_batch=2, grad_accum=2, compile=False, precision="yaml")
    cli = DSV3CLI(
        args=tt.lightning_cli_args(config, v, args, torch.device("cpu")), run=False, datamodule_class=tt.RandomTokens
    )
    assert cli.model.config == config and cli.trainer.accumulate_grad_batches == 2 and cli.trainer.max_steps == 2
    assert cli.trainer.gradient_clip_val == 1.0  # configs/base/trainer.yaml
    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(optimizer, MasterWeightAdamW) and optimizer.defaults["betas"] == (0.9, 0.95)  # base + config
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"ExpertBiasBalancing", "MoELoadMonitor", "ThroughputMonitor", "BestAndLastCheckpoint"} <= set(names)


def test_cpu_smoke_runs_the_lightning_peer(tmp_path, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written outside --out
    peaks = ["--peak-tflops", "1", "--measured-peak-tflops", "2"]  # a CPU has neither by default
    (result,) = tt.main(
        [*SMOKE, *peaks, "--impl", "ours-lightning", "--micro-batch", "2", "--out", str(tmp_path / "out")]
    )
    assert result.status == "ok" and result.tokens_per_s > 0 and math.isfinite(result.loss)
    flops = DeepSeekV3Config.from_preset("tiny", max_position_embeddings=32).flops_per_token(32) * result.tokens_per_s
    assert result.mfu == flops / 1e12 and result.mfu_measured_peak == flops / 2e12
    assert (tmp_path / "out" / "table.md").read_text().count("ours-lightning") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
