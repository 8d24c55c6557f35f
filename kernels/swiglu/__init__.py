"""Public SwiGLU activation op (the GEMMs around it go through ``kernels.fp8.linear``)."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_shape
from kernels.swiglu import reference


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_float("gate", gate)
    check_shape("up", up, tuple(gate.shape), "same as gate")
    return reference.swiglu(gate, up, invariant=kernels.get_mode().batch_invariant)
