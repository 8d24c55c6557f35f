"""Batch-invariant GEMMs in Triton: ``linear`` (x @ weightᵀ) and ``grouped_linear`` (the MoE experts).

Legend: M rows, K reduction dim, N output features, E groups (experts); BM × BN output tile, BK K-step.

**Tiling.** A program owns one ``[BM, BN]`` output tile and walks K from 0 to K in steps of ``BK``, adding
each step's ``[BM, BK] @ [BK, BN]`` product into one fp32 accumulator. ``linear``'s grid is ``(cdiv(M, BM),
cdiv(N, BN))``. ``grouped_linear``'s rows come sorted by group; its row tiles start at each group's first row
(a group's last tile is partial, never shared with the next group), and each tile multiplies by its group's
weight. The tile table is built on the device from the group sizes, with a fixed upper bound on the number of
tiles (``cdiv(rows, BM) + min(E, rows)``) so that building it needs no host synchronisation; tiles past the
real ones do no work.

**Why a row's bits do not depend on M, on its place among the rows, or on its group's size.** The tile sizes
are constants of the dtype (never chosen from M), K is never split across programs, and the K loop always runs
the same steps in the same order. Every sum is inside the dot, which reduces each output element in K order
(an FMA chain for fp32, fixed tensor-core instructions for 16-bit) whatever register layout the compiler
picks, the same for every row of the tile; a row's value never mixes with another row's. A short last row tile
or K step is filled with zeros on load, and adding an exact zero product changes nothing, so a single row (a
decode step) rounds as it does inside any larger call.

fp32 operands use IEEE dots (``input_precision="ieee"``): TF32 would round the inputs to 10 mantissa bits and
break fp32 parity with the reference. 16-bit operands (bf16/fp16, both operands alike) go to the tensor cores
as they are, with an fp32 accumulator: a product of two 16-bit floats is exact in fp32, as it would be after
an upcast, and the MMA instruction's own summation order is fixed, so the tiling argument above holds
unchanged; an fp32 FMA GEMM instead would cost the invariant path many times the plain one. There is no
autotuning (the interpreter cannot run it, and a tuned tile shape would be part of the numerics); tile sizes
are chosen from the dtype in Python.

Backward (only the forward must be invariant): plain torch GEMMs, ``dx = dy @ W`` and ``dW = dyᵀ x`` (per
group for ``grouped_linear``); no per-tile weight gradient is ever materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty
from kernels._checks import check_float

# (BM, BN, BK, num_warps): part of the numerics, like the reference's row multiple; never derived from M.
_FP32_TILES = (64, 64, 32, 4)
_HALF_TILES = (64, 128, 64, 4)


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    tile_start_ptr,
    tile_end_ptr,
    tile_group_ptr,
    M,
    N,
    K,
    sx_m,
    sx_k,
    sw_e,
    sw_n,
    sw_k,
    GROUPED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if GROUPED:
        row_start = tl.load(tile_start_ptr + pid_m)
        row_end = tl.load(tile_end_ptr + pid_m)
        w_base = tl.load(tile_group_ptr + pid_m).to(tl.int64) * sw_e
    else:
        row_start = pid_m * BM
        row_end = M
        w_base = 0
    rows = row_start + tl.arange(0, BM)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < N
    kk = tl.arange(0, BK)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * sx_m
    w_rows = w_ptr + w_base + cols[:, None].to(tl.int64) * sw_n
    # a tile past the real ones (grouped only) has no rows: skip its K loop rather than multiply zeros
    k_end = tl.where(row_start < row_end, K, 0)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, k_end, BK):
        k_ok = k0 + kk < K
        a = tl.load(x_rows + (k0 + kk)[None, :] * sx_k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_rows + (k0 + kk)[None, :] * sw_k, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    y_offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tiles(dtype: torch.dtype, tiles: tuple[int, int, int] | None) -> tuple[int, int, int, int, str]:
    bm, bn, bk, warps = _FP32_TILES if dtype == torch.float32 else _HALF_TILES
    if tiles is not None:
        if any(t < 16 or t & (t - 1) for t in tiles):
            raise ValueError(f"batch-invariant GEMM (triton): tiles={tiles} must be powers of two >= 16")
        bm, bn, bk = tiles
    # the dot precision only concerns fp32 operands ("tf32" is Triton's default, and means nothing for bf16)
    return bm, bn, bk, warps, "ieee" if dtype == torch.float32 else "tf32"


def _launch(x2, w, y, grid_m, table, grouped, tiles) -> None:
    M, K = x2.shape
    N = w.shape[-2]
    if y.numel() == 0 or grid_m == 0:
        return
    if K == 0:  # an empty sum: the kernel's loop would not run, but its output must still be written
        y.zero_()
        return
    bm, bn, bk, warps, prec = _tiles(x2.dtype, tiles)
    sw = w.stride()
    _gemm_kernel[(grid_m, triton.cdiv(N, bn))](
        x2, w, y, *table, M, N, K, *x2.stride(), sw[0] if grouped else 0, sw[-2], sw[-1],
        GROUPED=grouped, BM=bm, BN=bn, BK=bk, PREC=prec, num_warps=warps,
    )  # fmt: skip


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, tiles):
        M, N = x2.shape[0], weight.shape[0]
        y = _empty((M, N), x2.dtype, x2.device)
        bm = _tiles(x2.dtype, tiles)[0]
        _launch(x2, weight, y, triton.cdiv(M, bm), (x2, x2, x2), False, tiles)
        ctx.save_for_backward(x2, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = dy.t() @ x2 if ctx.needs_input_grad[1] else None
        return dx, dw, None


def linear(
    x: torch.Tensor, weight: torch.Tensor, *, tiles: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """``x @ weight.T`` for x [..., K], weight [N, K] (same float dtype), each row's bits independent of how
    many rows share the call. Differentiable. ``tiles=(BM, BN, BK)`` overrides the dtype's tile shape (tests
    use small tiles at tiny sizes); callers that must agree bitwise keep the default."""
    *lead, K = x.shape
    return _Linear.apply(x.reshape(-1, K), weight, tiles).reshape(*lead, weight.shape[0])


def _tile_table(
    counts: torch.Tensor, rows: int, bm: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(first row, end row, group) of every row tile, plus how many tiles the grid holds (an upper bound)."""
    ends = counts.cumsum(0)
    starts = ends - counts
    tiles_per_group = (counts + bm - 1) // bm
    tile_ends = tiles_per_group.cumsum(0)
    # Σ_e cdiv(c_e, BM) ≤ cdiv(rows, BM) + (groups with rows), and at most min(E, rows) groups have rows
    bound = triton.cdiv(rows, bm) + min(counts.numel(), rows)
    t = torch.arange(bound, device=counts.device)
    group = torch.searchsorted(tile_ends, t, right=True)
    live = group < counts.numel()
    group = group.clamp_max(counts.numel() - 1)
    first = starts[group] + (t - (tile_ends[group] - tiles_per_group[group])) * bm
    first = torch.where(live, first, 0)
    end = torch.where(live, ends[group], 0)
    return first.to(torch.int32), end.to(torch.int32), group.to(torch.int32), bound


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, weights, tiles):
        rows, N = x.shape[0], weights.shape[1]
        y = _empty((rows, N), x.dtype, x.device)
        bm = _tiles(x.dtype, tiles)[0]
        *table, bound = _tile_table(counts, rows, bm)
        _launch(x, weights, y, bound, table, True, tiles)
        ctx.save_for_backward(x, counts, weights)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, counts, weights = ctx.saved_tensors
        sizes = counts.tolist()
        dx = torch.cat([d @ w for d, w in zip(dy.split(sizes), weights)]) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[2]:
            dw = torch.stack([d.t() @ xe for d, xe in zip(dy.split(sizes), x.split(sizes))])
        return dx, None, dw, None


