"""Multi-head latent attention (MLA), DeepSeek-V2/V3: low-rank queries, a joint key/value latent, a decoupled RoPE key.

Shapes: B batch, S query length, L keys (cached + new), D model dim, H heads, N = qk_nope_head_dim,
R = qk_rope_head_dim, V = v_head_dim, C = kv_lora_rank (the latent), Q = q_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.config import DeepSeekV3Config
from models.kv_cache import ExpandedLayerCache, LatentLayerCache
from models.rope import apply_rope

# Training: flash attention refuses MLA's unequal q/k (N+R = 192) and v (V = 128) head dims and the fallback
# (mem-efficient) kernel is ~8x slower on H100/H200; cuDNN's fused attention takes them.
_SDPA_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, weight applied in the input dtype (as DeepSeek-V3/HF)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class MLA(nn.Module):
    """Multi-head latent attention, eqs. (1)-(11) of the DeepSeek-V3 report.

    Training (and prefill) expands the latent into per-head keys and values and runs SDPA. Decoding works
    on the cache of latents ``c_kv`` (C values) and RoPE keys ``k_pe`` (R values) per token, with
    ``wkv_b`` absorbed into the query and the output (see ``forward_absorbed``).
    """

    def __init__(self, config: DeepSeekV3Config) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        d, h = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.wq = nn.Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d, config.q_lora_rank, bias=False)
            # The latent norms keep eps 1e-6 whatever rms_norm_eps says, as DeepSeek's inference and HF code do.
            self.q_norm = RMSNorm(config.q_lora_rank)
            self.wq_b = nn.Linear(config.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank)  # eps 1e-6, as q_norm
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, d, bias=False)

    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope (B, S, H, N), q_pe (B, S, H, R)) with RoPE applied to q_pe."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, -1, self.qk_head_dim)  # (B, S, H, N+R)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the inference cache holds: normalised latent c_kv (B, S, C) and the rotated shared key (B, S, R)."""
        kv = self.wkv_a(x)  # (B, S, C+R)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # (B, S, R)
        return self.kv_norm(c_kv), k_pe

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentLayerCache | ExpandedLayerCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Causal self-attention over x, or over the cache and x when a cache is given.

        Args:
            x: (B, S, D) hidden states.
            cos: (S, R/2) RoPE table rows for positions start_pos..start_pos+S-1.
            sin: (S, R/2).
            cache: This layer's inference cache; x's entries are written at start_pos (see ``forward_cached``).
            start_pos: Position of x's first token (cached tokens precede it).

        Returns:
            (B, S, D).
        """
        if cache is not None:
            return self.forward_cached(x, cos, sin, cache, start_pos)
        bsz, seqlen, _ = x.shape
        q_nope, q_pe = self._query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        kv = self.wkv_b(c_kv).view(bsz, seqlen, -1, self.nope_dim + self.v_dim)  # (B, S, H, N+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, S, H, N+R)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)), dim=-1)  # (B, S, H, N+R)
        with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
            )  # (B, H, S, V)
        return self.wo(o.transpose(1, 2).reshape(bsz, seqlen, -1))  # (B, S, D)

    # ------------------------------------------------------------------ inference
    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentLayerCache | ExpandedLayerCache,
        start_pos: int,
    ) -> torch.Tensor:
        """Write x's cache entries at start_pos..start_pos+S-1, then attend causally over positions 0..start_pos+S-1.

        With a latent cache, decoding (and a prefill chunk after cached tokens) uses the absorbed formulation
        (``_attend_absorbed``). A prefill into an empty cache is compute-bound: there the expanded form is cheaper
        (H x (N+R) per score instead of H x (C+R)), so it runs the training path (one fused causal SDPA; its two
        small down-projections are recomputed), as serving engines do; only the latent is cached. An expanded
        cache stores per-head K/V and runs SDPA over them (``_attend_expanded``).
        """
        bsz, seqlen, _ = x.shape
        end = start_pos + seqlen
        c_kv, k_pe = self.latent(x, cos, sin)
        if isinstance(cache, ExpandedLayerCache):
            return self._attend_expanded(x, cos, sin, c_kv, k_pe, cache, start_pos)
        cache.kv[:bsz, start_pos:end] = torch.cat((c_kv, k_pe), dim=-1)
        if start_pos == 0 and seqlen > 1:
            return self.forward(x, cos, sin)
        q_nope, q_pe = self._query(x, cos, sin)
        return self._attend_absorbed(q_nope, q_pe, cache.kv[:bsz, :end], _chunk_mask(seqlen, start_pos, x))

    def _attend_expanded(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        cache: ExpandedLayerCache,
        start_pos: int,
    ) -> torch.Tensor:
        """The naive way, for comparison: cache the new tokens' per-head K/V, then SDPA of their queries over it."""
        bsz, seqlen, _ = x.shape
        end = start_pos + seqlen
        q_nope, q_pe = self._query(x, cos, sin)
        kv = self.wkv_b(c_kv).view(bsz, seqlen, -1, self.nope_dim + self.v_dim)  # (B, S, H, N+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)), dim=-1)  # (B, S, H, N+R)
        cache.k[:bsz, :, start_pos:end] = k.transpose(1, 2)
        cache.v[:bsz, :, start_pos:end] = v.transpose(1, 2)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, S, N+R)
        # From position 0, queries and keys start together and SDPA's top-left causal mask is the right one.
        mask = None if start_pos == 0 else _chunk_mask(seqlen, start_pos, x)
        with sdpa_kernel(_CACHED_SDPA_BACKENDS):
            o = F.scaled_dot_product_attention(
                q,
                cache.k[:bsz, :, :end],  # (B, H, L, N+R)
                cache.v[:bsz, :, :end],  # (B, H, L, V)
                attn_mask=mask,
                is_causal=start_pos == 0,
                scale=self.softmax_scale,
            )  # (B, H, S, V)
        return self.wo(o.transpose(1, 2).reshape(bsz, seqlen, -1))  # (B, S, D)

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention against the latent cache with wkv_b folded into the query and the output.

        DeepSeek's ``inference/model.py`` "absorb" mode: q_nope^T k_nope = q_nope^T W_UK c_kv = (W_UK^T q_nope)^T c_kv,
        and sum_t p_t W_UV c_t = W_UV sum_t p_t c_t; all heads then share one key [c_kv | k_pe] (C+R) and one
        value c_kv (C): multi-query attention over the cache, read once per step for all heads, nothing expanded.

        Args:
            q_nope: (B, S, H, N).
            q_pe: (B, S, H, R), rotated.
            kv: (B, L, C+R) cache rows [c_kv | k_pe] for positions 0..L-1.
            mask: (S, L) bool, True = attend; None when every query sees every key.

        Returns:
            (B, S, D).
        """
        bsz, seqlen, n_heads, _ = q_nope.shape
        w_kv_b = self.wkv_b.weight.view(n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)  # (H, N+V, C)
        w_uk, w_uv = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)  # (H, N, C), (H, V, C)
        q_c = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # (B, S, H, C)
        q = torch.cat((q_c, q_pe), dim=-1).flatten(1, 2)  # (B, S*H, C+R)
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.softmax_scale  # (B, S*H, L)
        if mask is not None:
            scores = scores.view(bsz, seqlen, n_heads, -1).masked_fill(~mask[:, None, :], float("-inf")).flatten(1, 2)
        probs = scores.softmax(dim=-1).to(q.dtype)  # (B, S*H, L)
        o_c = torch.bmm(probs, kv[..., : self.kv_lora_rank])  # (B, S*H, C)
        o = torch.einsum("bshc,hvc->bshv", o_c.view(bsz, seqlen, n_heads, -1), w_uv)  # (B, S, H, V)
        return self.wo(o.flatten(2))  # (B, S, D)


def _chunk_mask(seqlen: int, start_pos: int, x: torch.Tensor) -> torch.Tensor | None:
    """(S, start_pos+S) causal mask of a chunk continuing start_pos cached tokens, True = attend; None for S = 1."""
    if seqlen == 1:
        return None
    pos = torch.arange(start_pos + seqlen, device=x.device)
    return pos[None, :] <= pos[start_pos:, None]


# cuDNN attention (PyTorch's first choice on Hopper) builds an execution plan per shape: free for training's fixed
# shapes, but about 8 ms a call when the key length grows by one every decode step (measured on an H200).
_CACHED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
