"""Partial rotary position embedding, rotate-half convention, on the first ``rotary_dim`` dims of each head.

The cos/sin table is computed once per model for every position (fp32), so a position's angles are
the same numbers in every call; applying them is elementwise and therefore batch-invariant.
"""

from __future__ import annotations

import torch


def rope_table(max_positions: int, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_positions, rotary_dim] (fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rotary(
    x_BTHD: torch.Tensor, positions_BT: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    xf = x_BTHD.float()
    x_rot, x_pass = xf[..., :rotary_dim], xf[..., rotary_dim:]
    c = cos[positions_BT][:, :, None, :]
    s = sin[positions_BT][:, :, None, :]
    half = rotary_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * c + rotated * s, x_pass], dim=-1).to(x_BTHD.dtype)
