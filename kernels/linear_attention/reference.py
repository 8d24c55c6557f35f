"""Lightning-style linear attention with a per-head scalar decay (Ring-linear): reference forms, the CPU path.

Legend: B batch, T new tokens, H heads, D head dim (keys and values share it), C chunk size, N chunks,
λ = exp(log_decay[h]). The recurrence being computed, per (b, h):

    S_t = λ · S_{t-1} + k_tᵀ v_t        (S is [D_k, D_v], fp32)
    o_t = scale · q_t S_t

**Chunk-aligned form (batch-invariant mode).** Chunks of C tokens sit at absolute positions (chunk c holds
positions c·C … c·C + C - 1). S_c is the state after the first c·C tokens. Token t at offset i = t - c·C gets

    o_t     = scale · ((q_t · λ^(i+1)) S_c + Σ_{j ≤ i} λ^(i-j) (q_t · k_j) v_j)
    S_{c+1} = λ^C · S_c + (K_c · λ^(C-1-j))ᵀ V_c

and every term is evaluated by the same operations whichever way the token arrives: a training forward or a
prefill computes all chunks at once (three GEMMs per chunk and a scan of N state updates), a decode step
evaluates its own row of the same formula against (S_c, the chunk's keys and values so far), and folds the chunk
into S when it fills. Masked terms are exact zeros, so a partial chunk rounds like a full one.

Why that is bitwise: each GEMM row's result depends only on that row and the other operand. The CPU GEMM
(MKL) gives every row the same bits whatever the number of rows M, provided M is a multiple of 4 (its small-M
paths round differently; see ``kernels.batch_invariant``): :func:`kernels.batch_invariant.reference.rows_matmul`
pads the rows to a multiple of 4, so a decode row (M = 1) goes through the same path as the C rows of a chunk.
The state fold is one fixed-shape GEMM ([D, C] @ [C, D]) wherever it happens.

The decode state is ``ChunkState``: S at the current chunk's start, and the keys/values of the chunk so far
(zero beyond its fill, ``start % C``). Decode costs O(D² + C·D) per token and the state O(H·D² + C·H·D),
whatever the context.

Training runs through :class:`AlignedLinearAttention`, whose backward recomputes the chunk terms from q, k, v
and the N chunk states, so memory grows as O(T·H·D + N·H·D²) like the plain path's, never O(T·H·D²). Only
the forward must be invariant; the backward is deterministic for a given batch.

**Plain form.** ``chunk_linear_attention`` chunks from the first new token (not from absolute positions) and
``recurrent_step`` updates S token by token; both round differently from each other, which is why plain-mode
rollout and training do not agree bitwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.batch_invariant.reference import pad_rows, rows_matmul


class ChunkState(NamedTuple):
    """Decode state of one layer: S at the current chunk's start (fp32) and the chunk's keys and values so far
    (model dtype, zero beyond the fill ``start % C``)."""

    state_BHDD: torch.Tensor
    keys_BHCD: torch.Tensor
    values_BHCD: torch.Tensor


class _Decays(NamedTuple):
    q_HC: torch.Tensor  # λ^(i+1): a query's view of the chunk-start state
    k_HC: torch.Tensor  # λ^(C-1-j): a key's weight in the chunk's state update
    chunk_H11: torch.Tensor  # λ^C
    mask_HCC: torch.Tensor  # λ^(i-j) for j ≤ i, else exactly 0


_DECAYS: dict[tuple, tuple[torch.Tensor, _Decays]] = {}


def _decays(log_decay_H: torch.Tensor, C: int) -> _Decays:
    """The decay tables of a layer, computed once: a decode step would otherwise spend more time building them
    than computing its token. Keyed by the tensor's storage, confirmed by its values (storage is reused)."""
    key = (log_decay_H.data_ptr(), C, str(log_decay_H.device))
    hit = _DECAYS.get(key)
    if hit is not None and hit[0].shape == log_decay_H.shape and torch.equal(hit[0], log_decay_H):
        return hit[1]
    if len(_DECAYS) >= 256:
        _DECAYS.clear()
    tables = _decay_tables(log_decay_H, C)
    _DECAYS[key] = (log_decay_H.detach().clone(), tables)
    return tables


def _decay_tables(log_decay_H: torch.Tensor, C: int) -> _Decays:
    g = log_decay_H.float()
    i = torch.arange(C, device=g.device, dtype=torch.float32)
    diff = i[:, None] - i[None, :]
    # the exponent is clamped where masked so that no inf appears before it is replaced by the exact zero
    mask = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)
    return _Decays(
        torch.exp(g[:, None] * (i + 1)),
        torch.exp(g[:, None] * (C - 1 - i)),
        torch.exp(g * C).view(-1, 1, 1),
        mask,
    )


