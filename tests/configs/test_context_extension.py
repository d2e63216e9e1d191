"""YaRN is a later stage: the 671B config pretrains at 4K without it, and the report's two extension stages (section
4.3) start from a pretrained checkpoint with s=40, alpha=1, beta=32, sqrt(t)=0.1 ln s + 1, the report's batch and
LR; our YaRN fields give those numbers (and transformers' reference YaRN). The tiny stage: tests/lightning_modules/
test_init_from.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_modules.cli import DSV3CLI
from lightning_modules.config_include import expand_config_args
from models import DeepSeekV3Config
from models.hf_checkpoint import config_to_hf
from models.rope import rope_attention_factor, rope_inv_freq
from tests.configs.test_configs import ON_THIS_MACHINE

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = str(CONFIGS / "deepseek-v3-671b.yaml")
STAGES = {"32k": (32768, 1920), "128k": (131072, 480)}  # the report's sequence length and sequences per step


def _cli(*configs: str, extra: tuple[str, ...] = ()) -> DSV3CLI:
    args = [a for c in configs for a in ("--config", c)] + ON_THIS_MACHINE + list(extra)
    return DSV3CLI(args=args, run=False)


def test_671b_pretrains_at_4k_without_yarn_and_the_preset_stays_as_released():
    config = _cli(BASE).model.config
    assert not config.use_yarn and config.max_position_embeddings == 4096
    assert config.softmax_scale == config.qk_head_dim**-0.5
    released = DeepSeekV3Config.from_preset("deepseek-v3-671b")  # HF interop: DeepSeek's config.json
    assert released.rope_factor == 40 and released.max_position_embeddings == 163840


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A stand-in for the pretraining run's checkpoint: its model config (the weights are not read here)."""
    path = tmp_path_factory.mktemp("pretrained") / "last.ckpt"
    torch.save({"model_config": _cli(BASE).model.config.to_dict(), "state_dict": {}}, path)
    return str(path)


@pytest.mark.parametrize("stage", list(STAGES))
def test_extension_stages_are_the_reports(stage, pretrained):
    stage_yaml = str(CONFIGS / "context_extension" / f"deepseek-v3-671b-{stage}.yaml")
    cli = _cli(stage_yaml, extra=(f"--model.init_from={pretrained}",))  # it includes configs/deepseek-v3-671b.yaml
    full = cli.parser.parse_args(expand_config_args(["--config", stage_yaml]))  # as written, GPU keys included
    seq_len, batch = STAGES[stage]
    assert full.data.seq_len == seq_len and full.data.batch_size == 1
    assert full.trainer.num_nodes * full.trainer.devices * full.data.batch_size == batch  # sequences a step
    assert full.trainer.max_steps == 1000 and full.trainer.get("accumulate_grad_batches", 1) == 1
    assert full.model.optimizer.init_args.lr == 7.3e-6 and full.model.lr_scheduler is None  # constant
    assert full.model.init_from  # weights in: the stage starts from a pretrained checkpoint
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert "BatchSizeWarmup" not in names and "ExpertBiasBalancing" not in names  # biases kept as trained
    config = cli.model.config
    # s = 40, alpha = 1 (beta_slow), beta = 32 (beta_fast), over the 4K pretraining context
    assert (config.rope_factor, config.beta_slow, config.beta_fast) == (40.0, 1.0, 32.0)
    assert config.original_max_position_embeddings == 4096 and config.max_position_embeddings >= seq_len
    # sqrt(t) = 0.1 ln s + 1 multiplies queries and keys, so the softmax scale by t; cos/sin stay unscaled
    sqrt_t = 0.1 * math.log(40) + 1
    assert config.softmax_scale == pytest.approx(config.qk_head_dim**-0.5 * sqrt_t**2)
    assert sqrt_t**2 == pytest.approx(1.874, abs=1e-3) and rope_attention_factor(config) == 1.0
    # The stages end at DeepSeek-V3's released config (its config.json), bar the MTP weight's final value, the
    # node-limited routing of the training mesh (routing_groups: nodes; the same n_group/topk_group numbers) and
    # the vocabulary, which follows this machine's stand-in tokenizer.
    released = DeepSeekV3Config.from_preset("deepseek-v3-671b", vocab_size=config.vocab_size, routing_groups="nodes")
    assert {**config.to_dict(), "mtp_loss_weight": 0.3} == released.to_dict()
    assert config.mtp_loss_weight == 0.1


def test_our_yarn_fields_match_the_papers_boundaries_and_transformers():
    config = DeepSeekV3Config.from_preset("deepseek-v3-671b")  # s = 40, alpha 1, beta 32, L = 4096
    plain = rope_inv_freq(DeepSeekV3Config.from_preset("deepseek-v3-671b", rope_factor=1.0))
    ours = rope_inv_freq(config)
    rotations = config.original_max_position_embeddings * plain / (2 * math.pi)  # r = L / wavelength per pair
    kept, divided = rotations > config.beta_fast, rotations < config.beta_slow
    assert torch.equal(ours[kept], plain[kept])  # r > beta: extrapolated, unchanged
    torch.testing.assert_close(ours[divided], plain[divided] / 40)  # r < alpha: interpolated by s
    assert int((ours != plain).sum()) == 21  # of 32 pairs (the count)
    hf = transformers.DeepseekV3Config(**config_to_hf(config))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    torch.testing.assert_close(ours, inv_freq.float())
    assert attention_factor == pytest.approx(rope_attention_factor(config))
    assert yarn_apply_mscale(hf.rope_parameters, config.qk_head_dim**-0.5) == pytest.approx(config.softmax_scale)
