"""Inference: the latent MLA cache with absorbed decoding reproduces the full forward; generate() sampling modes."""

import dataclasses

import pytest
import torch

from models import DeepSeekV3, DeepSeekV3Config, MLACache, generate
from models.generate import sample_next_token

# A larger init than the report's 0.006 so that logits are O(1) and a wrong cache shows in them.
INIT_STD = 0.1


def _model(config: DeepSeekV3Config, **overrides) -> DeepSeekV3:
    return DeepSeekV3(dataclasses.replace(config, init_std=INIT_STD, **overrides)).eval()


VARIANTS = {
    "q_lora": {},
    "q_direct": {"q_lora_rank": None},
    "yarn": {"rope_factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707},
}


@pytest.mark.parametrize("expanded", [False, True], ids=["latent", "expanded"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_full_forward(tiny_config, variant, expanded):
    model = _model(tiny_config, **VARIANTS[variant])
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    with torch.inference_mode():
        full = model(ids).logits  # (B, S, V)
        cache = MLACache(model.config, 2, 32, expanded=expanded)
        # Prefill, then a chunk continuing the cache (shifted causal mask), then one token at a time.
        chunks = [model.decode(ids[:, :9], cache), model.decode(ids[:, 9:14], cache)]
        chunks += [model.decode(ids[:, t : t + 1], cache) for t in range(14, 24)]
        # One token at a time from an empty cache: absorbed decoding from position 0.
        steps = MLACache(model.config, 2, 6, expanded=expanded)
        singles = [model.decode(ids[:, t : t + 1], steps) for t in range(6)]
    assert cache.seq_len == 24
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(singles, dim=1), full[:, :6], rtol=1e-5, atol=1e-5)
    assert full.abs().max() > 1.0  # the comparison is not between near-zero logits


def test_decode_last_only_and_bad_cache(tiny_config):
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 8))
    with torch.inference_mode():
        last = model.decode(ids, MLACache(model.config, 2, 8), last_only=True)
        torch.testing.assert_close(last, model(ids).logits[:, -1:], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="batch_size=3"):
            model.decode(torch.zeros(3, 1, dtype=torch.long), MLACache(model.config, 2, 8))
        with pytest.raises(ValueError, match="max_len=4"):
            model.decode(ids, MLACache(model.config, 2, 4))
    with pytest.raises(ValueError, match="max_len"):
        MLACache(model.config, 1, model.config.max_position_embeddings + 1)


def _greedy_by_full_forwards(model: DeepSeekV3, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("expanded", [False, True], ids=["latent", "expanded"])
def test_greedy_equals_argmax_of_full_forwards(tiny_config, expanded):
    model = _model(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (3, 5))
    expected = _greedy_by_full_forwards(model, prompt, 12)
    out = generate(model, prompt, max_new_tokens=12, expanded_cache=expanded)
    assert torch.equal(out, expected)


def test_tiny_top_p_is_greedy_and_sampling_is_seeded(tiny_config):
    model = _model(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))
    greedy = generate(model, prompt, max_new_tokens=10)
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_p=1e-6), greedy)

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, 10, temperature=2.0, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    first = sample(1)
    assert torch.equal(sample(1), first)
    assert not torch.equal(sample(2), first)
    assert not torch.equal(first, greedy)  # temperature 2 over 512 tokens: sampling, not argmax


def test_top_p_keeps_the_nucleus_with_renormalised_probabilities():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, -1)
    drawn = sample_next_token(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    # 0.5 alone is short of 0.6, {0.5, 0.3} reach it: renormalised to 5/8 and 3/8; the others never drawn.
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.015, rtol=0)
    # Temperature sharpens before the cut: at T = 0.5 the top token alone has 0.5^2 / sum p^2 = 0.68 >= 0.6.
    sharp = sample_next_token(logits[:100], temperature=0.5, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert sharp.eq(1).all()


def test_eos_pads_finished_sequences_and_stops_early(tiny_config):
    model = _model(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))
    ref = generate(model, prompt, max_new_tokens=12)
    eos = int(ref[0, 4 + 2])  # row 0 emits it at its third new token
    out = generate(model, prompt, max_new_tokens=12, eos_token_id=eos)
    expected = ref.clone()
    for row in expected:
        hits = (row[4:] == eos).nonzero()
        if len(hits):
            row[4 + int(hits[0]) :] = eos
    ends = [4 + int((row[4:] == eos).nonzero()[0]) + 1 if (row[4:] == eos).any() else 16 for row in expected]
    assert torch.equal(out, expected[:, : max(ends)])


