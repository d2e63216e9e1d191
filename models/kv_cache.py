"""Inference caches for MLA: the compressed latent cache (what DeepSeek-V3 serves with) and a naive expanded one.

Shapes: B batch, M max cached length, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim,
C = kv_lora_rank.

The latent cache stores, per token and main layer, only the normalised latent c_kv (C values) and the rotated
RoPE key k_pe shared by all heads (R values), side by side in one (B, M, C+R) tensor: the key of the absorbed
attention is the whole row and its value the first C columns (FlashMLA's layout), so decoding reads it without
copies. The expanded cache stores per-head keys and values, H * (N+R+V) values per token and layer, as a
plain multi-head attention would; it exists to measure what the latent cache saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import DeepSeekV3Config


@dataclass
class LatentLayerCache:
    """One layer's latent cache.

    Attributes:
        kv: (B, M, C+R) rows [c_kv | k_pe]: the kv_norm-ed latent, then the rotated shared RoPE key.
    """

    kv: torch.Tensor


@dataclass
class ExpandedLayerCache:
    """One layer's naive per-head cache (benchmarks and tests only).

    Attributes:
        k: (B, H, M, N+R) keys [k_nope | k_pe].
        v: (B, H, M, V) values.
    """

    k: torch.Tensor
    v: torch.Tensor


class MLACache:
    """Preallocated per-layer caches for ``DeepSeekV3.decode``; the MTP modules are not cached.

    ``decode`` writes the new tokens' entries at ``seq_len`` and advances it.

    Args:
        config: The model's config.
        batch_size: Sequences decoded together (B).
        max_len: Longest sequence (prompt + new tokens) the cache holds (M), at most max_position_embeddings.
        expanded: Cache per-head K and V instead of the latent (the naive way, for comparison).
        device: Where to allocate.
        dtype: Cache dtype (default: torch's default dtype); use the model's dtype.
    """

    def __init__(
        self,
        config: DeepSeekV3Config,
        batch_size: int,
        max_len: int,
        *,
        expanded: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 < max_len <= config.max_position_embeddings:
            raise ValueError(
                f"max_len must be in [1, max_position_embeddings={config.max_position_embeddings}], got {max_len}; "
                "shorten the prompt or max_new_tokens, or raise max_position_embeddings"
            )
        self.batch_size, self.max_len, self.expanded = batch_size, max_len, expanded
        self.seq_len = 0
        kw = {"device": device, "dtype": dtype}
        b, m, h = batch_size, max_len, config.num_attention_heads
        self.layers: list[LatentLayerCache | ExpandedLayerCache] = [
            ExpandedLayerCache(
                k=torch.zeros(b, h, m, config.qk_head_dim, **kw), v=torch.zeros(b, h, m, config.v_head_dim, **kw)
            )
            if expanded
            else LatentLayerCache(kv=torch.zeros(b, m, config.kv_lora_rank + config.qk_rope_head_dim, **kw))
            for _ in range(config.num_hidden_layers)
        ]

    def _tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in ((layer.k, layer.v) if self.expanded else (layer.kv,))]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes over all layers: the latent cache's equals
        ``config.kv_cache_bytes_per_token(element_size)``."""
        per_row = self.batch_size * self.max_len
        return sum(t.numel() // per_row * t.element_size() for t in self._tensors())

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the whole cache (B x M tokens)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are reused; stale rows are never read past ``seq_len``)."""
        self.seq_len = 0
