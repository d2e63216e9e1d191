"""Rotary position embedding with YaRN context extension, in DeepSeek's interleaved-pair layout.

Shapes: S sequence, H heads, R = qk_rope_head_dim (rotated dims), R/2 frequencies.
"""

from __future__ import annotations

import math

import torch

from models.config import DeepSeekV3Config, yarn_get_mscale


def _yarn_correction_range(config: DeepSeekV3Config, dim: int) -> tuple[int, int]:
    """Dims whose wavelength spans [beta_fast, beta_slow] rotations over the original context (YaRN, sec. 3.2)."""

    def correction_dim(rotations: float) -> float:
        ctx = config.original_max_position_embeddings
        return dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low = math.floor(correction_dim(config.beta_fast))
    high = math.ceil(correction_dim(config.beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(config: DeepSeekV3Config, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (R/2,), interpolated by YaRN between extrapolated and ``rope_factor``-scaled ones."""
    dim = config.qk_rope_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if not config.use_yarn:
        return inv_freq
    low, high = _yarn_correction_range(config, dim)
    high = high + 0.001 if low == high else high  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp = 0 keeps the original frequency (high-frequency dims), ramp = 1 interpolates by the factor.
    return inv_freq / config.rope_factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(config: DeepSeekV3Config) -> float:
    """YaRN's magnitude correction folded into cos/sin (1.0 for DeepSeek-V3, where mscale == mscale_all_dim)."""
    if not config.use_yarn:
        return 1.0
    if config.mscale and config.mscale_all_dim:
        return yarn_get_mscale(config.rope_factor, config.mscale) / yarn_get_mscale(
            config.rope_factor, config.mscale_all_dim
        )
    return yarn_get_mscale(config.rope_factor)


def rope_freqs_cis(config: DeepSeekV3Config, device: torch.device | None = None) -> torch.Tensor:
    """(max_position_embeddings, R/2) complex64 table: factor * exp(i * position * inv_freq)."""
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
    angles = torch.outer(positions, rope_inv_freq(config, device))  # (S, R/2)
    return torch.polar(torch.full_like(angles, rope_attention_factor(config)), angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim, as DeepSeek's released weights expect.

    The result is written de-interleaved ([rotated evens, rotated odds]); queries and keys get the same
    permutation, so their dot products are those of the interleaved rotation.

    Args:
        x: (B, S, H, R) queries or keys.
        cos: (S, R/2) table rows for these positions.
        sin: (S, R/2).

    Returns:
        (B, S, H, R) in x's dtype.
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()  # (B, S, H, R/2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (S, 1, R/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