def _to_chunks(x_BTHD: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, D] (any float dtype) -> fp32 [B, H, N, C, D], zero-padded to whole chunks."""
    B, T, H, D = x_BTHD.shape
    N = -(-T // C)
    x = x_BTHD.float().transpose(1, 2)
    if N * C != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, N * C - T))
    return x.reshape(B, H, N, C, D).contiguous()


def _from_chunks(x_BHNCD: torch.Tensor, T: int) -> torch.Tensor:
    B, H, N, C, D = x_BHNCD.shape
    return x_BHNCD.reshape(B, H, N * C, D)[:, :, :T].transpose(1, 2)


def _chunk_states(k, v, dec: _Decays, S0_BHDD: torch.Tensor) -> torch.Tensor:
    """States entering each chunk and the one after the last: [B, H, N + 1, D, D]."""
    U = rows_matmul((k * dec.k_HC[:, None, :, None]).transpose(-1, -2), v)  # [B, H, N, D, D]
    states = [S0_BHDD]
    for c in range(k.shape[2]):
        states.append(dec.chunk_H11 * states[-1] + U[:, :, c])
    return torch.stack(states, dim=2)


def _chunk_outputs(q, k, v, states_BHNDD, dec: _Decays, scale: float) -> torch.Tensor:
    """o = scale · (inter + intra) for every chunk; the expression a decode step repeats for its own row."""
    inter = rows_matmul(q * dec.q_HC[:, None, :, None], states_BHNDD)
    scores = rows_matmul(q, k.transpose(-1, -2)) * dec.mask_HCC[:, None]
    return (inter + rows_matmul(scores, v)) * scale


class AlignedLinearAttention(torch.autograd.Function):
    """Training forward from position 0 (no decode state) with a recomputing backward."""

    @staticmethod
    def forward(ctx, q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, C):
        B, T, H, D = q_BTHD.shape
        dec = _decays(log_decay_H, C)
        q, k, v = (_to_chunks(x, C) for x in (q_BTHD, k_BTHD, v_BTHD))
        states = _chunk_states(k, v, dec, q.new_zeros(B, H, D, D))[:, :, :-1]
        o = _chunk_outputs(q, k, v, states, dec, scale)
        ctx.save_for_backward(q_BTHD, k_BTHD, v_BTHD, log_decay_H, states)
        ctx.scale, ctx.C = scale, C
        return _from_chunks(o, T).to(q_BTHD.dtype)

    @staticmethod
    def backward(ctx, grad_o_BTHD):
        q_BTHD, k_BTHD, v_BTHD, log_decay_H, states = ctx.saved_tensors
        T, C, scale = q_BTHD.shape[1], ctx.C, ctx.scale
        dec = _decays(log_decay_H, C)
        q, k, v = (_to_chunks(x, C) for x in (q_BTHD, k_BTHD, v_BTHD))
        do = _to_chunks(grad_o_BTHD, C) * scale
        qd = q * dec.q_HC[:, None, :, None]
        kd = k * dec.k_HC[:, None, :, None]
        scores = (q @ k.transpose(-1, -2)) * dec.mask_HCC[:, None]
        d_scores = (do @ v.transpose(-1, -2)) * dec.mask_HCC[:, None]
        # gradient of each chunk-start state: its own inter term, plus what flows back through λ^C from the next
        d_states = qd.transpose(-1, -2) @ do
        for c in range(d_states.shape[2] - 2, -1, -1):
            d_states[:, :, c] += dec.chunk_H11 * d_states[:, :, c + 1]
        # S_{c+1} = λ^C S_c + kd_cᵀ v_c: the update of chunk c receives d_states[c + 1]; the last one is unused
        d_update = torch.nn.functional.pad(d_states[:, :, 1:], (0, 0, 0, 0, 0, 1))
        dq = (do @ states.transpose(-1, -2)) * dec.q_HC[:, None, :, None] + d_scores @ k
        dk = d_scores.transpose(-1, -2) @ q + (v @ d_update.transpose(-1, -2)) * dec.k_HC[:, None, :, None]
        dv = scores.transpose(-1, -2) @ do + kd @ d_update
        grads = (_from_chunks(g, T).to(x.dtype) for g, x in ((dq, q_BTHD), (dk, k_BTHD), (dv, v_BTHD)))
        return (*grads, None, None, None)


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
    """The chunk-aligned form. Without ``state``, ``start_B`` and ``lengths_B`` this is a training forward from
    position 0 (differentiable, returns no state). Otherwise the T new tokens of row b continue at absolute
    position ``start_B[b]`` (default 0) from ``state`` (default: empty), ``lengths_B[b]`` of them real (right
    padding), and the state after them is returned."""
    if state is None and start_B is None and lengths_B is None:
        return AlignedLinearAttention.apply(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, chunk_size), None
    B, T, H, D = q_BTHD.shape
    C = chunk_size
    device = q_BTHD.device
    start_B = torch.zeros(B, dtype=torch.long, device=device) if start_B is None else start_B.long()
    lengths_B = (
        torch.full((B,), T, dtype=torch.long, device=device) if lengths_B is None else lengths_B.long()
    )
    if state is None:
        state = empty_state(B, H, D, C, k_BTHD.dtype, device)
    if T == 1:
        return _decode_step(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, state, start_B, lengths_B)
    return _prefill(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, C, state, start_B, lengths_B)


def empty_state(B: int, H: int, D: int, C: int, dtype: torch.dtype, device) -> ChunkState:
    return ChunkState(
        torch.zeros(B, H, D, D, dtype=torch.float32, device=device),
        torch.zeros(B, H, C, D, dtype=dtype, device=device),
        torch.zeros(B, H, C, D, dtype=dtype, device=device),
    )


def _prefill(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, C, state: ChunkState, start_B, lengths_B):
    """New tokens continue each row's current chunk: the chunk's buffered keys/values come first in a span
    that starts at the chunk boundary, and the whole span runs through the chunk form from S_c."""
    B, T, H, D = q_BTHD.shape
    device = q_BTHD.device
    fill_B = start_B % C
    span = -(-(int(fill_B.max()) + T) // C) * C
    rows = torch.arange(B, device=device)[:, None]
    cols_BT = fill_B[:, None] + torch.arange(T, device=device)[None, :]

    def place(new_BTHD, buffered_BHCD):
        x = new_BTHD.new_zeros(B, span, H, D)
        x[:, :C] = buffered_BHCD.transpose(1, 2).to(x.dtype)
        x[rows, cols_BT] = new_BTHD
        return x

    q = q_BTHD.new_zeros(B, span, H, D)
    q[rows, cols_BT] = q_BTHD
    k, v = place(k_BTHD, state.keys_BHCD), place(v_BTHD, state.values_BHCD)
    dec = _decays(log_decay_H, C)
    qc, kc, vc = (_to_chunks(x, C) for x in (q, k, v))
    states = _chunk_states(kc, vc, dec, state.state_BHDD.float())  # [B, H, N + 1, D, D]
    o = _chunk_outputs(qc, kc, vc, states[:, :, :-1], dec, scale)
    o_BTHD = _from_chunks(o, span)[rows, cols_BT].to(q_BTHD.dtype)
    # the state after each row's real tokens: S at the start of the chunk holding its next token, plus that
    # chunk's real keys/values (padded tokens beyond lengths_B never enter it)
    end_B = fill_B + lengths_B
    full_B = end_B // C
    S = states[torch.arange(B, device=device), :, full_B]
    j = full_B[:, None] * C + torch.arange(C, device=device)[None, :]  # span positions of that chunk
    real_BC = (j < end_B[:, None])[:, None, :, None]
    j = j.clamp(max=span - 1)

    def buffer(x_BSHD):
        return torch.where(real_BC, x_BSHD[rows, j].transpose(1, 2), 0).to(state.keys_BHCD.dtype)

    return o_BTHD, ChunkState(S, buffer(k), buffer(v))


def _decode_step(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, state: ChunkState, start_B, lengths_B):
    """One token per row: its own row of the chunk formula, then the chunk is folded into S if it filled."""
    B = q_BTHD.shape[0]
    C = state.keys_BHCD.shape[2]
    device = q_BTHD.device
    dec = _decays(log_decay_H, C)
    fill_B = start_B % C
    real_B = lengths_B > 0
    rows = torch.arange(B, device=device)
    keys, values = state.keys_BHCD.clone(), state.values_BHCD.clone()
    if not bool(real_B.all()):  # padding rows keep their state: write only the real rows' keys
        rows, fill_B_real = rows[real_B], fill_B[real_B]
        keys[rows, :, fill_B_real] = k_BTHD[real_B, 0].to(keys.dtype)
        values[rows, :, fill_B_real] = v_BTHD[real_B, 0].to(values.dtype)
    else:
        keys[rows, :, fill_B] = k_BTHD[:, 0].to(keys.dtype)
        values[rows, :, fill_B] = v_BTHD[:, 0].to(values.dtype)
    # The training expression for this one row, each GEMM on rows_matmul's padding of it (a multiple of 4 rows),
    # the query padded once for all three: a GEMM row's bits depend on its own row of A alone, and the live
    # row of each A operand is the one rows_matmul would have built (what the padding rows hold after the
    # decay and mask factors, zeros or signed zeros, never reaches it).
    q = pad_rows(q_BTHD[:, 0, :, None, :].float())  # [B, H, 4, D], the live row first
    kf, vf = keys.float(), values.float()
    S = state.state_BHDD.float()
    decay_q = dec.q_HC.t()[fill_B][:, :, None, None]  # [B, H, 1, 1]
    inter = (q * decay_q) @ S
    scores = (q @ kf.transpose(-1, -2)) * dec.mask_HCC.transpose(0, 1)[fill_B][:, :, None, :]
    o = (inter[:, :, :1] + (scores @ vf)[:, :, :1]) * scale  # [B, H, 1, D], its own memory
    # a full chunk is folded with the same fixed-shape GEMM and the same update as in _chunk_states
    folds = (real_B & (fill_B == C - 1))[:, None, None, None]
    if bool(folds.any()):
        update = rows_matmul((kf * dec.k_HC[None, :, :, None]).transpose(-1, -2), vf)
        S = torch.where(folds, dec.chunk_H11 * S + update, S)
        keys = torch.where(folds, 0, keys)
        values = torch.where(folds, 0, values)
    return o.transpose(1, 2).to(q_BTHD.dtype), ChunkState(S, keys, values)


def chunk_linear_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain chunked form, chunks counted from the first new token; differentiable through autograd.
    Returns (o, state after each row's ``lengths_B`` tokens, default T)."""
    B, T, H, D = q_BTHD.shape
    C = chunk_size
    dec = _decays(log_decay_H, C)
    q, k, v = (_to_chunks(x, C) for x in (q_BTHD, k_BTHD, v_BTHD))
    S0 = q.new_zeros(B, H, D, D) if initial_state is None else initial_state.float()
    U = (k * dec.k_HC[:, None, :, None]).transpose(-1, -2) @ v
    states = [S0]
    for c in range(q.shape[2]):
        states.append(dec.chunk_H11 * states[-1] + U[:, :, c])
    S = torch.stack(states[:-1], dim=2)
    inter = (q * dec.q_HC[:, None, :, None]) @ S
    o = (inter + ((q @ k.transpose(-1, -2)) * dec.mask_HCC[:, None]) @ v) * scale
    if lengths_B is None:
        lengths_B = torch.full((B,), T, dtype=torch.long, device=q.device)
    final = _state_at(states, k, v, log_decay_H, lengths_B, C)
    return _from_chunks(o, T).to(q_BTHD.dtype), final


