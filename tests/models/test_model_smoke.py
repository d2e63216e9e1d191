"""Smoke tests of the model core: shapes, losses, counts, meta build."""

import torch

from models import DeepSeekV3, DeepSeekV3Config


def test_forward_shapes_and_param_count(tiny_config):
    model = DeepSeekV3(tiny_config)
    assert sum(p.numel() for p in model.parameters()) == tiny_config.num_params()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 17))
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    assert out.logits.shape == (2, 16, tiny_config.vocab_size)
    assert [t.shape for t in out.mtp_logits] == [(2, 15, tiny_config.vocab_size)]
    expected = out.ce_loss + tiny_config.mtp_loss_weight * out.mtp_loss + out.balance_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    moe = model.moe_layers()
    assert len(moe) == 2 + 1  # two main MoE blocks and the MTP block
    assert moe[0].tokens_per_expert.sum() == 2 * 16 * tiny_config.num_experts_per_tok


def test_671b_builds_on_meta():
    config = DeepSeekV3Config.from_preset("deepseek-v3-671b")
    with torch.device("meta"):
        model = DeepSeekV3(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
