"""Autoregressive generation with the MLA latent cache: greedy, temperature and top-p (nucleus) sampling.

Shapes: B batch, S prompt length, V vocabulary.
"""

from __future__ import annotations

import torch

from models.kv_cache import MLACache
from models.model import DeepSeekV3


def sample_next_token(
    logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick the next token of each sequence.

    Args:
        logits_BV: (B, V) next-token logits.
        temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature).
        top_p: Sample only from the smallest set of most likely tokens whose probability reaches top_p
            (Holtzman et al., 2020); the most likely token is always kept, so a tiny top_p is greedy.
        generator: Random generator for reproducible sampling (on the logits' device).

    Returns:
        (B,) int64 token ids.
    """
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    probs_BV = (logits_BV.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the ones ranked above it already reach top_p.
        drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _check_args(model: DeepSeekV3, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float):
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (B, S) with S >= 1 (equal-length prompts), got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_position_embeddings={model.config.max_position_embeddings}; shorten one of them"
        )


@torch.inference_mode()
def generate(
    model: DeepSeekV3,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    expanded_cache: bool = False,
) -> torch.Tensor:
    """Continue equal-length prompts: one prefill, then one cached forward per new token.

    The model runs in eval mode (restored afterwards), so the MoE layers count no tokens and compute no
    balance loss; the MTP modules are not used.

    Args:
        model: The model (any device and dtype; the cache follows its embedding's).
        prompt_ids: (B, S) int64 prompts of equal length.
        max_new_tokens: Tokens to add to each prompt.
        temperature: 0 = greedy; otherwise sampling temperature.
        top_p: Nucleus sampling threshold in (0, 1]; 1 = off.
        eos_token_id: Sequences that produced it are padded with it from then on; generation stops early
            once every sequence has (one host sync per step, only when set).
        generator: Seeded ``torch.Generator`` (on the model's device) for reproducible sampling.
        expanded_cache: Cache per-head K/V (the naive way) instead of the latent; for comparisons only.

    Returns:
        (B, S + n) int64 prompts and continuations, n = max_new_tokens (fewer if all sequences hit eos).
    """
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_p)
    if max_new_tokens == 0:
        return prompt_ids.clone()
    bsz, prompt_len = prompt_ids.shape
    emb = model.embed.weight
    max_len = prompt_len + max_new_tokens
    cache = MLACache(model.config, bsz, max_len, expanded=expanded_cache, device=emb.device, dtype=emb.dtype)
    was_training = model.training
    model.eval()
    try:
        tokens = [prompt_ids]
        finished_B = torch.zeros(bsz, dtype=torch.bool, device=prompt_ids.device)
        logits_BV = model.decode(prompt_ids, cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            next_B = sample_next_token(logits_BV, temperature, top_p, generator)
            if eos_token_id is not None:
                next_B = next_B.masked_fill(finished_B, eos_token_id)
                finished_B = finished_B | (next_B == eos_token_id)
            tokens.append(next_B[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished_B.all())):
                break
            logits_BV = model.decode(next_B[:, None], cache)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
