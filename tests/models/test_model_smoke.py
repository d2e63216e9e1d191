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


def test_causality_and_mtp_alignment(tiny_config):
    """Main logits at i see tokens <= i; MTP depth-1 logits at i (predicting t+2) see tokens <= i + 1."""
    model = DeepSeekV3(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 13))
    changed = tokens.clone()
    j = 8
    changed[0, j] = (changed[0, j] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a = model(tokens[:, :-1], labels=tokens[:, 1:])
        b = model(changed[:, :-1], labels=changed[:, 1:])
    torch.testing.assert_close(a.logits[:, :j], b.logits[:, :j])
    assert not torch.allclose(a.logits[:, j], b.logits[:, j])
    torch.testing.assert_close(a.mtp_logits[0][:, : j - 1], b.mtp_logits[0][:, : j - 1])
    assert not torch.allclose(a.mtp_logits[0][:, j - 1], b.mtp_logits[0][:, j - 1])


def test_mtp_loss_targets_two_ahead(tiny_config):
    model = DeepSeekV3(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 11))
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    expected = torch.nn.functional.cross_entropy(out.mtp_logits[0].flatten(0, 1), tokens[:, 2:].flatten())
    torch.testing.assert_close(out.mtp_loss, expected)


def test_bf16_cast_keeps_rope_table_complex(tiny_config):
    model = DeepSeekV3(tiny_config)
    reference = model.freqs_cis.clone()
    model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64
    torch.testing.assert_close(model.freqs_cis, reference)
    assert model.embed.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 8))
    assert model(tokens).logits.dtype == torch.bfloat16
