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
from models.rope import apply_rope

# Flash attention refuses MLA's unequal q/k (N+R = 192) and v (V = 128) head dims and the fallback
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
            self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x.

        Args:
            x: (B, S, D) hidden states.
            cos: (S, R/2) RoPE table rows for positions 0..S-1.
            sin: (S, R/2).

        Returns:
            (B, S, D).
        """
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
