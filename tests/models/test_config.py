"""DeepSeekV3Config: validation messages, presets, parameter and FLOP counts against the published figures."""

import pytest

from models import PRESETS, DeepSeekV3Config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_routed_experts": 30, "n_group": 8}, "n_routed_experts"),
        ({"topk_group": 9, "n_group": 8}, "topk_group"),
        ({"num_experts_per_tok": 9, "n_routed_experts": 16, "n_group": 4, "topk_group": 2}, "num_experts_per_tok"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"first_k_dense_replace": 5, "num_hidden_layers": 4}, "first_k_dense_replace"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"rope_factor": 0.5}, "rope_factor"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DeepSeekV3Config.from_preset("tiny", **overrides)


def test_unknown_preset_and_field_are_listed():
    with pytest.raises(ValueError, match="tiny"):
        DeepSeekV3Config.from_preset("deepseek-v4")
    with pytest.raises(ValueError, match="n_experts"):
        DeepSeekV3Config.from_dict({"n_experts": 8})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    config = DeepSeekV3Config.from_preset(name)
    assert DeepSeekV3Config.from_dict(config.to_dict()) == config


def test_671b_counts_match_the_report():
    config = DeepSeekV3Config.from_preset("deepseek-v3-671b")
    total = config.num_params(include_mtp=False)
    assert abs(total - 671e9) / 671e9 < 0.005  # the report's 671B, without the MTP module
    # 37B activated per token: 37.6B counting the embedding table, 36.6B without it; both round to 37B.
    assert round(config.num_params(activated=True, include_mtp=False) / 1e9) in (37, 38)
    assert round(config.num_params(activated=True, include_mtp=False, include_embedding=False) / 1e9) == 37
    # The released checkpoint's 685B: its MTP layer also stores its own embedding and head copies.
    with_mtp = config.num_params() + 2 * config.vocab_size * config.hidden_size
    assert abs(with_mtp - 685e9) / 685e9 < 0.005


def test_bench_presets_match_issue_figures():
    bench = DeepSeekV3Config.from_preset("bench-1gpu")
    assert round(bench.num_params() / 1e7) == 471  # 4.71B total
    assert round(bench.matmul_params_per_token() / 1e6) == 929  # 929M active matmul params per token
    assert round(bench.flops_per_token(4096) / 1e7) == 608  # 6.08 GFLOP per token at seq 4096
    v3w = DeepSeekV3Config.from_preset("bench-v3w")
    assert round(v3w.flops_per_token(4096) / 1e8) == 176  # 17.6 GFLOP per token
    moonlight = DeepSeekV3Config.from_preset("moonlight-16b-a3b")
    assert round(moonlight.num_params() / 1e9) == 16
    assert round(moonlight.num_params(activated=True) / 1e9) == 3


def test_kv_cache_holds_only_latent_and_rope_key():
    config = DeepSeekV3Config.from_preset("deepseek-v3-671b")
    assert config.kv_cache_bytes_per_token(2) == 61 * (512 + 64) * 2


def test_closest_preset_writes_a_config_as_preset_plus_changes():
    for name in PRESETS:
        preset, overrides = DeepSeekV3Config.from_preset(name).closest_preset()
        assert DeepSeekV3Config.from_preset(preset) == DeepSeekV3Config.from_preset(name) and overrides == {}
    changed = DeepSeekV3Config.from_preset("tiny", hidden_size=256, n_routed_experts=32)
    assert changed.closest_preset() == ("tiny", {"hidden_size": 256, "n_routed_experts": 32})


def test_shape_mismatches_name_the_fields():
    config = DeepSeekV3Config.from_preset("tiny")
    saved = {**config.to_dict(), "hidden_size": 48, "mtp_loss_weight": 0.1}  # the loss weight is no shape
    assert config.shape_mismatches(saved) == [f"hidden_size: checkpoint 48, config {config.hidden_size}"]
    assert config.shape_mismatches({}) == []
