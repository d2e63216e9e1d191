"""Small, fast CLI arguments shared by the Lightning tests: a 2-layer model on 33-token windows of Shakespeare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")

SMALL_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
}


def small_args(tmp_path: Path, **trainer: object) -> list[str]:
    """configs/tiny.yaml shrunk to seconds: small model, 1024-token BPE, (2, 33) batches, logs under tmp_path."""
    args = [
        "--config",
        TINY_YAML,
        "--model.overrides",
        json.dumps(SMALL_MODEL),
        "--data.vocab_size=1024",
        "--data.seq_len=32",
        "--data.batch_size=2",
        "--data.val_batches=2",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
        f"--trainer.callbacks.init_args.dirpath={tmp_path}/ckpt",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    return args + [f"--trainer.{k}={v}" for k, v in trainer.items()]


@pytest.fixture
def small(tmp_path):
    return lambda **trainer: small_args(tmp_path, **trainer)


@pytest.fixture(scope="package")
def trained_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a 2-step fit of the small model (shared: reading tests must not modify it)."""
    from lightning_modules.cli import DSV3CLI

    tmp = tmp_path_factory.mktemp("fit")
    DSV3CLI(args=["fit", *small_args(tmp, max_steps=2, val_check_interval=2)])
    return tmp / "ckpt" / "last.ckpt"
