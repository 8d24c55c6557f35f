"""Model precision, applied the same way for rollout and trainer: fp32, bf16, or fp8 (bf16 + FP8 GEMM inputs).

Only parameters change dtype. Every buffer of the model stays fp32: the RoPE tables, the linear-attention
decays and the routers' selection-only ``expert_bias``. ``Module.to(dtype)`` would round them to bf16,
and then a model converted in memory would compute differently from one loaded at that dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from rlplat.models.fp8 import enable_fp8
from rlplat.models.ring_linear import Linear

PRECISIONS = ("fp32", "bf16", "fp8")


def to_precision(model: nn.Module, precision: str) -> nn.Module:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model = model.to(torch.float32 if precision == "fp32" else torch.bfloat16)
    for name, value in buffers.items():
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module) if module else model, attr, value)
    enable_fp8(model, precision == "fp8")
    return model


def precision_of(model: nn.Module) -> str:
    """fp32, bf16 or fp8, read back from the model."""
    if any(m.fp8 for m in model.modules() if isinstance(m, Linear)):
        return "fp8"
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes == {torch.float32}:
        return "fp32"
    if dtypes == {torch.bfloat16}:
        return "bf16"
    raise ValueError(f"model parameters have mixed dtypes {sorted(map(str, dtypes))}; use to_precision()")
