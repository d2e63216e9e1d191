"""Logit parity with transformers' DeepseekV3ForCausalLM through our HF checkpoint import and export.

A random transformers model is saved with ``save_pretrained``, loaded with ``load_hf_checkpoint`` and both run
in fp32. Tolerance: rtol 1e-5 plus atol 1e-5, for logits up to ~4 in magnitude. The two sides compute the same
math in a different order (SDPA vs eager softmax, grouped GEMM vs a per-expert loop, fused vs unfused RMSNorm), so
they differ by a few fp32 ulps per op: measured max abs diff 1.2e-6 to 2.2e-6 over the cases below. rtol alone
cannot hold for logits near zero (relative diffs up to 1e-3 there), hence the atol, 5x above what was measured;
a wrong weight, layout, scale or routing decision moves logits by 1e-2 or more.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from models import DeepSeekV3, DeepSeekV3Config, load_hf_checkpoint, save_hf_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),  # HF's n_shared_experts=0
    pytest.mark.usefixtures("one_thread"),
]

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

# Each case: what it exercises, on top of random tiny dims.
CASES = {
    "q_lora-4groups": {"q_lora_rank": 24, "n_routed_experts": 16, "n_group": 4, "topk_group": 2},
    "no_q_lora-1group": {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0},
    "yarn-2dense-eps": {
        "rope_parameters": YARN,
        "max_position_embeddings": 128,
        "first_k_dense_replace": 2,
        "num_hidden_layers": 3,
        "rms_norm_eps": 1e-2,  # a large eps tells apart which norms use it (HF's q/kv norms keep 1e-6)
    },
    "tied-sdpa": {"tie_word_embeddings": True, "attn_implementation": "sdpa", "n_shared_experts": 2},
    "top1-no_shared": {"num_experts_per_tok": 1, "n_shared_experts": 0, "n_group": 4, "topk_group": 2},
    # rotate-half RoPE layout: the loader permutes the RoPE rows of q_b_proj and kv_a_proj_with_mqa
    "rope_not_interleaved": {"rope_interleave": False, "num_experts_per_tok": 2, "topk_group": 2},
}


def _hf_config(seed: int, **case):
    """A random tiny transformers config; ``case`` entries override the random draws."""
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    values = {
        "vocab_size": 96,
        "hidden_size": rng.choice([32, 48]),
        "intermediate_size": 64,
        "moe_intermediate_size": rng.choice([8, 16]),
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": 16,
        "kv_lora_rank": rng.choice([8, 12]),
        "qk_nope_head_dim": rng.choice([4, 8]),
        "qk_rope_head_dim": rng.choice([4, 8]),
        "v_head_dim": rng.choice([6, 8]),
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 3,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": rng.choice([1.0, 2.5]),
        "max_position_embeddings": 64,
        "attn_implementation": "eager",
        **case,
    }
    values["num_key_value_heads"] = values["num_attention_heads"]
    return transformers.DeepseekV3Config(**values)


@torch.no_grad()
def _randomize_hf(model) -> None:
    """Weights far from transformers' init (norms around 1, not 1; router biases that change the top-k)."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(1.0, 0.2)
        else:
            param.normal_(0.0, 0.15)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.uniform_(-0.3, 0.3)


def _gate_inputs(model, tokens):
    """Hidden states entering the first MoE router."""
    router = next(m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter")
    seen = []
    handle = router.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[2])))
    model(tokens)
    handle.remove()
    return router, *seen[0]


