"""RMSNorm in fp32: y = (x / sqrt(mean(x²) + eps)) · w, returned in x's dtype."""

from __future__ import annotations

import torch

from kernels.batch_invariant.reference import tree_sum


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, invariant: bool = True) -> torch.Tensor:
    xf = x.float()
    mean_sq = tree_sum(xf * xf, dim=-1) / x.shape[-1] if invariant else xf.pow(2).mean(-1)
    # x / sqrt(.) rather than x * rsqrt(.): rsqrt's vector and scalar paths round differently (see batch_invariant)
    return (xf / torch.sqrt(mean_sq + eps)[..., None] * weight.float()).to(x.dtype)
