"""Rotary position embedding (RoPE) with YaRN context extension, as DeepSeek-V3 uses it.

RoPE encodes position by rotating pairs of dimensions of queries and keys by an angle proportional
to the position: pair j of a vector at position m turns by ``m * theta_j`` with
``theta_j = rope_theta ** (-2j / d)``. The dot product of a rotated query and key then depends only
on their distance. DeepSeek lays the pairs out *interleaved*, ``(x0, x1), (x2, x3), ...``; we keep
that layout. (Hugging Face de-interleaves first; since the same permutation is applied to queries
and keys, the attention scores are identical.)

In MLA only a small slice of each head (``qk_rope_head_dim``) carries position. The rest of the
key is produced from the position-free latent, which is what makes weight absorption possible.

YaRN stretches a model trained at ``original_max_position_embeddings`` to ``factor`` times the
context: low-frequency pairs (that never completed a turn in training) are interpolated by
``1 / factor``, high-frequency pairs are left alone, and a linear ramp between ``beta_fast`` and
``beta_slow`` rotations blends the two. Attention logits are sharpened by ``mscale ** 2`` with
``mscale = 0.1 * mscale_all_dim * ln(factor) + 1`` (applied to the softmax scale in ``mla.py``),
and cos/sin are multiplied by an ``attention_factor`` that is 1 for DeepSeek-V3's settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """1/sqrt(d) for the full query-key width, sharpened by YaRN's mscale**2 when it is on."""
    scale = qk_head_dim**-0.5
    if rope_scaling is not None:
        mscale_all_dim = float(rope_scaling.get("mscale_all_dim", 0) or 0)
        if mscale_all_dim:
            m = yarn_mscale(float(rope_scaling["factor"]), mscale_all_dim)
            scale = scale * m * m
    return scale


def inverse_frequencies(dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """The rotation speed of each of the dim/2 pairs, and the cos/sin attention factor."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
    if rope_scaling is None:
        return inv_freq.float(), 1.0
    factor = float(rope_scaling["factor"])
    original = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))

    def correction_dim(n_rotations: float) -> float:
        # the pair index whose wavelength completes n_rotations turns over the original context
        return (dim * math.log(original / (n_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: high-frequency pair, extrapolated as is; 0: interpolated by 1/factor
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep

    mscale = rope_scaling.get("mscale")
    mscale_all_dim = rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    else:
        attention_factor = float(rope_scaling.get("attention_factor", yarn_mscale(factor)))
    return inv_freq.float(), attention_factor


def rope_tables(
    dim: int,
    max_len: int,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position and pair: two (max_len, dim/2) float32 tables."""
    inv_freq, attention_factor = inverse_frequencies(dim, theta, rope_scaling)
    positions = torch.arange(max_len, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (max_len, dim/2)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, n, dim) by the angles of cos/sin: (T, dim/2) when every row
    has the same positions, (B, T, dim/2) when each row has its own (padded batches)."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()  # (B, T, n, dim/2)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, dim/2) or (B, T, 1, dim/2): broadcast over heads
    out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (..., T, n, dim/2, 2)
    return out.flatten(-2).to(x.dtype)
