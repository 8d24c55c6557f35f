"""Chunked linear attention with per-head scalar decay (Lightning attention) in Triton, forward and backward.

Legend: B batch, T time, H heads, D head dim (keys and values alike), C chunk size, S the [D_k, D_v] fp32 state.

Recurrence per (b, h): ``S_t = λ S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` with ``λ = exp(log_decay[h])``.
For a chunk starting at t0 with L valid positions, i, j ∈ [0, L) and ``M[i, j] = λ^(i-j)`` for i ≥ j, else 0:

    o     = scale · ((q kᵀ ∘ M) v + λ^(i+1) · q S_prev)              intra-chunk + inter-chunk
    S_new = λ^L · S_prev + (k · λ^(L-1-j))ᵀ v

Backward, with dH = ∂loss/∂S at the chunk's last position coming from later chunks (dS_final for the last one):

    dq     = scale · ((dO vᵀ ∘ M) k + λ^(i+1) · dO S_prevᵀ)            forward sweep, recomputes S
    dk     = scale · (dO vᵀ ∘ M)ᵀ q + λ^(L-1-i) · v dHᵀ               reverse sweep
    dv     = scale · (q kᵀ ∘ M)ᵀ dO + λ^(L-1-i) · k dH
    dH_new = λ^L · dH + scale · (q · λ^(i+1))ᵀ dO                       (after chunk 0 it is d initial_state)

Tiling: one program per (b, h) walks the chunks in order, keeping S in registers (the sequential dependency lives
inside one program; no state tensor per chunk is written, the backward recomputes it). The forward splits the
value dim into ``BV`` columns and the dq sweep the key dim into ``BK`` rows as a second grid axis, since S's
columns (rows) evolve independently there; the dk/dv sweep needs all of dH and keeps the full D. Everything is
computed in fp32 with IEEE dots (``input_precision="ieee"``: tf32 would break fp32 parity); inputs of any float
dtype are upcast on load. Exponents of masked decays are clamped to 0 before ``exp`` so that padding rows of a
partial last chunk can never produce ``inf · 0``. There is no autotuning (the interpreter cannot run it); block
sizes are chosen from D in Python.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty

_DOT_PRECISION = "ieee"


@triton.jit
def _decay_matrix(ii, ld):
    """M[i, j] = exp(ld · (i - j)) for i >= j else 0, with the exponent clamped where masked."""
    diff = ii[:, None] - ii[None, :]
    causal = diff >= 0
    return tl.where(causal, tl.exp(tl.where(causal, diff, 0).to(tl.float32) * ld), 0.0)


@triton.jit
def _load_chunk(ptr, base, t, t_mask, cols, D, HD):
    mask = t_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + base + t[:, None] * HD + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ld_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    T,
    H,
    D,
    scale,
    HAS_H0: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    HD = H * D
    base = b * T * HD + h * D
    ld = tl.load(ld_ptr + h).to(tl.float32)
    ii = tl.arange(0, BT)
    dk = tl.arange(0, BK)
    dv = tl.program_id(1) * BV + tl.arange(0, BV)
    s_offs = bh * D * D + dk[:, None] * D + dv[None, :]
    s_mask = (dk[:, None] < D) & (dv[None, :] < D)
    if HAS_H0:
        S = tl.load(h0_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), tl.float32)
    M = _decay_matrix(ii, ld)
    q_decay = tl.exp((ii + 1).to(tl.float32) * ld)
    for c in range(tl.cdiv(T, BT)):
        t = c * BT + ii
        t_mask = t < T
        L = tl.minimum(T - c * BT, BT)
        q = _load_chunk(q_ptr, base, t, t_mask, dk, D, HD)
        k = _load_chunk(k_ptr, base, t, t_mask, dk, D, HD)
        v = _load_chunk(v_ptr, base, t, t_mask, dv, D, HD)
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * M
        o = tl.dot(a, v, input_precision=PREC) + q_decay[:, None] * tl.dot(q, S, input_precision=PREC)
        o = o * scale
        o_mask = t_mask[:, None] & (dv[None, :] < D)
        tl.store(o_ptr + base + t[:, None] * HD + dv[None, :], o.to(o_ptr.dtype.element_ty), mask=o_mask)
        k_decay = tl.where(ii < L, tl.exp(tl.where(ii < L, L - 1 - ii, 0).to(tl.float32) * ld), 0.0)
        S = tl.exp(L.to(tl.float32) * ld) * S + tl.dot(
            tl.trans(k * k_decay[:, None]), v, input_precision=PREC
        )
    tl.store(ht_ptr + s_offs, S, mask=s_mask)


@triton.jit
def _bwd_dq_kernel(
    k_ptr,
    v_ptr,
    do_ptr,
    ld_ptr,
    h0_ptr,
    dq_ptr,
    T,
    H,
    D,
    scale,
    HAS_H0: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    HD = H * D
    base = b * T * HD + h * D
    ld = tl.load(ld_ptr + h).to(tl.float32)
    ii = tl.arange(0, BT)
    dk = tl.program_id(1) * BK + tl.arange(0, BK)
    dv = tl.arange(0, BV)
    s_offs = bh * D * D + dk[:, None] * D + dv[None, :]
    s_mask = (dk[:, None] < D) & (dv[None, :] < D)
    if HAS_H0:
        S = tl.load(h0_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), tl.float32)
    M = _decay_matrix(ii, ld)
    q_decay = tl.exp((ii + 1).to(tl.float32) * ld)
    for c in range(tl.cdiv(T, BT)):
        t = c * BT + ii
        t_mask = t < T
        L = tl.minimum(T - c * BT, BT)
        k = _load_chunk(k_ptr, base, t, t_mask, dk, D, HD)
        v = _load_chunk(v_ptr, base, t, t_mask, dv, D, HD)
        do = _load_chunk(do_ptr, base, t, t_mask, dv, D, HD)
        p = tl.dot(do, tl.trans(v), input_precision=PREC) * M
        dq = tl.dot(p, k, input_precision=PREC) + q_decay[:, None] * tl.dot(
            do, tl.trans(S), input_precision=PREC
        )
        dq = dq * scale
        dq_mask = t_mask[:, None] & (dk[None, :] < D)
        tl.store(dq_ptr + base + t[:, None] * HD + dk[None, :], dq.to(dq_ptr.dtype.element_ty), mask=dq_mask)
        k_decay = tl.where(ii < L, tl.exp(tl.where(ii < L, L - 1 - ii, 0).to(tl.float32) * ld), 0.0)
        S = tl.exp(L.to(tl.float32) * ld) * S + tl.dot(
            tl.trans(k * k_decay[:, None]), v, input_precision=PREC
        )


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    ld_ptr,
    dht_ptr,
    dk_ptr,
    dv_ptr,
    dh0_ptr,
    T,
    H,
    D,
    scale,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    HD = H * D
    base = b * T * HD + h * D
    ld = tl.load(ld_ptr + h).to(tl.float32)
    ii = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    s_offs = bh * D * D + dd[:, None] * D + dd[None, :]
    s_mask = (dd[:, None] < D) & (dd[None, :] < D)
    if HAS_DHT:
        dH = tl.load(dht_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        dH = tl.zeros((BD, BD), tl.float32)
    M = _decay_matrix(ii, ld)
    q_decay = tl.exp((ii + 1).to(tl.float32) * ld)
    n_chunks = tl.cdiv(T, BT)
    for r in range(n_chunks):
        c = n_chunks - 1 - r
        t = c * BT + ii
        t_mask = t < T
        L = tl.minimum(T - c * BT, BT)
        q = _load_chunk(q_ptr, base, t, t_mask, dd, D, HD)
        k = _load_chunk(k_ptr, base, t, t_mask, dd, D, HD)
        v = _load_chunk(v_ptr, base, t, t_mask, dd, D, HD)
        do = _load_chunk(do_ptr, base, t, t_mask, dd, D, HD)
        k_decay = tl.where(ii < L, tl.exp(tl.where(ii < L, L - 1 - ii, 0).to(tl.float32) * ld), 0.0)
        # Row j, column i of both products: j is the later (query) position, i the earlier (key) one.
        p = tl.dot(do, tl.trans(v), input_precision=PREC) * M
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * M
        dk = scale * tl.dot(tl.trans(p), q, input_precision=PREC) + k_decay[:, None] * tl.dot(
            v, tl.trans(dH), input_precision=PREC
        )
        dv = scale * tl.dot(tl.trans(a), do, input_precision=PREC) + k_decay[:, None] * tl.dot(
            k, dH, input_precision=PREC
        )
        out_offs = base + t[:, None] * HD + dd[None, :]
        out_mask = t_mask[:, None] & (dd[None, :] < D)
        tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)
        dH = tl.exp(L.to(tl.float32) * ld) * dH + scale * tl.dot(
            tl.trans(q * q_decay[:, None]), do, input_precision=PREC
        )
    if STORE_DH0:
        tl.store(dh0_ptr + s_offs, dH, mask=s_mask)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _split_dim(d: int) -> int:
    """Width of the D-split in the forward and dq sweeps: 64 keeps S's register tile at 64×D on a GPU."""
    return min(_pad_dim(d), 64)


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale: float, initial_state, chunk_size: int):
        B, T, H, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        log_decay = log_decay.contiguous().float()
        h0 = initial_state.contiguous().float() if initial_state is not None else None
        o = _empty(q.shape, q.dtype, q.device)
        final_state = _empty((B, H, D, D), torch.float32, q.device)
        bd, bv = _pad_dim(D), _split_dim(D)
        _fwd_kernel[(B * H, triton.cdiv(D, bv))](
            q,
            k,
            v,
            log_decay,
            h0 if h0 is not None else final_state,
            o,
            final_state,
            T,
            H,
            D,
            float(scale),
            HAS_H0=h0 is not None,
            BT=chunk_size,
            BK=bd,
            BV=bv,
            PREC=_DOT_PRECISION,
        )
        ctx.save_for_backward(q, k, v, log_decay, h0)
        ctx.scale = float(scale)
        ctx.chunk_size = chunk_size
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log_decay, h0 = ctx.saved_tensors
        B, T, H, D = q.shape
        do = do.contiguous()
        bd, bk = _pad_dim(D), _split_dim(D)
        dq = _empty(q.shape, q.dtype, q.device)
        dk = _empty(k.shape, k.dtype, k.device)
        dv = _empty(v.shape, v.dtype, v.device)
        store_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dh0 = _empty((B, H, D, D), torch.float32, q.device) if store_dh0 else None
        _bwd_dq_kernel[(B * H, triton.cdiv(D, bk))](
            k,
            v,
            do,
            log_decay,
            h0 if h0 is not None else do,
            dq,
            T,
            H,
            D,
            ctx.scale,
            HAS_H0=h0 is not None,
            BT=ctx.chunk_size,
            BK=bk,
            BV=bd,
            PREC=_DOT_PRECISION,
        )
        if dht is not None:
            dht = dht.contiguous().float()
        _bwd_dkdv_kernel[(B * H,)](
            q,
            k,
            v,
            do,
            log_decay,
            dht if dht is not None else do,
            dk,
            dv,
            dh0 if dh0 is not None else dk,
            T,
            H,
            D,
            ctx.scale,
            HAS_DHT=dht is not None,
            STORE_DH0=store_dh0,
            BT=ctx.chunk_size,
            BD=bd,
            PREC=_DOT_PRECISION,
            # This sweep holds a full D×D gradient state; at D = 128 more warps keep it out of local memory.
            num_warps=8 if bd >= 128 else 4,
        )
        return dq, dk, dv, None, None, dh0, None


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, T, H, D], log_decay [H] -> (o [B, T, H, D] in q.dtype, final_state [B, H, D, D] fp32).

    Differentiable in q, k, v and ``initial_state``; ``log_decay`` is a fixed buffer and gets no gradient.
    ``chunk_size`` must be a power of two >= 16 (``tl.dot`` needs 16-wide tiles).
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"linear attention (triton): chunk_size={chunk_size} must be a power of two >= 16; use 64"
        )
    return _ChunkLinearAttention.apply(q, k, v, log_decay, scale, initial_state, chunk_size)
