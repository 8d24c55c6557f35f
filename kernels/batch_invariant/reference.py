"""Batch-invariant primitives: GEMMs whose rows do not depend on their batch, order-fixed reductions, exp-based gates.

Why these exist (measured with torch 2.13's MKL on the Intel Xeon and AMD EPYC machines this project runs on):
- A CPU GEMM gives each output row the same bits however many rows share the call *except* on MKL's small-M
  paths. With torch 2.13's MKL on the AMD EPYC (AVX-512), fp32 rows differ from the same rows inside a larger
  call for M in {1, 2, 3} on one thread and {1, 2, 3, 5, 6, 7, 9, 10, 11} on two; batched (``bmm``) fp32 for
  M in {1, 2, 3}; bf16 batched once (M = 1, K = 2048, one thread); every other M up to 64 agreed, for every
  row position, transposed operands and batched calls. :func:`rows_matmul` therefore pads a GEMM of fewer than
  ``MIN_ROWS`` rows with zero rows, so a decode step's single row goes through the same path as a prefill's
  many. That costs nothing at training sizes (one library GEMM, autograd's two library GEMMs in backward: no
  per-tile weight gradient is ever materialised) and 16 rows' work for a decode GEMV (measured 4.6× a GEMV for
  one fp32 row of the QKV projection; 1.0× once a rollout decodes ≥ 16 sequences together).
  ``tests/kernels/test_invariant_gemm.py`` re-checks the property on the machine it runs on and names the M
  if a library rounds differently at or beyond ``MIN_ROWS``.
- ``torch.sigmoid``, ``F.silu`` and ``torch.rsqrt`` round differently on the scalar tail of a vectorised loop
  than in its vector body, so a value's result depends on its offset in the tensor. ``exp``, ``log``, ``sqrt``,
  ``sin``, ``cos`` and the IEEE operations ``+ - * /`` do not. Gates are therefore written as ``1 / (1 + exp(-x))``
  and norms as ``x / sqrt(ms + eps)``.
- Reductions whose strategy may depend on the number of rows or on threading are replaced by a pairwise
  halving sum (:func:`tree_sum`) built from elementwise additions. Its result does not depend on the other
  rows, and zero padding to any larger power of two leaves it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 16


def rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched like ``torch.matmul``) where each row of ``a`` gets the same bits whatever ``a``'s
    number of rows M: calls with M < 16 are padded with zero rows to 16 (see the module docstring)."""
    M = a.shape[-2]
    if M >= MIN_ROWS:
        return a @ b
    padded = F.pad(a, (0, 0, 0, MIN_ROWS - M))
    return (padded @ b)[..., :M, :]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x [..., K], weight [N, K], each row's result independent of how many rows come with it."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = F.linear(x2, weight) if m >= MIN_ROWS else F.linear(F.pad(x2, (0, 0, 0, MIN_ROWS - m)), weight)[:m]
    return out.reshape(*lead, weight.shape[0])


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


class _TreeSum(torch.autograd.Function):
    """Pairwise-halving sum over the last dim; its backward broadcasts the gradient (d sum / d x_i = 1) in one op
    instead of unwinding every halving level's slices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        ctx.n = n
        size = 1 << max(n - 1, 0).bit_length()
        if size != n:
            x = F.pad(x, (0, size - n))
        while size > 1:
            size //= 2
            x = x[..., :size] + x[..., size:]
        return x[..., 0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.unsqueeze(-1).expand(*grad.shape, ctx.n)


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` by pairwise halving (first half + second half), zero-padded to a power of two."""
    return _TreeSum.apply(x.movedim(dim, -1))


class _Sigmoid(torch.autograd.Function):
    """``1 / (1 + exp(-x))`` forward (see the module docstring); the usual s·(1 − s) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = 1.0 / (1.0 + torch.exp(-x))
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return grad * s * (1.0 - s)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return _Sigmoid.apply(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)
