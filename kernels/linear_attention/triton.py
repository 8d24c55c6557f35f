"""Linear attention with per-head scalar decay (Lightning attention) in Triton, forward and backward, in two
forms: the plain chunked form (``chunk_linear_attention``, plain kernel mode) and the chunk-aligned form
(``aligned_linear_attention``, batch-invariant mode).

Legend: B batch, T time, H heads, D head dim (keys and values alike), C chunk size, N chunks, S the [D_k, D_v]
fp32 state.

Recurrence per (b, h): ``S_t = λ S_{t-1} + k_tᵀ v_t``, ``o_t = scale · q_t S_t`` with ``λ = exp(log_decay[h])``.

**Plain chunked form.** For a chunk starting at t0 with L valid positions, i, j ∈ [0, L) and
``M[i, j] = λ^(i-j)`` for i ≥ j, else 0:

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

**Chunk-aligned form.** The contract and its maths are in ``reference.py``: chunks of C tokens at absolute
positions, S_n the state after the first n·C tokens, o_t = scale · ((q_t λ^(i+1)) S_n + Σ_{j≤i} λ^(i-j)
(q_t·k_j) v_j) for the token at offset i of chunk n. Training, prefill, prefill continued mid-chunk and decode all
run the same two kernels in *span* coordinates: row b's span starts at the chunk boundary at or before its first
new token (``fill_b = start_b mod C`` positions earlier), so span chunks are absolute chunks; span positions
below ``fill_b`` read the decode state's chunk buffers, later ones the new tokens (``_span_rows``).

- ``_aligned_states_kernel``, grid (B·H, D/BK, D/BV): walks the row's chunks in order with a [BK, BV] block of S
  in registers. Each fold is ``S ← λ^C S + (K_n λ^(C-1-j))ᵀ V_n``, one [BK, C] x [C, BV] product over the whole
  chunk (absent keys are zeros). It stores every chunk-start state (training and prefill: O(N·H·D²), the only
  state the backward keeps) and the returned ``ChunkState``. A decode step runs it with no fold, or with one
  exactly when the chunk's last token arrives: the same product over the same chunk contents as in a prefill.
- ``_aligned_output_kernel``, grid (query tiles, B·H, D/BV): a tile is BM = 16 consecutive positions at a fixed
  offset inside one chunk. Scores are a [BM, D] x [D, C] product against all C keys of the chunk, masked by
  λ^(i-j) or an exact zero (a key after the query, present or not, contributes exactly nothing); then
  ``o = scale · ((q λ^(i+1)) S_n + scores V)``. A decode step is the tile holding its position with one live row.

Why this is bitwise invariant: a token at chunk offset i is always row i mod BM of tile i div BM, against the same
C keys, the same S_n and the same decay values, in products of the same shapes; an fp32 IEEE ``tl.dot`` (FMA over
K in order on a GPU, numpy's matmul under the interpreter) forms each element from its own row and column only.
S_n is the same bits whichever path built it, by induction from S_0: every fold is the same product. Both kernels
take every run-time argument unspecialised (``do_not_specialize``) and their flags as run-time values, so
training, prefill and decode run one compiled binary per dtype and D: no specialisation on a value (T = 1, a
pointer's alignment) can compile their arithmetic differently. Nothing depends on B or on the other rows.

The backward (training only; deterministic, not invariant) recomputes instead of storing per-token state:
``_aligned_bwd_dstate_kernel`` scans the chunks in reverse for dU_c = ∂loss/∂S_{c+1}, then
``_aligned_bwd_dqkv_kernel``, grid (N, B·H, D/BV), rebuilds each chunk's score matrices from q, k, v and the saved
S_c and forms dq, dk, dv for all chunks in parallel. Memory: O(T·H·D + N·H·D²), never O(T·H·D²).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty
from kernels.linear_attention.reference import ChunkState, empty_state

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


_ROW_TILE = 16  # query rows per output program: the smallest tl.dot tile, so a decode step wastes least


@triton.jit
def _span_rows(new_ptr, buf_ptr, b, h, p, fill, limit, T, H, has_buf, cols, C: tl.constexpr, D: tl.constexpr):
    """fp32 rows at span positions ``p`` of row b: the chunk buffer below ``fill``, new token ``p - fill`` above
    it while that index is below ``limit``, zero elsewhere. Span position 0 is the chunk boundary at or before
    the row's first new token, so span chunks are the absolute chunks."""
    t = p - fill
    col_ok = cols[None, :] < D
    new_ok = (t >= 0) & (t < limit)
    new_offs = ((b.to(tl.int64) * T + t) * H + h) * D
    x = tl.load(new_ptr + new_offs[:, None] + cols[None, :], mask=new_ok[:, None] & col_ok, other=0.0)
    buf_ok = p < fill * has_buf
    buf_offs = ((b.to(tl.int64) * H + h) * C + p) * D
    xb = tl.load(buf_ptr + buf_offs[:, None] + cols[None, :], mask=buf_ok[:, None] & col_ok, other=0.0)
    return tl.where(buf_ok[:, None], xb.to(tl.float32), x.to(tl.float32))


