"""Public RMSNorm op."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_shape
from kernels.rmsnorm import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_float("x", x)
    check_shape("weight", weight, (x.shape[-1],), "D = x.shape[-1]")
    mode = kernels.get_mode()
    # The Triton kernel normalises one row per program, so it keeps batch invariance.
    if mode.backend == "triton":
        return kernels.triton_module("rmsnorm").rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps, invariant=mode.batch_invariant)
