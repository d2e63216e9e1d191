"""HF checkpoint import/export: exact round trips, sharding, DeepSeek's release layout, FP8 block scales, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import DeepSeekV3, DeepSeekV3Config, load_hf_checkpoint, save_hf_checkpoint
from models.hf_checkpoint import INDEX_FILE, SINGLE_FILE, config_from_hf, dequantize_fp8
from models.parallel import cast_parameters

# DeepSeek-V3's released config.json (deepseek-ai/DeepSeek-V3), minus auto_map.
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(config: DeepSeekV3Config) -> DeepSeekV3:
    """Random weights everywhere, norms and expert biases included, so a dropped or swapped tensor shows."""
    model = DeepSeekV3(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    return model.eval()


def _assert_same_state(a: DeepSeekV3, b: DeepSeekV3) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _load_all(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _rewrite(path, tensors: dict[str, torch.Tensor], config_update: dict | None = None, split=None) -> None:
    """Replace the checkpoint at ``path`` by ``tensors``: one file, or two shards and an index when the predicate
    ``split(name)`` picks the tensors of the second shard."""
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / INDEX_FILE).unlink(missing_ok=True)
    if split is None:
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
    else:
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weight_map = {k: names[bool(split(k))] for k in tensors}
        for name in names:
            shard = {k: v for k, v in tensors.items() if weight_map[k] == name}
            save_file(shard, path / name, metadata={"format": "pt"})
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config_update:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **config_update}))


@pytest.mark.parametrize("shard_size", ["5GB", 40_000], ids=["one-file", "sharded"])
def test_round_trip_is_exact(tmp_path, tiny_config, shard_size):
    config = DeepSeekV3Config.from_dict({**tiny_config.to_dict(), "rope_factor": 4.0, "mtp_loss_weight": 0.1})
    model = _random_model(config)
    save_hf_checkpoint(model, tmp_path, max_shard_size=shard_size)
    shards = sorted(tmp_path.glob("*.safetensors"))
    if shard_size == "5GB":
        assert [f.name for f in shards] == [SINGLE_FILE]
    else:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == [f.name for f in shards]
        for f in shards:  # within the limit (plus the header), or a single tensor larger than it
            names = [k for k, v in index["weight_map"].items() if v == f.name]
            assert len(names) == 1 or f.stat().st_size < 40_000 + 10_000
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.config == config
    _assert_same_state(model, loaded)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_export_layout_follows_deepseek_release(tmp_path, tiny_config):
    model = _random_model(tiny_config)
    save_hf_checkpoint(model, tmp_path)
    tensors = _load_all(tmp_path)
    mtp = f"model.layers.{tiny_config.num_hidden_layers}."
    for name in ["enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"]:
        assert mtp + name + ".weight" in tensors
    assert torch.equal(tensors[mtp + "embed_tokens.weight"], model.embed.weight)
    assert torch.equal(tensors[mtp + "shared_head.head.weight"], model.head.weight)
    layer = "model.layers.1.mlp."
    assert torch.equal(tensors[layer + "experts.3.gate_proj.weight"], model.layers[1].ffn.experts.w1[3])
    assert torch.equal(tensors[layer + "experts.3.up_proj.weight"], model.layers[1].ffn.experts.w3[3])
    assert torch.equal(tensors[layer + "experts.3.down_proj.weight"], model.layers[1].ffn.experts.w2[3])
    assert tensors[layer + "gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["rope_parameters"]["rope_type"] == "default" and config["rope_interleave"] is True


def test_deepseek_and_transformers_config_formats_agree():
    ours = config_from_hf(DEEPSEEK_V3_CONFIG)
    preset = DeepSeekV3Config.from_preset("deepseek-v3-671b")
    assert ours == preset  # architecture and YaRN fields; training knobs keep our (report) defaults
    rope = DEEPSEEK_V3_CONFIG["rope_scaling"]
    v5 = {k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 1e4}
    assert config_from_hf(v5) == preset
    assert config_from_hf({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}).rope_factor == 1.0
    with pytest.raises(ValueError, match="rope type 'linear'"):
        config_from_hf({**v5, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**v5, "hidden_act": "gelu"})


def _quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantisation as DeepSeek's released weights: scale_inv = amax / 448 per block."""
    rows, cols = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
    scale_inv = torch.empty(rows, cols)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale_inv[i, j] = blk.abs().amax().clamp(min=1e-12) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / scale_inv[i, j]).to(q.dtype)
    return q, scale_inv


def _dequantize_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    w = q.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            w[i * block : (i + 1) * block, j * block : (j + 1) * block] *= scale_inv[i, j]
    return w


def test_dequantize_fp8_partial_blocks():
    w = torch.randn(300, 200)  # 3 x 2 blocks of 128, the last row and column blocks partial
    q, scale_inv = _quantize_fp8(w, 128)
    assert scale_inv.shape == (3, 2)
    out = dequantize_fp8(q, scale_inv)
    assert torch.equal(out, _dequantize_reference(q, scale_inv, 128))
    torch.testing.assert_close(out, w, rtol=0.07, atol=1e-3)  # e4m3 keeps 3 mantissa bits


