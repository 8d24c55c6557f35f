"""Group RMSNorm times a sigmoid gate (the linear-attention output norm ``g_norm`` · ``sigmoid(g_proj(x))``).

Legend: N rows (leading dims flattened), C channels, G groups, Cg = C / G channels per group.

Tiling: the grid is ``(row blocks, G)``; a program owns ``[BLOCK_N, Cg]`` (padded to a power of two), i.e. whole
groups, so each group's mean square is reduced inside one program in one fixed order and a row's result does not
depend on the batch. The gate and weight slices of that group ride along, so the op is one read of ``o`` and
``gate`` and one write of ``y``.

Backward, with ``n = o * rstd`` and ``s = sigmoid(gate)``, ``y = n * w * s``:
``dgate = dy * n * w * s * (1 - s)``, ``do = rstd * (dn - n * mean_group(dn * n))`` with ``dn = dy * w * s``, and
``dw = sum_rows dy * n * s``. Partial ``dw`` goes to a ``[row blocks, C]`` buffer summed by torch (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty


@triton.jit
def _fwd_kernel(
    o_ptr, g_ptr, w_ptr, y_ptr, rstd_ptr, N, C, CG, G, eps, BLOCK_N: tl.constexpr, BLOCK_CG: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    cols = grp * CG + tl.arange(0, BLOCK_CG)
    col_mask = tl.arange(0, BLOCK_CG) < CG
    mask = (rows[:, None] < N) & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rms = tl.sqrt(tl.sum(o * o, axis=1) / CG + eps)
    y = (o / rms[:, None]) * w[None, :] * tl.sigmoid(gate)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * G + grp, 1.0 / rms, mask=rows < N)


@triton.jit
def _bwd_kernel(
    dy_ptr,
    o_ptr,
    g_ptr,
    w_ptr,
    rstd_ptr,
    do_ptr,
    dg_ptr,
    dw_partial_ptr,
    N,
    C,
    CG,
    G,
    BLOCK_N: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    cols = grp * CG + tl.arange(0, BLOCK_CG)
    col_mask = tl.arange(0, BLOCK_CG) < CG
    mask = (rows[:, None] < N) & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows * G + grp, mask=rows < N, other=0.0)
    s = tl.sigmoid(gate)
    n = o * rstd[:, None]
    dn = dy * w[None, :] * s
    do = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / CG)[:, None])
    dgate = dy * n * w[None, :] * s * (1.0 - s)
    tl.store(do_ptr + offs, do.to(do_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, dgate.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * C + cols, tl.sum(dy * n * s, axis=0), mask=col_mask)


def _blocks(cg: int) -> tuple[int, int]:
    block_cg = triton.next_power_of_2(cg)
    return max(1, min(64, 16384 // block_cg)), block_cg


class _GroupRMSNormGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, gate, weight, num_groups: int, eps: float):
        c = o.shape[-1]
        cg = c // num_groups
        o2 = o.reshape(-1, c).contiguous()
        g2 = gate.reshape(-1, c).contiguous()
        weight = weight.contiguous()
        n = o2.shape[0]
        block_n, block_cg = _blocks(cg)
        y = _empty(o2.shape, o2.dtype, o2.device)
        rstd = _empty((n, num_groups), torch.float32, o.device)
        _fwd_kernel[(triton.cdiv(n, block_n), num_groups)](
            o2, g2, weight, y, rstd, n, c, cg, num_groups, eps, BLOCK_N=block_n, BLOCK_CG=block_cg
        )
        ctx.save_for_backward(o2, g2, weight, rstd)
        ctx.shapes = (o.shape, gate.shape, gate.dtype, num_groups)
        return y.view(o.shape)

    @staticmethod
    def backward(ctx, dy):
        o2, g2, weight, rstd = ctx.saved_tensors
        o_shape, gate_shape, gate_dtype, num_groups = ctx.shapes
        n, c = o2.shape
        cg = c // num_groups
        block_n, block_cg = _blocks(cg)
        n_blocks = triton.cdiv(n, block_n)
        dy2 = dy.reshape(-1, c).contiguous()
        do = _empty(o2.shape, o2.dtype, o2.device)
        dgate = _empty(g2.shape, gate_dtype, g2.device)
        dw_partial = _empty((n_blocks, c), torch.float32, o2.device)
        _bwd_kernel[(n_blocks, num_groups)](
            dy2,
            o2,
            g2,
            weight,
            rstd,
            do,
            dgate,
            dw_partial,
            n,
            c,
            cg,
            num_groups,
            BLOCK_N=block_n,
            BLOCK_CG=block_cg,
        )
        dw = dw_partial.sum(0).to(weight.dtype)
        return do.view(o_shape), dgate.view(gate_shape), dw, None, None


def group_rms_norm_gate(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    """y = group_rmsnorm(o) * weight * sigmoid(gate) in fp32 over ``num_groups`` groups, returned in o.dtype."""
    return _GroupRMSNormGate.apply(o, gate, weight, num_groups, eps)
