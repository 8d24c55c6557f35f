"""Blockwise FP8 (e4m3) quantisation and the FP8 linear built on it (the Ling 2.0 training recipe).

Tiles: 1×128 for activations and gradients (per row, along K), 128×128 for weights; one fp32 scale per tile.
For each tile: amax = max|x| (clamped at 1e-12), scale = amax / 448, q = e4m3(clamp(x · 448/amax, ±448)).
Multiplying by the reciprocal (one division per tile) keeps the elementwise step an IEEE product, which
torch and Triton round identically.

``fp8_linear`` is the reference semantics of an FP8 GEMM with fp32 accumulation. Both operands are
dequantised exactly (an e4m3 value times an fp32 scale is representable in fp32), then a batch-invariant
fp32 GEMM runs. Activation tiles are per row, so one token's quantisation never depends on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.batch_invariant import linear as invariant_linear

E4M3_MAX = 448.0
ACT_BLOCK = (1, 128)
WEIGHT_BLOCK = (128, 128)


def _tiles(x: torch.Tensor, block_m: int, block_k: int) -> torch.Tensor:
    M, K = x.shape
    padded = F.pad(x, (0, (-K) % block_k, 0, (-M) % block_m))
    Mp, Kp = padded.shape
    return padded.view(Mp // block_m, block_m, Kp // block_k, block_k)


def quantize_blockwise(x: torch.Tensor, block_m: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    tiles = _tiles(x.float(), block_m, block_k)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    inv = (E4M3_MAX / amax)[:, None, :, None]
    q = (tiles * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(tiles.shape[0] * block_m, tiles.shape[2] * block_k)[:M, :K]
    return q, scale


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, block_m: int, block_k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    M, K = q.shape
    tiles = _tiles(q.float(), block_m, block_k) * scale[:, None, :, None]
    return tiles.view(tiles.shape[0] * block_m, tiles.shape[2] * block_k)[:M, :K].to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, invariant: bool = True) -> torch.Tensor:
    *lead, K = x.shape
    x2 = x.reshape(-1, K)
    xq, xs = quantize_blockwise(x2, *ACT_BLOCK)
    wq, ws = quantize_blockwise(weight, *WEIGHT_BLOCK)
    x_dq = dequantize_blockwise(xq, xs, *ACT_BLOCK)
    w_dq = dequantize_blockwise(wq, ws, *WEIGHT_BLOCK)
    out = invariant_linear(x_dq, w_dq) if invariant else F.linear(x_dq, w_dq)
    return out.to(x.dtype).reshape(*lead, weight.shape[0])