def test_generate_counts_no_tokens_and_restores_train_mode(tiny_config):
    model = DeepSeekV3(tiny_config).train()
    before = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    generate(model, torch.randint(0, tiny_config.vocab_size, (2, 6)), max_new_tokens=5)
    assert model.training
    for moe, counts in zip(model.moe_layers(), before, strict=True):
        assert torch.equal(moe.tokens_per_expert, counts)


def test_generate_rejects_bad_arguments(tiny_config):
    model = DeepSeekV3(tiny_config)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, prompt, tiny_config.max_position_embeddings)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        generate(model, prompt[0], 2)
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_bf16_generation_uses_a_bf16_latent_cache(tiny_config):
    # Built under the default dtype (model.to(bfloat16) would also cast the complex RoPE table: see the report).
    torch.set_default_dtype(torch.bfloat16)
    model = DeepSeekV3(tiny_config)
    torch.set_default_dtype(torch.float32)
    assert model.embed.weight.dtype == torch.bfloat16
    out = generate(model, torch.randint(0, tiny_config.vocab_size, (2, 4)), max_new_tokens=3)
    assert out.shape == (2, 7)
    cache = MLACache(tiny_config, 2, 7, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == tiny_config.kv_cache_bytes_per_token(2)


@pytest.mark.parametrize("preset", ["tiny", "bench-1gpu", "deepseek-v3-671b"])
def test_cache_bytes_per_token(preset):
    config = DeepSeekV3Config.from_preset(preset)
    latent = MLACache(config, 1, 8, device="meta", dtype=torch.bfloat16)
    expanded = MLACache(config, 1, 8, expanded=True, device="meta", dtype=torch.bfloat16)
    assert latent.bytes_per_token() == config.kv_cache_bytes_per_token(2)
    assert latent.nbytes == 8 * latent.bytes_per_token()
    h, layers = config.num_attention_heads, config.num_hidden_layers
    naive = layers * h * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 2
    assert expanded.bytes_per_token() == naive
    ratio = naive / latent.bytes_per_token()
    print(f"{preset}: latent cache {latent.bytes_per_token()} B/token, expanded K/V {naive} B/token ({ratio:.1f}x)")
    assert naive > 3 * latent.bytes_per_token()


@pytest.mark.gpu
def test_cached_decode_on_cuda_matches_full_forward(tiny_config):
    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()

    def cached_logits(model: DeepSeekV3, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cache = MLACache(model.config, 2, 24, device="cuda", dtype=dtype)
        chunks = [model.decode(ids[:, :9], cache)] + [model.decode(ids[:, t : t + 1], cache) for t in range(9, 24)]
        return torch.cat(chunks, dim=1)

    with torch.device("cuda"):
        model32 = _model(tiny_config)
        torch.set_default_dtype(torch.bfloat16)
        model16 = _model(tiny_config)
    torch.set_default_dtype(torch.float32)
    model16.load_state_dict(model32.state_dict())
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24), device="cuda")
    with torch.inference_mode():
        ref = model32(ids).logits
        # fp32: the same numbers (TF32 matmuls may be on, hence not 1e-5).
        torch.testing.assert_close(cached_logits(model32, ids, torch.float32), ref, rtol=1e-4, atol=1e-4)
        # bf16: rounding differs between the absorbed and the expanded products, so ask the cached decode to be
        # about as close to the fp32 reference as the bf16 training forward is.
        err_full = rel_err(model16(ids).logits, ref)
        err_cached = rel_err(cached_logits(model16, ids, torch.bfloat16), ref)
    print(f"bf16 vs fp32 logits: full forward {err_full:.2e}, cached decode {err_cached:.2e}")
    assert err_cached < 3 * err_full + 1e-3
