"""Batch-invariant primitives: GEMM over fixed row tiles, order-fixed reductions, exp-based gates.

Why these exist (measured on the 2-core AVX-512 CPU this project develops on; see the tests):
- fp32 ``F.linear`` takes different BLAS paths for small M (1–3 rows differ by ~1e-6 from the same rows inside
  a larger batch). A GEMM evaluated as a batched product of fixed 16-row tiles (the last one zero-padded) gives
  every row bitwise the same result wherever it sits in the batch, in fp32 and bf16.
- ``torch.sigmoid``, ``F.silu`` and ``torch.rsqrt`` round differently on the scalar tail of a vectorised loop
  than in its vector body, so a value's result depends on its offset in the tensor. ``exp``, ``log``, ``sqrt``,
  ``sin``, ``cos`` and the IEEE operations ``+ - * /`` do not. Gates are therefore written as ``1 / (1 + exp(-x))``
  and norms as ``x / sqrt(ms + eps)``.
- Reductions whose strategy may depend on the number of rows or on threading are replaced by a pairwise
  halving sum (:func:`tree_sum`) built from elementwise additions. Its result does not depend on the other
  rows, and zero padding to any larger power of two leaves it unchanged. The attention kernels rely on that
  to make a prefill row and a decode row with different key lengths agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TILE_M = 16


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` where each row's result is independent of how many rows come with it. x [..., K], weight [N, K]."""
    *lead, k = x.shape
    n_out = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    pad = (-m) % TILE_M
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, k)])
    tiles = x2.shape[0] // TILE_M
    # A 2-D right operand would let torch fold the tiles back into one GEMM; the expanded view keeps them apart.
    out = torch.bmm(x2.view(tiles, TILE_M, k), weight.t().unsqueeze(0).expand(tiles, k, n_out))
    return out.reshape(-1, n_out)[:m].reshape(*lead, n_out)


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` by pairwise halving (first half + second half), zero-padded to a power of two."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    if size != n:
        x = F.pad(x, (0, size - n))
    while size > 1:
        size //= 2
        x = x[..., :size] + x[..., size:]
    return x[..., 0]


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)
