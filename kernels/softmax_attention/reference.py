"""Causal softmax attention (GQA) for training, prefill and decode against a KV cache: reference forms, the CPU path.

Legend: B batch, Tq queries, Tk keys, H query heads, G kv heads, R = H / G query heads per kv head, D head dim,
KB keys per block, M query rows of a kv head (Tq · R).
A key j is visible to a query at absolute position p iff j ≤ p. Prefill passes p = 0..T-1; decode passes the
cache length; right padding needs no extra mask because a real query never sees a later (padded) key.

**Block-aligned form (batch-invariant mode).** Keys are cut into blocks of ``KEY_BLOCK`` at absolute positions
and visited in order from block 0. For a query row with scores s_j = scale · q·k_j over its visible keys:

    m   = max_j s_j                                           exact in any order
    p_j = exp(s_j - m)                                        elementwise; masked keys give exactly 0
    [acc | l] = Σ_blocks P_b [V_b | 1]                      one GEMM per block, blocks added in order
    o   = acc / l

so each term is a function of that row and of the keys alone: the max is exact, the exponentials elementwise,
and each block's product a GEMM row (rows padded to a multiple of 4, as everywhere: see
``kernels.batch_invariant``), with the row sum l taken by the same GEMM through the ones columns that follow
the values (``ONES_COLUMNS`` of them: the KV cache keeps its values in that layout, see ``values_with_ones``).
Blocks a query cannot see contribute exact zeros, so a prefill row, the same row in a longer batch, and a
decode step over a cache of any capacity round identically. It costs one extra QKᵀ pass over an online softmax
(the max comes first), in exchange for a decode step with no sequential rescaling: all its blocks run as one
batched GEMM. Memory is O(T) (one [M, KB] block of scores at a time).

Training's backward is the library's fused flash-attention backward (``aten`` CPU op) fed with this forward's
output and log-sum-exp, which recomputes probabilities block by block: O(T) memory. Only the forward must be
invariant; the gradient is deterministic for a given batch.

**Plain form.** ``attention_plain`` is torch's fused SDPA; it is not invariant to the key length or to the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.batch_invariant.reference import pad_rows

KEY_BLOCK = 128
QUERY_TILE = 64
# Values carry this many columns of ones after their D, so that P @ [V | 1] gives the row sum l (column D) in the
# GEMM that gives the output. One would do for the maths; four keep a row of [V | 1] whole 16-byte vectors (16
# columns, whole cache lines, made a decode step 2-8% slower at contexts 256 to 8192, measured interleaved).
ONES_COLUMNS = 4
# Tiles of at most this many rows (decode steps) run all their key blocks as one batched GEMM.
SMALL_TILE = 16


def _expand_kv(x_BTGD: torch.Tensor, heads: int) -> torch.Tensor:
    return x_BTGD.repeat_interleave(heads // x_BTGD.shape[2], dim=2)


def _query_rows(q_BTHD: torch.Tensor, G: int) -> torch.Tensor:
    """[B, Tq, H, D] -> a [B, G, Tq, R, D] view (no copy): the R query heads of kv head g at each position
    (head h = g·R + r)."""
    B, Tq, H, D = q_BTHD.shape
    return q_BTHD.view(B, Tq, G, H // G, D).transpose(1, 2)


def values_with_ones(v: torch.Tensor) -> torch.Tensor:
    """Values [..., D] -> fp32 [..., D + ONES_COLUMNS], ones appended: the layout the KV cache keeps them in, and
    the one ``block_attention`` multiplies p by."""
    return F.pad(v.float(), (0, ONES_COLUMNS), value=1.0)


def _kv_rows(x_BTGD: torch.Tensor, span: int, pad: float = 0.0) -> torch.Tensor:
    """[B, Tk, G, W] -> fp32 [B, G, span, W] (rows past Tk filled with ``pad``). A cache kept as fp32 [B, G, L, W]
    memory is used in place; with L = span (``rlplat.models.cache`` keeps exactly the key blocks its longest row
    fills) a decode step copies nothing, while spare blocks (L > span) make its block-batched GEMMs copy the
    visible keys and values."""
    x = x_BTGD.transpose(1, 2)
    if x.dtype != torch.float32 or x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.float().contiguous()
    if x.shape[2] < span:
        return F.pad(x, (0, 0, 0, span - x.shape[2]), value=pad)
    return x if x.shape[2] == span else x[:, :, :span]


def _value_rows(v_BTGW: torch.Tensor, D: int, span: int) -> torch.Tensor:
    """Values, [B, Tk, G, D] or already with their ones ([B, Tk, G, D + ONES_COLUMNS], the KV cache's layout) ->
    fp32 [B, G, span, D + ONES_COLUMNS]. Rows past Tk hold ones in every column: no query sees them (p = 0
    exactly), so only their finiteness matters, and one pad makes both the ones columns and the extra rows."""
    if v_BTGW.shape[-1] == D + ONES_COLUMNS:
        return _kv_rows(v_BTGW, span, pad=1.0)
    v_BGTD = v_BTGW.transpose(1, 2)
    return F.pad(v_BGTD.float(), (0, ONES_COLUMNS, 0, span - v_BGTD.shape[2]), value=1.0)


def block_attention(
    q_BTHD: torch.Tensor,
    k_BTGD: torch.Tensor,
    v_BTGD: torch.Tensor,
    q_pos_BT: torch.Tensor,
    scale: float,
    with_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block-aligned forward. ``v_BTGD`` holds the values, or the values followed by ``ONES_COLUMNS`` ones
    (as the KV cache keeps them: read in place). Returns (o [B, Tq, H, D] in q's dtype, log-sum-exp fp32
    [B, H, Tq] or None without ``with_lse``: only training's backward reads it).

    Queries go in tiles of ``QUERY_TILE`` positions; a tile's scores against every key it can see are one
    GEMM ([rows, D] @ [D, keys]: a score's bits depend neither on the rows nor on the keys beside it), then
    the exact max, the exponentials, and per key block one GEMM with [V | 1] (the output's numerator and the
    row sum l), added in block order. How the queries are tiled therefore changes nothing, and a decode step is a
    tile of one position. Only a tile's queries are ever held in fp32, so memory stays near the inputs'.
    """
    B, Tq, H, D = q_BTHD.shape
    G = k_BTGD.shape[2]
    R = H // G
    lo, hi = _position_range(q_pos_BT)
    span = (hi // KEY_BLOCK + 1) * KEY_BLOCK
    keys, values = _kv_rows(k_BTGD, span), _value_rows(v_BTGD, D, span)
    if Tq * R <= SMALL_TILE:  # a decode step
        return _small_tile(q_BTHD, keys, values, q_pos_BT, scale, lo, hi, with_lse)
    q_BGTRD = _query_rows(q_BTHD, G)
    if Tq <= QUERY_TILE:  # one tile: no output buffer to fill, positions' range known
        q = q_BGTRD.reshape(B, G, Tq * R, D).float() * scale
        o, lse = _tile_output(*_tile(q, keys, values, q_pos_BT, R, lo, hi), Tq, R, with_lse)
        return o.reshape(B, Tq, H, D).to(q_BTHD.dtype), None if lse is None else lse.reshape(B, H, Tq)
    o_BTGRD = q_BTHD.new_empty(B, Tq, G, R, D)
    lse_BGRT = keys.new_empty(B, G, R, Tq) if with_lse else None
    for t0 in range(0, Tq, QUERY_TILE):
        t = slice(t0, min(t0 + QUERY_TILE, Tq))
        n = t.stop - t.start
        q = q_BGTRD[:, :, t].reshape(B, G, n * R, D).float() * scale
        tile = _tile(q, keys, values, q_pos_BT[:, t], R, *_position_range(q_pos_BT[:, t]))
        o_BTGRD[:, t], lse = _tile_output(*tile, n, R, with_lse)
        if lse_BGRT is not None:
            lse_BGRT[..., t] = lse
    return o_BTGRD.view(B, Tq, H, D), None if lse_BGRT is None else lse_BGRT.view(B, H, Tq)


def _tile_output(acc, m, n, R, with_lse):
    """A tile's output [B, n, G, R, D] and, ``with_lse``, its log-sum-exp [B, G, R, n] (else None), as views, from
    its [numerator | row sums] ``acc``."""
    B, G = acc.shape[:2]
    D = acc.shape[-1] - ONES_COLUMNS
    o = (acc[..., :D] / acc[..., D : D + 1]).view(B, G, n, R, D).transpose(1, 2)
    return o, (m + torch.log(acc[..., D])).view(B, G, n, R).transpose(2, 3) if with_lse else None


def _position_range(pos_Bn: torch.Tensor) -> tuple[int, int]:
    """(first, last) query position, read with as few host syncs as possible (a decode step has one)."""
    if pos_Bn.numel() <= 1:
        p = int(pos_Bn) if pos_Bn.numel() else 0
        return p, p
    lo, hi = torch.aminmax(pos_Bn)
    return int(lo), int(hi)


def _padded_rows(q_BGMD, pos_Bn, R, lo, hi):
    """(the rows padded to a multiple of ``ROW_MULTIPLE``, each row's position [B, Mp] or None when all rows are
    at one): padded once here rather than in each GEMM (as rows_matmul would); a padding row sits at the last
    position, so it sees every key and its row is finite."""
    M = q_BGMD.shape[-2]
    q_BGMD = pad_rows(q_BGMD)
    if lo == hi:
        return q_BGMD, None
    return q_BGMD, F.pad(pos_Bn.repeat_interleave(R, dim=1), (0, q_BGMD.shape[-2] - M), value=hi)


def _tile(q_BGMD, keys_BGLD, values_BGLW, pos_Bn, R, lo, hi):
    """(Σ_b P_b [V_b | 1] [B, G, M, D + ONES_COLUMNS], row max m [B, G, M]) for a tile of (pre-scaled) query rows:
    the R heads of each of its n positions ``pos_Bn``, which run from ``lo`` to ``hi`` (M = n · R)."""
    M = q_BGMD.shape[2]
    q_BGMD, pos_BM = _padded_rows(q_BGMD, pos_Bn, R, lo, hi)
    acc, m = _large_tile(q_BGMD, keys_BGLD, values_BGLW, pos_BM, lo, hi)
    if q_BGMD.shape[2] == M:
        return acc, m
    return acc[:, :, :M], m[:, :, :M]


def _large_tile(q_BGMD, keys_BGLD, values_BGLW, pos_BM, lo, hi):
    """``_tile`` for a tile of prefill or training rows: the scores as one [M, D] @ [D, keys] GEMM, then one
    block of p at a time, so only one [M, KB] block of products is held."""
    blocks = hi // KEY_BLOCK + 1
    s = q_BGMD @ keys_BGLD[:, :, : blocks * KEY_BLOCK].transpose(-1, -2)
    # keys up to the tile's first position are visible to all its rows: only the rest needs the mask
    if pos_BM is None:  # every row at one position
        s[..., lo + 1 :].fill_(float("-inf"))
    else:
        key_pos = torch.arange(lo + 1, blocks * KEY_BLOCK, device=s.device)
        s[..., lo + 1 :].masked_fill_(key_pos[None, None, None, :] > pos_BM[:, None, :, None], float("-inf"))
    m = s.amax(-1)
    p = s.sub_(m[..., None]).exp_()
    acc = p[..., :KEY_BLOCK] @ values_BGLW[:, :, :KEY_BLOCK]
    for b in range(1, blocks):
        keys = slice(b * KEY_BLOCK, (b + 1) * KEY_BLOCK)
        acc.add_(p[..., keys] @ values_BGLW[:, :, keys])
    return acc, m


def _small_tile(q_BTHD, keys_BGLD, values_BGLW, q_pos_BT, scale, lo, hi, with_lse):
    """``block_attention`` for one tile of at most ``SMALL_TILE`` rows (a decode step). The scores come
    block-major, [B·G, blocks, M, KB], each block's [M, D] @ [D, KB] one GEMM of a ``bmm`` (a score's bits do not
    depend on the keys beside it), so the products with [V | 1] read p in place; their sums over blocks are added
    in block order, in place. At short contexts a decode step's time is mostly per-call overhead (a view or an
    index costs 1-3 µs, a GEMM ~10), hence the few, plain calls: ``bmm`` rather than ``matmul``'s broadcasting,
    the scaling fused with the expansion of q, and the views a decode step of one position does not need
    skipped."""
    B, Tq, H, D = q_BTHD.shape
    G, W = keys_BGLD.shape[1], values_BGLW.shape[-1]
    R, M = H // G, Tq * H // G
    q = q_BTHD.view(B, G, 1, R, D) if Tq == 1 else _query_rows(q_BTHD, G).reshape(B, G, 1, M, D)
    q, pos_BM = _padded_rows(q, q_pos_BT, R, lo, hi)
    Mp = q.shape[-2]
    blocks = hi // KEY_BLOCK + 1
    n = B * G * blocks
    # the one copy of q a batched GEMM over (kv head, key block) needs, scaled as it is made
    q = torch.mul(q.float().expand(B, G, blocks, Mp, D), scale).view(n, Mp, D)
    # keys [n, KB, D] and values [n, KB, W] are views of the cache when it holds exactly these blocks
    s_n = torch.bmm(q, keys_BGLD.reshape(n, KEY_BLOCK, D).transpose(1, 2))
    s = s_n.view(B * G, blocks, Mp, KEY_BLOCK)
    if pos_BM is None:  # every row at one position: only the last block has keys past it
        s[:, -1, :, lo % KEY_BLOCK + 1 :].fill_(float("-inf"))
    else:
        first = lo // KEY_BLOCK  # blocks before it are visible to every row
        key_pos = torch.arange(first * KEY_BLOCK, blocks * KEY_BLOCK, device=s.device).view(-1, 1, KEY_BLOCK)
        hidden = key_pos > pos_BM[:, None, None, :, None]  # [B, 1, blocks - first, Mp, KB]
        s.view(B, G, blocks, Mp, KEY_BLOCK)[:, :, first:].masked_fill_(hidden, float("-inf"))
    m = s.amax((1, 3), keepdim=True)
    s.sub_(m).exp_()
    acc, *parts = torch.bmm(s_n, values_BGLW.reshape(n, KEY_BLOCK, W)).view(B * G, blocks, Mp, W).unbind(1)
    for part in parts:
        acc.add_(part)
    if Mp != M:
        acc = acc[:, :M]
    o = acc[..., :D] / acc[..., D : D + 1]
    o = o.view(B, Tq, H, D) if Tq == 1 else o.view(B, G, Tq, R, D).transpose(1, 2).reshape(B, Tq, H, D)
    if o.dtype != q_BTHD.dtype:
        o = o.to(q_BTHD.dtype)
    if not with_lse:
        return o, None
    lse = m.view(B, G, Mp)[..., :M] + torch.log(acc[..., D].view(B, G, M))
    return o, lse.view(B, G, Tq, R).transpose(2, 3).reshape(B, H, Tq)


class BlockAttention(torch.autograd.Function):
    """Training: the block-aligned forward, then torch's fused flash-attention backward (positions 0..T-1,
    causal) fed with this forward's output and log-sum-exp, one kv head's query heads at a time (the op wants
    equal head counts, and expanding one kv head's keys at a time keeps memory near the plain path's), in the
    inputs' dtype as the plain path's backward runs."""

    @staticmethod
    def forward(ctx, q_BTHD, k_BTGD, v_BTGD, q_pos_BT, scale):
        o, lse = block_attention(q_BTHD, k_BTGD, v_BTGD, q_pos_BT, scale)
        ctx.save_for_backward(q_BTHD, k_BTGD, v_BTGD, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad_o_BTHD):
        q, k, v, o, lse = ctx.saved_tensors
        B, T, H, D = q.shape
        G = k.shape[2]
        R = H // G
        # strided views, expanded keys included: the op reads them in place (checked equal to contiguous inputs)
        heads = lambda x, g: x[:, :, g * R : (g + 1) * R].transpose(1, 2)  # [B, R, T, D]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for g in range(G):
            kv = lambda x, g=g: x[:, :, g].unsqueeze(1).expand(B, R, T, D).to(q.dtype)
            dq_g, dk_g, dv_g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                heads(grad_o_BTHD.to(q.dtype), g), heads(q, g), kv(k), kv(v), heads(o, g),
                lse[:, g * R : (g + 1) * R].contiguous(), 0.0, True, scale=ctx.scale,
            )  # fmt: skip
            dq[:, :, g * R : (g + 1) * R] = dq_g.transpose(1, 2)
            # the R query heads of a kv head each hold a share of its gradient
            dk[:, :, g] = dk_g.float().sum(1).to(k.dtype)
            dv[:, :, g] = dv_g.float().sum(1).to(v.dtype)
            del dq_g, dk_g, dv_g  # before the next group's are allocated
        return dq, dk, dv, None, None


def attention_invariant(
    q_BTHD: torch.Tensor, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, q_pos_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHD, k_BTGD, v_BTGD))
    if needs_grad:  # training's values never carry the ones (only the cache's do)
        return BlockAttention.apply(q_BTHD, k_BTGD, v_BTGD[..., : q_BTHD.shape[-1]], q_pos_BT, scale)
    return block_attention(q_BTHD, k_BTGD, v_BTGD, q_pos_BT, scale, with_lse=False)[0]