def _assert_bias_changes_routing(model, tokens) -> None:
    router, hidden, topk_with_bias = _gate_inputs(model, tokens)
    saved = router.e_score_correction_bias.clone()
    router.e_score_correction_bias.zero_()
    topk_without = router(hidden)[2]
    router.e_score_correction_bias.copy_(saved)
    changed = (topk_with_bias.sort(-1).values != topk_without.sort(-1).values).any(-1).float().mean()
    assert changed > 0.2, f"router biases change the choice of only {changed:.0%} of tokens"


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=list(CASES))
@torch.no_grad()
def test_load_transformers_checkpoint_matches_logits(tmp_path, seed, case):
    torch.manual_seed(seed)
    hf_config = _hf_config(seed, **CASES[case])
    hf_model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    _randomize_hf(hf_model)
    tokens = torch.randint(0, hf_config.vocab_size, (2, hf_config.max_position_embeddings // 2 + 3))
    if hf_config.first_k_dense_replace < hf_config.num_hidden_layers:
        _assert_bias_changes_routing(hf_model, tokens)
    hf_model.save_pretrained(tmp_path)

    ours = load_hf_checkpoint(tmp_path)
    theirs = hf_model(tokens).logits
    torch.testing.assert_close(ours(tokens).logits, theirs, rtol=1e-5, atol=1e-5)

    save_hf_checkpoint(ours, tmp_path / "export")
    reloaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "export", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    torch.testing.assert_close(reloaded.eval()(tokens).logits, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n_group,topk_group,top_k,norm_topk_prob",
    [(1, 1, 4, True), (4, 2, 3, True), (8, 3, 1, True), (4, 1, 2, False)],
)
@torch.no_grad()
def test_gate_matches_transformers_router(tiny_config, n_group, topk_group, top_k, norm_topk_prob):
    """Our Gate against DeepseekV3TopkRouter on the same weights and selection-changing biases."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from models.moe import Gate

    routing = {"n_group": n_group, "topk_group": topk_group, "num_experts_per_tok": top_k}
    config = DeepSeekV3Config.from_dict(
        {**tiny_config.to_dict(), **routing, "n_routed_experts": 32, "norm_topk_prob": norm_topk_prob}
    )
    hf_config = _hf_config(
        0, hidden_size=config.hidden_size, n_routed_experts=32, norm_topk_prob=norm_topk_prob, **routing
    )
    ours, theirs = Gate(config), DeepseekV3TopkRouter(hf_config)
    ours.reset_parameters(std=0.3)
    x_TD = torch.randn(256, config.hidden_size)
    idx_without_bias_TK = ours(x_TD)[1].sort(-1).values
    ours.e_score_correction_bias.uniform_(-0.3, 0.3)
    theirs.load_state_dict(ours.state_dict())
    weights_TK, idx_TK, _ = ours(x_TD)
    _, hf_weights_TK, hf_idx_TK = theirs(x_TD)
    order, hf_order = idx_TK.argsort(-1), hf_idx_TK.argsort(-1)
    assert torch.equal(idx_TK.gather(1, order), hf_idx_TK.gather(1, hf_order))
    assert (idx_TK.gather(1, order) != idx_without_bias_TK).any(-1).float().mean() > 0.2  # the bias matters
    torch.testing.assert_close(weights_TK.gather(1, order), hf_weights_TK.gather(1, hf_order), rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_fused_expert_layout_loads(tmp_path):
    """transformers' in-memory tensors written as they are: fused experts.gate_up_proj (E, 2F, D), down_proj."""
    hf_config = _hf_config(7, num_hidden_layers=3)
    hf_model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    _randomize_hf(hf_model)
    state = hf_model.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_config.save_pretrained(tmp_path)
    tokens = torch.randint(0, hf_config.vocab_size, (2, 20))
    ours = load_hf_checkpoint(tmp_path)
    torch.testing.assert_close(ours(tokens).logits, hf_model(tokens).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_export_with_mtp_loads_into_transformers(tmp_path, tiny_config):
    """Our model with an MTP module: transformers loads the main model and reports only layers L+k as extra."""
    config = DeepSeekV3Config.from_dict(
        {**tiny_config.to_dict(), "rope_factor": 4.0, "original_max_position_embeddings": 64}
    )
    ours = DeepSeekV3(config).eval()
    for moe in ours.moe_layers():
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    save_hf_checkpoint(ours, tmp_path)
    hf_model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert info["unexpected_keys"] and all(k.startswith(mtp_prefix) for k in info["unexpected_keys"])
    tokens = torch.randint(0, config.vocab_size, (2, 80))
    torch.testing.assert_close(ours(tokens).logits, hf_model.eval()(tokens).logits, rtol=1e-5, atol=1e-5)
