"""Output gate of Ring-linear's linear attention: group RMSNorm (fp32) times sigmoid(gate).

o and gate are [..., C]; C splits into ``num_groups`` contiguous groups, each normalised by its own RMS:
y = o / sqrt(mean_group(o²) + eps) · w · sigmoid(gate).
"""

from __future__ import annotations

import torch

from kernels.batch_invariant.reference import sigmoid as exp_sigmoid
from kernels.batch_invariant.reference import tree_sum


def group_rms_norm_gate(
    o: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    num_groups: int,
    eps: float,
    invariant: bool = True,
) -> torch.Tensor:
    C = o.shape[-1]
    of = o.float().unflatten(-1, (num_groups, C // num_groups))
    if invariant:
        mean_sq = tree_sum(of * of, dim=-1) / (C // num_groups)
        gate_f = exp_sigmoid(gate.float())
    else:
        mean_sq = of.pow(2).mean(-1)
        gate_f = torch.sigmoid(gate.float())
    normed = (of / torch.sqrt(mean_sq + eps)[..., None]).flatten(-2)
    return (normed * weight.float() * gate_f).to(o.dtype)
