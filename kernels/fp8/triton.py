"""Blockwise FP8 (e4m3) quantisation and dequantisation in Triton.

Tiling: one program owns ``ROWS`` consecutive row-tiles of ``block_m`` rows and one column tile of ``block_k``
columns, loaded as a 3-D block ``[ROWS, BLOCK_M, BLOCK_K]`` (padded to powers of two, masked at the matrix edge).
For weights (128×128 tiles) ``ROWS`` is 1: the whole 64 KiB tile is one program. For activations (1×128 tiles)
a program would otherwise do almost nothing, so it takes ``ROWS`` tiles at once and reduces each row separately.
Every tile's ``amax`` is reduced inside one program, so the scale never depends on how the grid is split.

Bitwise parity with torch (the contract, tested): ``scale = amax / 448`` and ``inv = 448 / amax`` use
``tl.math.div_rn`` (a plain ``/`` is an approximate division in compiled Triton); ``q = clamp(x * inv)`` is then
rounded to the e4m3 grid in fp32 with round-to-nearest-even (bit arithmetic for normals, a magic-number add for
subnormals) before the cast, so the final ``.to(float8e4nv)`` is exact. The explicit rounding is needed because
the Triton 3.9 interpreter's fp32→fp8 cast rounds half up and drops the carry into the exponent (124.3 → 64);
compiled code gets the same bits either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty


@triton.jit
def _round_to_e4m3_grid(y):
    """Round fp32 values with |y| <= 448 to the nearest e4m3 value (ties to even), returned as fp32."""
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag_bits = bits & 0x7FFFFFFF
    # Normals: keep 3 mantissa bits of fp32's 23, round half to even on the 20 dropped bits.
    lsb = (mag_bits >> 20) & 1
    normal = ((mag_bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    # Subnormals (|y| < 2^-6) are multiples of 2^-9: adding 1.5 * 2^14 puts them in a binade whose ulp is 2^-9.
    mag = mag_bits.to(tl.float32, bitcast=True)
    sub = (mag + 24576.0) - 24576.0
    rounded = tl.where(mag < 0.015625, sub, normal)
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    block_m: tl.constexpr,
    block_k: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    tile_r = pid_m * ROWS + tl.arange(0, ROWS)
    i = tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_K)
    row = tile_r[:, None, None] * block_m + i[None, :, None]
    col = pid_k * block_k + j[None, None, :]
    mask = (i[None, :, None] < block_m) & (j[None, None, :] < block_k) & (row < M) & (col < K)
    x = tl.load(x_ptr + row * stride_xm + col, mask=mask, other=0.0).to(tl.float32)

    amax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
    amax = tl.maximum(amax, 1e-12)
    scale = tl.math.div_rn(amax, 448.0)
    inv = tl.math.div_rn(448.0, amax)
    y = tl.clamp(x * inv[:, None, None], -448.0, 448.0)
    q = _round_to_e4m3_grid(y).to(tl.float8e4nv)
    tl.store(q_ptr + row * stride_qm + col, q, mask=mask)

    n_tiles_m = tl.cdiv(M, block_m)
    tl.store(s_ptr + tile_r * stride_sm + pid_k, scale, mask=tile_r < n_tiles_m)


@triton.jit
def _dequantize_kernel(
    q_ptr,
    s_ptr,
    x_ptr,
    M,
    K,
    stride_qm,
    stride_sm,
    stride_xm,
    block_m: tl.constexpr,
    block_k: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    tile_r = pid_m * ROWS + tl.arange(0, ROWS)
    i = tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_K)
    row = tile_r[:, None, None] * block_m + i[None, :, None]
    col = pid_k * block_k + j[None, None, :]
    mask = (i[None, :, None] < block_m) & (j[None, None, :] < block_k) & (row < M) & (col < K)
    q = tl.load(q_ptr + row * stride_qm + col, mask=mask, other=0.0).to(tl.float32)
    n_tiles_m = tl.cdiv(M, block_m)
    scale = tl.load(s_ptr + tile_r * stride_sm + pid_k, mask=tile_r < n_tiles_m, other=0.0)
    x = q * scale[:, None, None]
    tl.store(x_ptr + row * stride_xm + col, x.to(x_ptr.dtype.element_ty), mask=mask)


def _rows_per_program(block_m: int, block_k: int) -> int:
    """Tiles per program along M: about 16K elements per program (a 128×128 weight tile alone is that much)."""
    block_elems = triton.next_power_of_2(block_m) * triton.next_power_of_2(block_k)
    return max(1, min(64, 16384 // block_elems))


def quantize_blockwise(x: torch.Tensor, block_m: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q [M, K] float8_e4m3fn, scale [ceil(M/block_m), ceil(K/block_k)] fp32)."""
    assert x.dim() == 2, "quantize_blockwise expects a 2-D tensor"
    x = x.contiguous()
    m, k = x.shape
    n_tm, n_tk = triton.cdiv(m, block_m), triton.cdiv(k, block_k)
    q = _empty((m, k), torch.float8_e4m3fn, x.device)
    scale = _empty((n_tm, n_tk), torch.float32, x.device)
    rows = _rows_per_program(block_m, block_k)
    grid = (triton.cdiv(n_tm, rows), n_tk)
    _quantize_kernel[grid](
        x,
        q,
        scale,
        m,
        k,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        block_m=block_m,
        block_k=block_k,
        ROWS=rows,
        BLOCK_M=triton.next_power_of_2(block_m),
        BLOCK_K=triton.next_power_of_2(block_k),
    )
    return q, scale


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, block_m: int, block_k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q [M, K] float8_e4m3fn, scale [ceil(M/block_m), ceil(K/block_k)] fp32) -> x [M, K] in ``dtype``."""
    assert q.dim() == 2 and scale.dim() == 2, "dequantize_blockwise expects 2-D q and scale"
    q = q.contiguous()
    scale = scale.contiguous()
    m, k = q.shape
    n_tm, n_tk = triton.cdiv(m, block_m), triton.cdiv(k, block_k)
    assert scale.shape == (n_tm, n_tk), f"scale shape {tuple(scale.shape)} != {(n_tm, n_tk)}"
    x = _empty((m, k), dtype, q.device)
    rows = _rows_per_program(block_m, block_k)
    grid = (triton.cdiv(n_tm, rows), n_tk)
    _dequantize_kernel[grid](
        q,
        scale,
        x,
        m,
        k,
        q.stride(0),
        scale.stride(0),
        x.stride(0),
        block_m=block_m,
        block_k=block_k,
        ROWS=rows,
        BLOCK_M=triton.next_power_of_2(block_m),
        BLOCK_K=triton.next_power_of_2(block_k),
    )
    return x