# Every non-constexpr argument is left unspecialised: a decode step (T = 1, one state slot) and a prefill then
# run the very same binary, so no specialisation can change how their arithmetic is compiled.
@triton.jit(
    do_not_specialize=[
        "k_ptr",
        "v_ptr",
        "ld_ptr",
        "fill_ptr",
        "len_ptr",
        "s0_ptr",
        "kbuf_ptr",
        "vbuf_ptr",
        "states_ptr",
        "s_out_ptr",
        "kbuf_out_ptr",
        "vbuf_out_ptr",
        "T",
        "H",
        "NS",
        "has_state",
        "store_states",
        "want_final",
    ]
)
def _aligned_states_kernel(
    k_ptr,
    v_ptr,
    ld_ptr,
    fill_ptr,
    len_ptr,
    s0_ptr,
    kbuf_ptr,
    vbuf_ptr,
    states_ptr,
    s_out_ptr,
    kbuf_out_ptr,
    vbuf_out_ptr,
    T,
    H,
    NS,
    has_state,
    store_states,
    want_final,
    C: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Chunk-start states of row b, head h, block [BK rows, BV columns] of S:
    S_{n+1} = λ^C S_n + (K_n λ^(C-1-j))ᵀ V_n.

    Writes S_n to ``states`` (slot n) when ``store_states``, and when ``want_final`` the state after the row's
    real tokens: S at the chunk holding its next token, and that chunk's real keys/values (the decode buffers).
    """
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    s_mask = (rk[:, None] < D) & (rv[None, :] < D)
    s_offs = rk[:, None] * D + rv[None, :]
    bh64 = bh.to(tl.int64)
    fill = tl.load(fill_ptr + b)
    length = tl.load(len_ptr + b)
    ld = tl.load(ld_ptr + h).to(tl.float32)
    # Run-time flags enter masks as limits (rows < D or < 0) rather than as scalar booleans: one binary for all.
    S = tl.load(s0_ptr + bh64 * D * D + s_offs, mask=s_mask & (rk[:, None] < D * has_state), other=0.0)
    S = S.to(tl.float32)
    jj = tl.arange(0, C)
    k_decay = tl.exp((C - 1 - jj).to(tl.float32) * ld)
    chunk_decay = tl.exp(ld * C)
    n_chunks = (fill + T + C - 1) // C
    full = (fill + length) // C
    # Outputs need the states of all the row's chunks; the returned state may need the last chunk folded too.
    n_folds = tl.maximum(n_chunks - 1, full * want_final)
    for n in range(0, n_folds):
        tl.store(
            states_ptr + (bh64 * NS + n) * D * D + s_offs, S, mask=s_mask & (rk[:, None] < D * store_states)
        )
        final_rows = tl.where(n == full, D * want_final, 0)
        tl.store(s_out_ptr + bh64 * D * D + s_offs, S, mask=s_mask & (rk[:, None] < final_rows))
        p = n * C + jj
        kc = _span_rows(k_ptr, kbuf_ptr, b, h, p, fill, T, T, H, has_state, rk, C, D)
        vc = _span_rows(v_ptr, vbuf_ptr, b, h, p, fill, T, T, H, has_state, rv, C, D)
        # the fold: one [BK, C] x [C, BV] product over the whole chunk, whichever path reaches it
        S = chunk_decay * S + tl.dot(tl.trans(kc * k_decay[:, None]), vc, input_precision=PREC)
    last_rows = tl.where(n_folds < NS, D * store_states, 0)
    tl.store(states_ptr + (bh64 * NS + n_folds) * D * D + s_offs, S, mask=s_mask & (rk[:, None] < last_rows))
    final_rows = tl.where(n_folds == full, D * want_final, 0)
    tl.store(s_out_ptr + bh64 * D * D + s_offs, S, mask=s_mask & (rk[:, None] < final_rows))
    # The returned chunk buffers: the real keys/values of chunk `full` (buffered ones only when full == 0).
    p = full * C + jj
    buf_offs = (bh64 * C + jj[:, None]) * D
    kc = _span_rows(k_ptr, kbuf_ptr, b, h, p, fill, length, T, H, has_state, rk, C, D)
    k_mask = rk[None, :] < tl.where(tl.program_id(2) == 0, D * want_final, 0)
    tl.store(kbuf_out_ptr + buf_offs + rk[None, :], kc.to(kbuf_out_ptr.dtype.element_ty), mask=k_mask)
    vc = _span_rows(v_ptr, vbuf_ptr, b, h, p, fill, length, T, H, has_state, rv, C, D)
    v_mask = rv[None, :] < tl.where(tl.program_id(1) == 0, D * want_final, 0)
    tl.store(vbuf_out_ptr + buf_offs + rv[None, :], vc.to(vbuf_out_ptr.dtype.element_ty), mask=v_mask)


@triton.jit(
    do_not_specialize=[
        "q_ptr",
        "k_ptr",
        "v_ptr",
        "ld_ptr",
        "fill_ptr",
        "kbuf_ptr",
        "vbuf_ptr",
        "states_ptr",
        "o_ptr",
        "T",
        "H",
        "NS",
        "has_state",
    ]
)
def _aligned_output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ld_ptr,
    fill_ptr,
    kbuf_ptr,
    vbuf_ptr,
    states_ptr,
    o_ptr,
    T,
    H,
    NS,
    has_state,
    scale,
    C: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Output columns [BV] of one BM-row query tile of row b, head h. Tiles sit at absolute positions inside the
    chunk, so a token at chunk offset i is always row i % BM of tile i // BM, whatever path brought it; its
    scores are always a [BM, C] product against the whole chunk, its state term a [BM, D] x [D, BV] product."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    fill = tl.load(fill_ptr + b)
    p0 = (fill // BM + tl.program_id(0)) * BM
    n = p0 // C
    p = p0 + tl.arange(0, BM)
    t = p - fill
    live = (t >= 0) & (t < T)
    # a tile past the row's tokens (the grid covers the widest row) computes nothing and reads no state slot
    tile_ok = p0 < fill + T
    i = p - n * C
    rd = tl.arange(0, BD)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    ld = tl.load(ld_ptr + h).to(tl.float32)
    q_offs = ((b.to(tl.int64) * T + t) * H + h) * D
    q = tl.load(q_ptr + q_offs[:, None] + rd[None, :], mask=live[:, None] & (rd[None, :] < D), other=0.0)
    q = q.to(tl.float32)
    jj = tl.arange(0, C)
    kc = _span_rows(k_ptr, kbuf_ptr, b, h, n * C + jj, fill, T, T, H, has_state, rd, C, D)
    vc = _span_rows(v_ptr, vbuf_ptr, b, h, n * C + jj, fill, T, T, H, has_state, rv, C, D)
    s_offs = (bh.to(tl.int64) * NS + n) * D * D + rd[:, None] * D + rv[None, :]
    s_mask = (rd[:, None] < tl.where(tile_ok, D, 0)) & (rv[None, :] < D)
    S = tl.load(states_ptr + s_offs, mask=s_mask, other=0.0)
    diff = i[:, None] - jj[None, :]
    causal = diff >= 0
    # masked exponents are clamped before exp, so a masked score is an exact zero, never inf · 0
    M = tl.where(causal, tl.exp(tl.where(causal, diff, 0).to(tl.float32) * ld), 0.0)
    q_decay = tl.exp((i + 1).to(tl.float32) * ld)
    scores = tl.dot(q, tl.trans(kc), input_precision=PREC) * M
    inter = tl.dot(q * q_decay[:, None], S, input_precision=PREC)
    o = (inter + tl.dot(scores, vc, input_precision=PREC)) * scale
    o_offs = q_offs[:, None] + rv[None, :]
    tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=live[:, None] & (rv[None, :] < D))


@triton.jit
def _aligned_bwd_dstate_kernel(
    q_ptr,
    do_ptr,
    ld_ptr,
    du_ptr,
    T,
    H,
    N,
    scale,
    C: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse scan over chunks: dU_c = ∂loss/∂S_{c+1} (what chunk c's update receives; zero for the last one),
    dU_{c-1} = λ^C dU_c + scale · (Q_c λ^(i+1))ᵀ dO_c. One program per (b, h) and [BK, BV] block of S."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    s_mask = (rk[:, None] < D) & (rv[None, :] < D)
    s_offs = rk[:, None] * D + rv[None, :]
    bh64 = bh.to(tl.int64)
    ld = tl.load(ld_ptr + h).to(tl.float32)
    jj = tl.arange(0, C)
    q_decay = tl.exp((jj + 1).to(tl.float32) * ld)
    chunk_decay = tl.exp(ld * C)
    G = tl.zeros((BK, BV), tl.float32)
    for r in range(0, N):
        c = N - 1 - r
        tl.store(du_ptr + (bh64 * N + c) * D * D + s_offs, G, mask=s_mask)
        t = c * C + jj
        offs = ((b.to(tl.int64) * T + t) * H + h) * D
        row_ok = (t < T)[:, None]
        q = tl.load(q_ptr + offs[:, None] + rk[None, :], mask=row_ok & (rk[None, :] < D), other=0.0)
        do = tl.load(do_ptr + offs[:, None] + rv[None, :], mask=row_ok & (rv[None, :] < D), other=0.0)
        qd = q.to(tl.float32) * q_decay[:, None]
        G = chunk_decay * G + scale * tl.dot(tl.trans(qd), do.to(tl.float32), input_precision=PREC)


@triton.jit
def _aligned_bwd_dqkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    ld_ptr,
    states_ptr,
    du_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    T,
    H,
    N,
    scale,
    C: tl.constexpr,
    D: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Gradients of chunk c's rows, columns [BV] of dq, dk, dv; the D-wide reductions run over BV-wide blocks.

    With P = (dO Vᵀ) ∘ M, A = (Q Kᵀ) ∘ M, S_c the chunk-start state and dU_c from the reverse scan:
        dq = scale · (P K + λ^(i+1) · dO S_cᵀ)
        dk = scale · Pᵀ Q + λ^(C-1-j) · V dU_cᵀ
        dv = scale · Aᵀ dO + λ^(C-1-j) · K dU_c
    """
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    ld = tl.load(ld_ptr + h).to(tl.float32)
    jj = tl.arange(0, C)
    t = c * C + jj
    offs = ((b.to(tl.int64) * T + t) * H + h) * D
    row_ok = (t < T)[:, None]
    ro = tl.program_id(2) * BV + tl.arange(0, BV)
    s_base = (bh64 * N + c) * D * D
    P = tl.zeros((C, C), tl.float32)
    A = tl.zeros((C, C), tl.float32)
    dq_state = tl.zeros((C, BV), tl.float32)
    dk_state = tl.zeros((C, BV), tl.float32)
    dv_state = tl.zeros((C, BV), tl.float32)
    for d0 in tl.static_range(0, D, BV):
        rd = d0 + tl.arange(0, BV)
        mask = row_ok & (rd[None, :] < D)
        q = tl.load(q_ptr + offs[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        P += tl.dot(do, tl.trans(v), input_precision=PREC)
        A += tl.dot(q, tl.trans(k), input_precision=PREC)
        blk_mask = (ro[:, None] < D) & (rd[None, :] < D)
        rows_o = ro[:, None] * D + rd[None, :]  # S[ro, rd]
        cols_o = rd[None, :] * D + ro[:, None]  # S[rd, ro], read transposed
        S_rows = tl.load(states_ptr + s_base + rows_o, mask=blk_mask, other=0.0)
        U_rows = tl.load(du_ptr + s_base + rows_o, mask=blk_mask, other=0.0)
        U_cols = tl.load(du_ptr + s_base + cols_o, mask=blk_mask, other=0.0)
        dq_state += tl.dot(do, tl.trans(S_rows), input_precision=PREC)
        dk_state += tl.dot(v, tl.trans(U_rows), input_precision=PREC)
        dv_state += tl.dot(k, tl.trans(U_cols), input_precision=PREC)
    diff = jj[:, None] - jj[None, :]
    causal = diff >= 0
    M = tl.where(causal, tl.exp(tl.where(causal, diff, 0).to(tl.float32) * ld), 0.0)
    P = P * M
    A = A * M
    q_decay = tl.exp((jj + 1).to(tl.float32) * ld)
    k_decay = tl.exp((C - 1 - jj).to(tl.float32) * ld)
    out_mask = row_ok & (ro[None, :] < D)
    out_offs = offs[:, None] + ro[None, :]
    q = tl.load(q_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    dq = scale * (tl.dot(P, k, input_precision=PREC) + q_decay[:, None] * dq_state)
    dk = scale * tl.dot(tl.trans(P), q, input_precision=PREC) + k_decay[:, None] * dk_state
    dv = scale * tl.dot(tl.trans(A), do, input_precision=PREC) + k_decay[:, None] * dv_state
    tl.store(dq_ptr + out_offs, dq.to(dq_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"linear attention (triton): chunk_size={chunk_size} must be a power of two >= 16; use 64"
        )


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
    _check_chunk_size(chunk_size)
    return _ChunkLinearAttention.apply(q, k, v, log_decay, scale, initial_state, chunk_size)


def _warps(bd: int) -> int:
    """Programs that hold D-wide tiles get more warps at D >= 128, to keep them out of local memory."""
    return 8 if bd >= 128 else 4


def _aligned_forward(q, k, v, log_decay, scale: float, C: int, state, fill_B, lengths_B, rollout: bool):
    """The chunk states, then the outputs (see the module docstring); q, k, v contiguous.

    Returns (o, the chunk-start states [B, H, N, D, D] for the backward or None, the new ChunkState or None).
    A rollout call with T = 1 (decode) reads S_c straight from ``state`` as the one state slot."""
    B, T, H, D = q.shape
    device = q.device
    bd, bv = _pad_dim(D), _split_dim(D)
    nb = triton.cdiv(D, bv)
    log_decay = log_decay.contiguous().float()
    if rollout:
        s0, kbuf, vbuf = (x.contiguous() for x in state)
        s_out = _empty((B, H, D, D), torch.float32, device)
        kbuf_out = _empty(kbuf.shape, kbuf.dtype, device)
        vbuf_out = _empty(vbuf.shape, vbuf.dtype, device)
    decode = rollout and T == 1
    if decode:
        states, n_slots = s0, 1
    else:
        # a row's span starts at the chunk boundary at or before its first token: at most C - 1 positions early
        n_slots = triton.cdiv(T + (C - 1 if rollout else 0), C)
        states = _empty((B, H, n_slots, D, D), torch.float32, device)
    if not rollout:
        # unused (masked) arguments get stand-ins of the same dtypes, so that training and rollout calls run
        # the same compiled kernels
        s0, kbuf, vbuf, s_out, kbuf_out, vbuf_out = states, k, v, states, k, v
    _aligned_states_kernel[(B * H, nb, nb)](
        k,
        v,
        log_decay,
        fill_B,
        lengths_B,
        s0,
        kbuf,
        vbuf,
        states,
        s_out,
        kbuf_out,
        vbuf_out,
        T,
        H,
        n_slots,
        int(rollout),
        int(not decode),
        int(rollout),
        C=C,
        D=D,
        BK=bv,
        BV=bv,
        PREC=_DOT_PRECISION,
    )
    o = _empty(q.shape, q.dtype, device)
    if T:
        tiles = triton.cdiv(T + (_ROW_TILE - 1 if rollout else 0), _ROW_TILE)
        _aligned_output_kernel[(tiles, B * H, nb)](
            q,
            k,
            v,
            log_decay,
            fill_B,
            kbuf,
            vbuf,
            states,
            o,
            T,
            H,
            n_slots,
            int(rollout),
            float(scale),
            C=C,
            D=D,
            BM=_ROW_TILE,
            BD=bd,
            BV=bv,
            PREC=_DOT_PRECISION,
            num_warps=_warps(bd),
        )
    new_state = ChunkState(s_out, kbuf_out, vbuf_out) if rollout else None
    return o, (None if rollout else states), new_state


class _AlignedLinearAttention(torch.autograd.Function):
    """Training forward from position 0; the backward recomputes the chunk terms from q, k, v and the saved
    chunk-start states (O(T·H·D + N·H·D²) memory)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale: float, C: int):
        B, T = q.shape[:2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        fill = torch.zeros(B, dtype=torch.int32, device=q.device)
        lengths = torch.full((B,), T, dtype=torch.int32, device=q.device)
        o, states, _ = _aligned_forward(q, k, v, log_decay, scale, C, None, fill, lengths, rollout=False)
        ctx.save_for_backward(q, k, v, log_decay, states)
        ctx.scale, ctx.C = float(scale), C
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, states = ctx.saved_tensors
        B, T, H, D = q.shape
        C, N = ctx.C, states.shape[2]
        do = do.contiguous()
        log_decay = log_decay.contiguous().float()
        bv = _split_dim(D)
        nb = triton.cdiv(D, bv)
        dq = _empty(q.shape, q.dtype, q.device)
        dk = _empty(k.shape, k.dtype, k.device)
        dv = _empty(v.shape, v.dtype, v.device)
        if N:
            du = _empty((B, H, N, D, D), torch.float32, q.device)
            _aligned_bwd_dstate_kernel[(B * H, nb, nb)](
                q, do, log_decay, du, T, H, N, ctx.scale, C=C, D=D, BK=bv, BV=bv, PREC=_DOT_PRECISION
            )
            _aligned_bwd_dqkv_kernel[(N, B * H, nb)](
                q,
                k,
                v,
                do,
                log_decay,
                states,
                du,
                dq,
                dk,
                dv,
                T,
                H,
                N,
                ctx.scale,
                C=C,
                D=D,
                BV=bv,
                PREC=_DOT_PRECISION,
                # two [C, C] score matrices and five [C, BV] accumulators and tiles live at once
                num_warps=8,
            )
        return dq, dk, dv, None, None, None


def aligned_linear_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    chunk_size: int,
    state: ChunkState | None = None,
    start_B: torch.Tensor | None = None,
    lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ChunkState | None]:
    """The chunk-aligned form; same contract as ``reference.aligned_linear_attention``.

    Without ``state``, ``start_B`` and ``lengths_B`` this is a training forward from position 0 (differentiable
    in q, k, v; returns no state). Otherwise row b's T new tokens continue at absolute position ``start_B[b]``
    (default 0) from ``state`` (default empty), ``lengths_B[b]`` of them real (right padding), and the state
    after them is returned as a :class:`ChunkState`. Outputs of padding tokens are computed but meaningless.
    """
    _check_chunk_size(chunk_size)
    if state is None and start_B is None and lengths_B is None:
        return _AlignedLinearAttention.apply(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, chunk_size), None
    B, T, H, D = q_BTHD.shape
    device = q_BTHD.device
    if state is None:
        state = empty_state(B, H, D, chunk_size, k_BTHD.dtype, device)
    if start_B is None:
        fill = torch.zeros(B, dtype=torch.int32, device=device)
    else:
        fill = (start_B.long() % chunk_size).to(torch.int32)
    if lengths_B is None:
        lengths = torch.full((B,), T, dtype=torch.int32, device=device)
    else:
        lengths = lengths_B.to(torch.int32)
    q, k, v = q_BTHD.contiguous(), k_BTHD.contiguous(), v_BTHD.contiguous()
    o, _, new_state = _aligned_forward(q, k, v, log_decay_H, scale, chunk_size, state, fill, lengths, True)
    return o, new_state
