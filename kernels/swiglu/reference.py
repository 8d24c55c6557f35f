"""SwiGLU feed-forward: down(silu(gate(x)) · up(x)); the expert, shared-expert and dense MLP all use it."""

from __future__ import annotations

import torch

from kernels.batch_invariant.reference import silu as exp_silu


def swiglu(gate: torch.Tensor, up: torch.Tensor, invariant: bool = True) -> torch.Tensor:
    if invariant:
        return exp_silu(gate) * up
    return torch.nn.functional.silu(gate) * up
