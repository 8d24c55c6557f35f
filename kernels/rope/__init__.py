"""Public partial-RoPE op."""

from __future__ import annotations

import torch

from kernels._checks import check_float, check_ndim
from kernels.rope import reference
from kernels.rope.reference import rope_table

__all__ = ["apply_rotary", "rope_table"]


def apply_rotary(
    x_BTHD: torch.Tensor, positions_BT: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    check_ndim("x", x_BTHD, 4, "B, T, H, D")
    check_float("x", x_BTHD)
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > x_BTHD.shape[-1]:
        raise ValueError(
            f"apply_rotary: rotary_dim={rotary_dim} must be even and ≤ head_dim={x_BTHD.shape[-1]}"
        )
    if tuple(positions_BT.shape) != tuple(x_BTHD.shape[:2]):
        raise ValueError(
            f"apply_rotary: positions must be [B, T]={tuple(x_BTHD.shape[:2])}, got {tuple(positions_BT.shape)}"
        )
    if positions_BT.numel() and int(positions_BT.max()) >= cos.shape[0]:
        raise ValueError(
            f"apply_rotary: position {int(positions_BT.max())} is beyond the table's {cos.shape[0]} positions; "
            "raise max_position_embeddings"
        )
    return reference.apply_rotary(x_BTHD, positions_BT, cos, sin)
