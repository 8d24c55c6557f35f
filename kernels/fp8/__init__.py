"""Public blockwise-FP8 ops: quantize / dequantize (1×128 activations, 128×128 weights) and the FP8 linear.

``fp8_linear`` trains: its backward quantises the gradient GEMMs' inputs too (``training.py``); its forward is
``reference.fp8_linear`` bit for bit whether or not a gradient is recorded.
"""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_ndim
from kernels.fp8 import reference, training
from kernels.fp8.reference import ACT_BLOCK, E4M3_MAX, WEIGHT_BLOCK

__all__ = [
    "ACT_BLOCK",
    "E4M3_MAX",
    "WEIGHT_BLOCK",
    "dequantize_blockwise",
    "fp8_linear",
    "quantize_blockwise",
]


def quantize_blockwise(x: torch.Tensor, block_m: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [M, K], scale fp32 [ceil(M/block_m), ceil(K/block_k)])."""
    check_ndim("x", x, 2, "M, K")
    check_float("x", x)
    if block_m < 1 or block_k < 1:
        raise ValueError(f"quantize_blockwise: block sizes must be ≥ 1, got {block_m}×{block_k}")
    if not torch.isfinite(x).all():
        raise ValueError("quantize_blockwise: x has inf or NaN values; an FP8 scale cannot represent them")
    if kernels.get_mode().backend == "triton":
        return kernels.triton_module("fp8").quantize_blockwise(x, block_m, block_k)
    return reference.quantize_blockwise(x, block_m, block_k)


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, block_m: int, block_k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    check_ndim("q", q, 2, "M, K")
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"dequantize_blockwise: q must be float8_e4m3fn, got {q.dtype}")
    expected = (-(-q.shape[0] // block_m), -(-q.shape[1] // block_k))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize_blockwise: scale must be {expected} for q {tuple(q.shape)}, got {tuple(scale.shape)}"
        )
    if kernels.get_mode().backend == "triton":
        return kernels.triton_module("fp8").dequantize_blockwise(q, scale, block_m, block_k, dtype)
    return reference.dequantize_blockwise(q, scale, block_m, block_k, dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]ᵀ with both operands blockwise-quantised to e4m3, fp32 accumulation."""
    check_float("x", x)
    check_float("weight", weight)
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fp8_linear: x [..., K] and weight [N, K] must share K; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    return training.fp8_linear(x, weight, invariant=kernels.get_mode().batch_invariant)
