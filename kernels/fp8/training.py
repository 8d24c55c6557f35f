"""FP8 linear that trains: blockwise e4m3 GEMM inputs in the forward AND the backward (DeepSeek-V3 recipe).

Legend: M tokens, K input features, N output features. y [M, N] = x [M, K] · W [N, K]ᵀ. Every GEMM quantises
both operands blockwise along its contraction dimension, with fp32 scales and fp32 accumulation:

    forward  y  = x  · Wᵀ    x  in 1×128 tiles along K,  W in 128×128 blocks
    dgrad    dx = dy · W     dy in 1×128 tiles along N,  W in 128×128 blocks (the forward's quantised W)
    wgrad    dW = dyᵀ · x    dyᵀ and xᵀ in 1×128 tiles along M (the token dimension)

The forward IS ``reference.fp8_linear``, the rollout's inference forward, so its output is bitwise the one
an engine computes. The saved tensors are the unquantised x and W (the wgrad needs x quantised along tokens,
which the forward's row tiles cannot give without a requantisation error on top of the first one).

Deviation from DeepSeek-V3: there the backward GEMMs run on FP8 tensor cores; here the quantised operands
are dequantised exactly to fp32 and multiplied in fp32, which is numerically the same as an FP8 GEMM with
fp32 accumulation (see ``reference.py``) and runs anywhere. Backward GEMMs use plain (not batch-invariant)
matmuls: gradients are summed over the batch anyway, and only the forward must match the rollout.
Non-finite gradients are not rejected here (a scale would turn them into NaN); the trainer checks the
gradient norm and refuses the step.
"""

from __future__ import annotations

import torch

import kernels
import kernels.fp8.reference as reference
from kernels.fp8.reference import ACT_BLOCK, WEIGHT_BLOCK


def _quantize_dequantize(x: torch.Tensor, block_m: int, block_k: int) -> torch.Tensor:
    """x as its blockwise-e4m3 values, in fp32 (no finiteness check: see the module docstring)."""
    if kernels.get_mode().backend == "triton" and x.is_cuda:
        impl = kernels.triton_module("fp8")
        q, s = impl.quantize_blockwise(x, block_m, block_k)
        return impl.dequantize_blockwise(q, s, block_m, block_k, torch.float32)
    q, s = reference.quantize_blockwise(x, block_m, block_k)
    return reference.dequantize_blockwise(q, s, block_m, block_k, torch.float32)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, invariant: bool):
        ctx.save_for_backward(x, weight)
        return reference.fp8_linear(x, weight, invariant=invariant)

    @staticmethod
    def backward(ctx, g_out):
        x, weight = ctx.saved_tensors
        K, N = x.shape[-1], weight.shape[0]
        x_MK = x.reshape(-1, K)
        g_MN = g_out.reshape(-1, N)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_dq_MN = _quantize_dequantize(g_MN, *ACT_BLOCK)
            w_dq_NK = _quantize_dequantize(weight, *WEIGHT_BLOCK)
            grad_x = (g_dq_MN @ w_dq_NK).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            g_dq_NM = _quantize_dequantize(g_MN.t().contiguous(), *ACT_BLOCK)
            x_dq_KM = _quantize_dequantize(x_MK.t().contiguous(), *ACT_BLOCK)
            grad_w = (g_dq_NM @ x_dq_KM.t()).to(weight.dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, invariant: bool = True) -> torch.Tensor:
    """``reference.fp8_linear`` with the FP8 backward above (plain forward when no gradient is needed)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return FP8LinearFunction.apply(x, weight, invariant)
    return reference.fp8_linear(x, weight, invariant=invariant)