def _state_at(states, k, v, log_decay_H, lengths_B, C):
    """Each row's state after its own length: the last full chunk's state moved on by the partial chunk."""
    B, N = k.shape[0], k.shape[2]
    rows = torch.arange(B, device=k.device)
    full_B, rest_B = lengths_B // C, lengths_B % C
    S = torch.stack(states, dim=2)[rows, :, full_B]  # [B, H, D, D]
    chunk = full_B.clamp(max=N - 1)
    j = torch.arange(C, device=k.device)
    inside = (j[None, :] < rest_B[:, None])[:, None, :, None]  # [B, 1, C, 1]
    g = log_decay_H.float()[None, :, None]
    weight = torch.exp(g * (rest_B[:, None, None] - 1 - j).clamp(min=0).float())[..., None]  # λ^(rest-1-j)
    kc = torch.where(inside, k[rows, :, chunk] * weight, 0.0)
    partial = kc.transpose(-1, -2) @ v[rows, :, chunk]
    return torch.exp(g[..., None] * rest_B.float()[:, None, None, None]) * S + partial


def recurrent_step(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    state_BHDD: torch.Tensor,
    lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain decode: one token per row, S ← λS + kᵀv, o = scale · q S (rows with length 0 keep their S)."""
    q, k, v = q_BTHD[:, 0].float(), k_BTHD[:, 0].float(), v_BTHD[:, 0].float()
    S = torch.exp(log_decay_H.float()).view(1, -1, 1, 1) * state_BHDD + k[..., :, None] * v[..., None, :]
    if lengths_B is not None:
        S = torch.where((lengths_B > 0).view(-1, 1, 1, 1), S, state_BHDD)
    o = (q[:, :, None, :] @ S)[:, :, 0] * scale
    return o[:, None].to(q_BTHD.dtype), S


def naive_linear_attention(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, log_decay_H: torch.Tensor, scale: float
) -> torch.Tensor:
    """The recurrence token by token in float64: the truth the fast forms are measured against (tests)."""
    B, T, H, D = q_BTHD.shape
    q, k, v = q_BTHD.double(), k_BTHD.double(), v_BTHD.double()
    decay = torch.exp(log_decay_H.double()).view(1, H, 1, 1)
    S = q.new_zeros(B, H, D, v.shape[-1])
    out = []
    for t in range(T):
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append((q[:, t, :, None, :] @ S)[:, :, 0] * scale)
    return torch.stack(out, dim=1)