def attention_plain(
    q_BTHD: torch.Tensor, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, q_pos_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    """torch's fused SDPA (GQA without copying the keys): causal when the queries are positions 0..T-1 of
    the keys, else over each row's visible keys (one row: the cache up to its position, no mask)."""
    q = q_BTHD.transpose(1, 2)
    k = k_BTGD.transpose(1, 2).to(q.dtype)
    v = v_BTGD[..., : q.shape[-1]].transpose(1, 2).to(q.dtype)  # a cache's values without their ones
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk and bool((q_pos_BT == torch.arange(Tq, device=q.device)).all()):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    elif q.shape[0] == 1 and Tq == 1:
        end = int(q_pos_BT[0, 0]) + 1
        out = F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], scale=scale, enable_gqa=True)
    else:
        visible = torch.arange(Tk, device=q.device).view(1, 1, 1, -1) <= q_pos_BT[:, None, :, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def naive_attention(
    q_BTHD: torch.Tensor, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, q_pos_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    """Float64 softmax over the visible keys: the truth the other forms are measured against (tests)."""
    H = q_BTHD.shape[2]
    q = q_BTHD.double().transpose(1, 2)
    k = _expand_kv(k_BTGD, H).double().transpose(1, 2)
    v = _expand_kv(v_BTGD[..., : q_BTHD.shape[-1]], H).double().transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) * scale
    visible = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1) <= q_pos_BT[:, None, :, None]
    return (s.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2)