def test_fp8_checkpoint_loads_dequantized(tmp_path, tiny_config):
    """DeepSeek's release: 2-D projection weights in float8_e4m3fn with per-block weight_scale_inv."""
    config = DeepSeekV3Config.from_dict({**tiny_config.to_dict(), "hidden_size": 160, "q_lora_rank": 136})
    save_hf_checkpoint(_random_model(config), tmp_path)
    tensors, reference, block = _load_all(tmp_path), {}, 128
    for key in list(tensors):
        if "proj" in key or "experts" in key:  # as released: attention and MLP weights, not norms/gate/embeddings
            q, scale_inv = _quantize_fp8(tensors[key], block)
            tensors[key], tensors[key + "_scale_inv"] = q, scale_inv
            reference[key] = _dequantize_reference(q, scale_inv, block)
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    # Layer 0's scales in a shard of their own, the others beside their weights.
    scales_apart = lambda name: name.startswith("model.layers.0.") and name.endswith("_scale_inv")
    _rewrite(tmp_path, tensors, {"quantization_config": quantization}, split=scales_apart)
    ours = load_hf_checkpoint(tmp_path)
    # Reference model: the fp32 dequantised weights written as a plain checkpoint.
    _rewrite(tmp_path, {**{k: v for k, v in tensors.items() if not k.endswith("_scale_inv")}, **reference})
    expected = load_hf_checkpoint(tmp_path)
    _assert_same_state(ours, expected)
    assert any(t.shape[0] > block for t in reference.values())  # partial edge blocks are exercised
    w = ours.layers[0].attn.wq_a.weight  # (136, 160): blocks of 128 rows/cols plus partial ones
    assert torch.equal(w, reference["model.layers.0.self_attn.q_a_proj.weight"])


def test_mismatches_are_listed(tmp_path, tiny_config):
    save_hf_checkpoint(_random_model(tiny_config), tmp_path)
    tensors = _load_all(tmp_path)
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(3, 4)
    tensors["model.norm.weight"] = torch.ones(65)
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(8, 8, dtype=torch.float8_e4m3fn)
    _rewrite(tmp_path, tensors)
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(tmp_path)
    message = str(err.value)
    assert "2 missing" in message and "1 unexpected" in message
    assert "model.layers.0.self_attn.o_proj.weight [64, 64]" in message
    assert "model.layers.2.mlp.experts.5.up_proj.weight [32, 64]" in message
    assert "model.layers.0.self_attn.extra.weight [3, 4]" in message
    assert "model.norm.weight: checkpoint [65], model expects [64]" in message
    assert "model.layers.1.self_attn.kv_b_proj.weight: F8_E4M3 weight without" in message


def test_missing_mtp_layers(tmp_path, tiny_config):
    """transformers writes num_nextn_predict_layers=1 without MTP weights: build without MTP unless asked."""
    model = _random_model(DeepSeekV3Config.from_dict({**tiny_config.to_dict(), "num_nextn_predict_layers": 0}))
    save_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    assert load_hf_checkpoint(tmp_path).config.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match=r"missing tensor\(s\):\n  model\.layers\.3\."):
        load_hf_checkpoint(tmp_path, num_nextn_predict_layers=1)


def test_differing_mtp_embedding_copy_warns(tmp_path, tiny_config):
    save_hf_checkpoint(_random_model(tiny_config), tmp_path)
    tensors = _load_all(tmp_path)
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.layers.3.embed_tokens.weight"] + 1.0
    _rewrite(tmp_path, tensors)
    with pytest.warns(UserWarning, match=r"model\.layers\.3\.embed_tokens\.weight differs"):
        loaded = load_hf_checkpoint(tmp_path)
    assert torch.equal(loaded.embed.weight, tensors["model.embed_tokens.weight"])


def test_dtype_and_device(tmp_path, tiny_config):
    model = _random_model(tiny_config)
    save_hf_checkpoint(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_hf_checkpoint(tmp_path, dtype="auto", device="cpu")
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(loaded.layers[1].ffn.experts.w2, model.layers[1].ffn.experts.w2.bfloat16())
    assert load_hf_checkpoint(tmp_path).embed.weight.dtype == torch.float32


def test_tied_embeddings_survive_meta_init(tmp_path, tiny_config):
    """to_empty() gives each module a new Parameter; init_weights and the loader re-tie head and embedding."""
    config = DeepSeekV3Config.from_dict({**tiny_config.to_dict(), "tie_word_embeddings": True})
    with torch.device("meta"):
        model = DeepSeekV3(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.head.weight is model.embed.weight
    save_hf_checkpoint(model, tmp_path)
    assert "lm_head.weight" not in _load_all(tmp_path)
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.head.weight is loaded.embed.weight


@pytest.mark.gpu
def test_load_to_cuda_in_bf16(tmp_path, tiny_config):
    model = _random_model(tiny_config)
    save_hf_checkpoint(model, tmp_path, max_shard_size=100_000)
    loaded = load_hf_checkpoint(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in loaded.parameters()} == {"cuda"} and loaded.freqs_cis.is_cuda
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    # Reference: the same weights cast to bf16 on the GPU by hand (buffers stay fp32, as the loader keeps them).
    # Comparing with the fp32 model instead would fail on bf16 rounding flipping a few near-tied expert choices.
    reference = cast_parameters(copy.deepcopy(model).cuda(), torch.bfloat16)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits)
