"""Causal softmax attention (GQA) for prefill and for decode against a KV cache.

Legend: B batch, Tq queries, Tk keys, H query heads, G kv heads, D head dim.
A key j is visible to a query at absolute position p iff j ≤ p. Prefill passes p = 0..T-1; decode passes the
cache length; right padding needs no extra mask because a real query never sees a later (padded) key.

The invariant form reduces over D and over keys with :func:`tree_sum`. Masked keys contribute exact zeros
and the visible keys are always a prefix, so a row's result does not depend on how long the key buffer is
(prefill length, cache capacity) or on the other rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.batch_invariant.reference import tree_sum

QUERY_BLOCK = 16


def _expand_kv(x_BTGD: torch.Tensor, heads: int) -> torch.Tensor:
    return x_BTGD.repeat_interleave(heads // x_BTGD.shape[2], dim=2)


def attention_invariant(
    q_BTHD: torch.Tensor, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, q_pos_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    H = q_BTHD.shape[2]
    q = q_BTHD.float().transpose(1, 2)  # [B, H, Tq, D]
    k = _expand_kv(k_BTGD, H).float().transpose(1, 2)  # [B, H, Tk, D]
    v = _expand_kv(v_BTGD, H).float().transpose(1, 2)
    key_idx = torch.arange(k.shape[2], device=q.device)
    outs = []
    for i0 in range(0, q.shape[2], QUERY_BLOCK):
        qb = q[:, :, i0 : i0 + QUERY_BLOCK]
        scores = tree_sum(qb[:, :, :, None, :] * k[:, :, None, :, :], dim=-1) * scale  # [B, H, Qb, Tk]
        visible = key_idx.view(1, 1, 1, -1) <= q_pos_BT[:, None, i0 : i0 + QUERY_BLOCK, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        denom = tree_sum(p, dim=-1)
        out = tree_sum(p[..., None] * v[:, :, None, :, :], dim=-2) / denom[..., None]
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2).to(q_BTHD.dtype)


def attention_plain(
    q_BTHD: torch.Tensor, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, q_pos_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    H = q_BTHD.shape[2]
    q = q_BTHD.transpose(1, 2)
    k = _expand_kv(k_BTGD, H).transpose(1, 2)
    v = _expand_kv(v_BTGD, H).transpose(1, 2)
    visible = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1) <= q_pos_BT[:, None, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)