def grouped_linear(
    x_rows: torch.Tensor,
    rows_per_group: Sequence[int] | torch.Tensor,
    weights: torch.Tensor,
    *,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Rows sorted by group, x_rows [rows, K], rows_per_group [E], weights [E, N, K] -> [rows, N]: each
    group's rows times its own weight, a row's bits independent of how many rows its group (or the call) has.

    Differentiable in x_rows and weights. ``rows_per_group`` may live on the device (the forward then needs no
    host synchronisation; its total is checked only when it is on the CPU or a list); the backward reads it
    on the host.
    """
    check_float("x_rows", x_rows)
    check_float("weights", weights)
    if x_rows.ndim != 2 or weights.ndim != 3 or x_rows.shape[1] != weights.shape[2]:
        raise ValueError(
            f"grouped_linear: x_rows must be [rows, K] and weights [E, N, K] with the same K; "
            f"got x_rows {tuple(x_rows.shape)}, weights {tuple(weights.shape)}"
        )
    if x_rows.dtype != weights.dtype:
        raise ValueError(
            f"grouped_linear: x_rows is {x_rows.dtype} but weights are {weights.dtype}; cast one"
        )
    # a list becomes a CPU tensor here, so it is checked before it moves to x_rows' device
    counts = torch.as_tensor(rows_per_group, dtype=torch.int64)
    if counts.shape != (weights.shape[0],):
        raise ValueError(
            f"grouped_linear: rows_per_group needs one count per weight ({weights.shape[0]}), "
            f"got shape {tuple(counts.shape)}"
        )
    if not counts.is_cuda and (int(counts.sum()) != x_rows.shape[0] or bool((counts < 0).any())):
        raise ValueError(
            f"grouped_linear: rows_per_group must be non-negative and sum to the {x_rows.shape[0]} rows of "
            f"x_rows, got {counts.tolist()}"
        )
    return _GroupedLinear.apply(x_rows, counts.to(x_rows.device), weights, tiles)
