"""Block-aligned causal softmax attention (GQA) in Triton: the batch-invariant GPU path, forward and backward.

Legend: B batch, Tq queries, Tk keys (a cache may hold more than any query sees), H query heads, G kv heads,
R = H / G query heads per kv head, D head dim, BM query rows per tile, BN keys per block, BD = D padded to a
power of two. A key j is visible to a query at absolute position p iff j ≤ p.

**Forward.** Grid ``(cdiv(Tq, BM), B·H)``: a program owns ``BM`` consecutive query rows of one (b, head) and
runs an online softmax over key blocks ``[j·BN, (j+1)·BN)`` at absolute positions, from block 0 up to the
block holding the tile's largest position, in order. Per block, in fp32 with IEEE dots:

    s   = (q · scale · log2 e) kᵀ,  masked to -inf where key > the row's position
    m'  = max(m, rowmax s);  α = 2^(m - m');  p = 2^(s - m') (0 where masked)
    l   = α l + p 1;         acc = α acc + p v;  m = m'        (1: a [BN, 16] block of ones)

and finally ``o = acc / l`` and the log-sum-exp ``m + log2 l`` (base 2, for the backward).

**Why a row's bits cannot depend on the batch, the padding, the cache capacity, or prefill versus decode.**
Every operation above is per row, and a row's sequence of operations is fixed by its own position alone:
``BM``, ``BN`` and ``BD`` are constants (never chosen from T, B or the cache length), the key loop always
starts at block 0 and never splits, and every sum whose order matters is a dot — over D for a score, over one
block's keys for ``p v`` and for the row sum ``p 1`` — which reduces each element in K order whatever register
layout the compiler picks for a launch (``tl.sum``'s tree would follow the layout); the max is exact in any
order (so the query tile ``BM`` changes no bits either). The only thing a neighbour can change is how many
blocks the tile visits: blocks past a row's own position are entirely masked for it, and such a block is an
exact no-op — its scores are -inf, so m' = m, α is set to exactly 1 (not computed as 2^0), p is exactly 0, and
``1·l + 0 = l``, ``1·acc + 0·v = acc``. Key 0 is visible to every query, so after block 0 the running max is
finite. A decode step is therefore one live row of a tile (the rest are masked), and it reproduces the row a
training forward, a prefill or a chunked prefill computed for the same position. Keys beyond ``Tk`` and padded
D columns are loaded as zeros; query rows beyond ``Tq`` are computed and not stored.

q may be bf16 while the cache is fp32 ([B, G, L, D] memory passed as a [B, L, G, D] view): every input is
upcast to fp32 on load and read through its strides, so a decode step copies nothing.

**Backward** (need not be invariant, only deterministic; O(T) memory): flash-style recomputation of p from
q, k and the saved log-sum-exp, with ``δ = rowsum(o · do)``; ``ds = p (do vᵀ - δ)``.
- ``dq``: grid ``(cdiv(Tq, BM), B·H)``, each tile loops over its visible key blocks in order.
- ``dk, dv``: grid ``(cdiv(Tk, BN), B·G)``, one program per key block of a kv head loops over its R query
  heads and every query tile (tiles whose positions all precede the block are skipped), so the gradient of a
  key block is summed by one program in one order: no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty

# Part of the numerics (a key block is the online softmax's unit): fixed for the whole process, never derived
# from the call's shapes. The query tile changes no bits and only sets the work per program.
QUERY_TILE = 64
KEY_BLOCK = 64
_DOT_PRECISION = "ieee"  # tf32 would round q·k to 10 mantissa bits and break fp32 parity
_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _load_rows(ptr, base, rows, row_ok, stride_row, dd, d_ok, stride_d):
    """An fp32 [rows, BD] tile read through strides; masked entries are 0."""
    offs = base + rows[:, None].to(tl.int64) * stride_row + dd[None, :] * stride_d
    return tl.load(ptr + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    o_ptr,
    lse_ptr,
    sq_b,
    sq_t,
    sq_h,
    sq_d,
    sk_b,
    sk_t,
    sk_g,
    sk_d,
    sv_b,
    sv_t,
    sv_g,
    sv_d,
    sp_b,
    sp_t,
    Tq,
    H,
    R,
    D,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // R
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < Tq
    dd = tl.arange(0, BD)
    d_ok = dd < D
    q = _load_rows(q_ptr, b * sq_b + h * sq_h, rows, row_ok, sq_t, dd, d_ok, sq_d) * qk_scale
    # rows past Tq get position 0: they see key 0 only, stay finite, and are never stored
    pos = tl.load(pos_ptr + b * sp_b + rows * sp_t, mask=row_ok, other=0).to(tl.int32)
    last = tl.max(pos, axis=0)
    k_base = b * sk_b + g * sk_g
    v_base = b * sv_b + g * sv_g
    m = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    ones = tl.full((BN, 16), 1.0, tl.float32)
    for start in range(0, last + 1, BN):
        keys = start + tl.arange(0, BN)
        # keys past the tile's last position are invisible to all its rows: loading them as zeros keeps
        # whatever the cache holds there (stale or unwritten capacity) out of the products
        key_ok = keys <= last
        k = _load_rows(k_ptr, k_base, keys, key_ok, sk_t, dd, d_ok, sk_d)
        v = _load_rows(v_ptr, v_base, keys, key_ok, sv_t, dd, d_ok, sv_d)
        visible = keys[None, :] <= pos[:, None]
        s = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PREC), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # exactly 1 when the block leaves the max unchanged (always so for a block the row cannot see), rather
        # than trusting the hardware's 2^0: this is what makes a masked block a no-op
        alpha = tl.where(m_new > m, tl.exp2(m - m_new), 1.0)
        p = tl.where(visible, tl.exp2(s - m_new[:, None]), 0.0)
        # The row sum as a dot with ones, not tl.sum: a dot reduces each element in K order whatever the
        # layout, while tl.sum's tree follows the register layout, which the compiler may choose differently
        # for differently specialised launches (a decode step's strides versus a prefill's). All 16 columns
        # are the same sum, so their max is exact.
        l_i = l_i * alpha + tl.max(tl.dot(p, ones, input_precision=PREC), axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m = m_new
    o = acc / l_i[:, None]
    o_offs = b * Tq * H * D + rows[:, None].to(tl.int64) * H * D + h * D + dd[None, :]
    tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rows, m + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    sq_b,
    sq_t,
    sq_h,
    sq_d,
    sk_b,
    sk_t,
    sk_g,
    sk_d,
    sv_b,
    sv_t,
    sv_g,
    sv_d,
    sp_b,
    sp_t,
    Tq,
    H,
    R,
    D,
    scale,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // R
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < Tq
    dd = tl.arange(0, BD)
    d_ok = dd < D
    q = _load_rows(q_ptr, b * sq_b + h * sq_h, rows, row_ok, sq_t, dd, d_ok, sq_d) * qk_scale
    # do, dq: contiguous [B, Tq, H, D]; lse, delta: [B, H, Tq]
    dense_base = b * Tq * H * D + h * D
    do = _load_rows(do_ptr, dense_base, rows, row_ok, H * D, dd, d_ok, 1)
    pos = tl.load(pos_ptr + b * sp_b + rows * sp_t, mask=row_ok, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    last = tl.max(pos, axis=0)
    k_base = b * sk_b + g * sk_g
    v_base = b * sv_b + g * sv_g
    dq = tl.zeros((BM, BD), tl.float32)
    for start in range(0, last + 1, BN):
        keys = start + tl.arange(0, BN)
        key_ok = keys <= last
        k = _load_rows(k_ptr, k_base, keys, key_ok, sk_t, dd, d_ok, sk_d)
        v = _load_rows(v_ptr, v_base, keys, key_ok, sv_t, dd, d_ok, sv_d)
        visible = keys[None, :] <= pos[:, None]
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PREC)
    tl.store(dq_ptr + dense_base + rows[:, None].to(tl.int64) * H * D + dd[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    sq_b,
    sq_t,
    sq_h,
    sq_d,
    sk_b,
    sk_t,
    sk_g,
    sk_d,
    sv_b,
    sv_t,
    sv_g,
    sv_d,
    sp_b,
    sp_t,
    Tq,
    Tk,
    H,
    G,
    R,
    D,
    scale,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = bg % G
    start = tl.program_id(0) * BN
    keys = start + tl.arange(0, BN)
    key_ok = keys < Tk
    dd = tl.arange(0, BD)
    d_ok = dd < D
    k = _load_rows(k_ptr, b * sk_b + g * sk_g, keys, key_ok, sk_t, dd, d_ok, sk_d)
    v = _load_rows(v_ptr, b * sv_b + g * sv_g, keys, key_ok, sv_t, dd, d_ok, sv_d)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    for r in range(0, R):
        h = g * R + r
        bh = b * H + h
        dense_base = b * Tq * H * D + h * D
        for q_start in range(0, Tq, BM):
            rows = q_start + tl.arange(0, BM)
            row_ok = rows < Tq
            # rows past Tq get position -1: they see no key
            pos = tl.load(pos_ptr + b * sp_b + rows * sp_t, mask=row_ok, other=-1).to(tl.int32)
            if tl.max(pos, axis=0) >= start:
                q = _load_rows(q_ptr, b * sq_b + h * sq_h, rows, row_ok, sq_t, dd, d_ok, sq_d)
                do = _load_rows(do_ptr, dense_base, rows, row_ok, H * D, dd, d_ok, 1)
                lse = tl.load(lse_ptr + bh * Tq + rows, mask=row_ok, other=0.0)
                delta = tl.load(delta_ptr + bh * Tq + rows, mask=row_ok, other=0.0)
                visible = (keys[None, :] <= pos[:, None]) & key_ok[None, :]
                s = tl.dot(q * qk_scale, tl.trans(k), input_precision=PREC)
                p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    # dk, dv: contiguous [B, Tk, G, D]
    offs = b * Tk * G * D + keys[:, None].to(tl.int64) * G * D + g * D + dd[None, :]
    mask = key_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _head_dim_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _launch_options(bd: int) -> dict[str, int]:
    # fp32 FMA dots keep [BM, BD] and [BN, BD] tiles in registers: at D = 128 eight warps avoid spilling. fp32
    # blocks take twice bf16's shared memory, so the key loop is double- rather than triple-buffered. Neither
    # changes a bit of the result.
    return {"num_warps": 8 if bd >= 128 else 4, "num_stages": 2}


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, scale: float, query_tile: int, key_block: int):
        B, Tq, H, D = q.shape
        G = k.shape[2]
        o = _empty((B, Tq, H, D), q.dtype, q.device)
        lse = _empty((B, H, Tq), torch.float32, q.device)
        bd = _head_dim_block(D)
        if o.numel():
            _fwd_kernel[(triton.cdiv(Tq, query_tile), B * H)](
                q, k, v, q_pos, o, lse, *q.stride(), *k.stride(), *v.stride(), *q_pos.stride(),
                Tq, H, H // G, D, float(scale) * _LOG2E,
                BM=query_tile, BN=key_block, BD=bd, PREC=_DOT_PRECISION, **_launch_options(bd),
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, q_pos, o, lse)
        ctx.scale, ctx.query_tile, ctx.key_block = float(scale), query_tile, key_block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, q_pos, o, lse = ctx.saved_tensors
        B, Tq, H, D = q.shape
        Tk, G = k.shape[1], k.shape[2]
        bm, bn, bd = ctx.query_tile, ctx.key_block, _head_dim_block(D)
        do = do.contiguous()
        # δ_i = Σ_d o_i do_i: the softmax Jacobian's row term, O(T) memory
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
        dq = dk = dv = None
        strides = (*q.stride(), *k.stride(), *v.stride(), *q_pos.stride())
        if ctx.needs_input_grad[0]:
            dq = _empty(q.shape, q.dtype, q.device)
        if dq is not None and dq.numel():
            _bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](
                q, k, v, q_pos, do, lse, delta, dq, *strides, Tq, H, H // G, D, ctx.scale, ctx.scale * _LOG2E,
                BM=bm, BN=bn, BD=bd, PREC=_DOT_PRECISION, **_launch_options(bd),
            )  # fmt: skip
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk = _empty(k.shape, k.dtype, k.device)
            dv = _empty(v.shape, v.dtype, v.device)
        if dk is not None and dk.numel():
            _bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * G)](
                q, k, v, q_pos, do, lse, delta, dk, dv, *strides, Tq, Tk, H, G, H // G, D, ctx.scale,
                ctx.scale * _LOG2E, BM=bm, BN=bn, BD=bd, PREC=_DOT_PRECISION, **_launch_options(bd),
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def block_attention(
    q_BTHD: torch.Tensor,
    k_BTGD: torch.Tensor,
    v_BTGD: torch.Tensor,
    q_pos_BT: torch.Tensor,
    scale: float,
    *,
    query_tile: int = QUERY_TILE,
    key_block: int = KEY_BLOCK,
) -> torch.Tensor:
    """Causal GQA attention: q [B, Tq, H, D], k/v [B, Tk, G, D] (any strides), q_pos [B, Tq] -> o, q's dtype.

    Differentiable in q, k and v. ``query_tile`` and ``key_block`` (powers of two ≥ 16) exist for tests at
    tiny shapes; ``key_block`` is part of the numerics, so every caller that must agree bitwise keeps the
    default.
    Shapes are validated by ``kernels.softmax_attention.softmax_attention``.
    """
    for name, size in (("query_tile", query_tile), ("key_block", key_block)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"softmax attention (triton): {name}={size} must be a power of two >= 16")
    return _BlockAttention.apply(q_BTHD, k_BTGD, v_BTGD, q_pos_BT, scale, query_tile, key_block)
