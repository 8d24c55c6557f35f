"""RMSNorm in Triton, forward and backward.

Legend: N rows (all leading dims flattened), D the normalised dim.

Tiling: a program owns ``BLOCK_N`` whole rows, ``[BLOCK_N, BLOCK_D]`` with ``BLOCK_D = next_pow2(D)``, so the
row's sum of squares is reduced inside one program in one fixed order. That makes a row's output independent of
how many other rows are in the batch (the platform's batch-invariance promise) and needs no second pass. Rows of
up to a few thousand elements fit in registers; ``BLOCK_N`` shrinks as D grows to keep a block near 16K elements.

Backward, with ``n = x * rstd``: ``dx = rstd * (dy*w - n * mean(dy*w*n))`` per row, and ``dw = sum_rows dy*n``.
Each program writes its partial ``dw`` row to a ``[programs, D]`` buffer that torch sums afterwards: no atomics,
so the weight gradient is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, N, D, eps, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rms = tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    rstd = 1.0 / rms
    y = (x / rms[:, None]) * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
    n = x * rstd[:, None]
    dn = dy * w[None, :]
    dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * D + cols, tl.sum(dy * n, axis=0), mask=cols < D)


def _blocks(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, min(64, 16384 // block_d)), block_d


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x2.shape
    block_n, block_d = _blocks(d)
    y = _empty(x2.shape, x2.dtype, x2.device)
    rstd = _empty((n,), torch.float32, x2.device)
    _rms_norm_fwd_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, y, rstd, n, d, eps, BLOCK_N=block_n, BLOCK_D=block_d
    )
    return y, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n, d = x2.shape
        block_n, block_d = _blocks(d)
        grid = triton.cdiv(n, block_n)
        dy2 = dy.reshape(-1, d).contiguous()
        dx = _empty(x2.shape, x2.dtype, x2.device)
        dw_partial = _empty((grid, d), torch.float32, x2.device)
        _rms_norm_bwd_kernel[(grid,)](
            dy2, x2, weight, rstd, dx, dw_partial, n, d, BLOCK_N=block_n, BLOCK_D=block_d
        )
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = (x / sqrt(mean(x², -1) + eps)) * weight, computed in fp32, returned in x.dtype. Differentiable."""
    return _RMSNorm.apply(x, weight, eps)
