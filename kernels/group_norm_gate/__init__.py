"""Public group-RMSNorm sigmoid-gate op."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_shape
from kernels.group_norm_gate import reference


def group_rms_norm_gate(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    check_float("o", o)
    check_float("gate", gate)
    check_shape("gate", gate, tuple(o.shape), "same as o")
    check_shape("weight", weight, (o.shape[-1],), "C = o.shape[-1]")
    if num_groups < 1 or o.shape[-1] % num_groups:
        raise ValueError(
            f"group_rms_norm_gate: C={o.shape[-1]} is not divisible by num_groups={num_groups}; "
            "choose a group_norm_size that divides num_attention_heads * head_dim"
        )
    mode = kernels.get_mode()
    if mode.backend == "triton":
        return kernels.triton_module("group_norm_gate").group_rms_norm_gate(o, gate, weight, num_groups, eps)
    return reference.group_rms_norm_gate(o, gate, weight, num_groups, eps, invariant=mode.batch_invariant)
