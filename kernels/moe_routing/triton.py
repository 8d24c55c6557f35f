"""Group-limited top-k MoE routing (sigmoid scores, selection bias, top-2 group score) in Triton. Forward only.

Legend: N tokens, E experts, G = n_group groups of E / G contiguous experts, K = top_k.

Tiling: a program owns ``BLOCK_N`` tokens × all ``E`` experts (padded to a power of two); routing a token needs
its whole row, and with E ≤ 512 the row fits in registers. Each token is routed inside one program, so the choice
never depends on the batch. Selections are short unrolled loops of max-and-mask steps (``n_group`` group scores,
``topk_group`` group picks, ``top_k`` expert picks), which also pin the tie rule: among equal biased scores the
lower expert id wins, the same for equal group scores and the lower group id.

Only the forward pass is provided. The expert choice is not differentiable; the weights' gradient flows through
the unbiased scores, which the dispatcher gets from the reference formulation (gather of ``sigmoid(logits)``)
when gradients are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._buffers import empty as _empty


@triton.jit
def _argmax_lowest(x, idx, BIG: tl.constexpr):
    """Row-wise max of ``x`` [R, C] and the lowest column index attaining it."""
    m = tl.max(x, axis=1)
    arg = tl.min(tl.where(x == m[:, None], idx[None, :], BIG), axis=1)
    return m, arg


@triton.jit
def _group_topk_kernel(
    logits_ptr,
    bias_ptr,
    w_ptr,
    ids_ptr,
    N,
    E,
    scaling,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    N_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ex = tl.arange(0, BLOCK_E)
    row_mask = rows < N
    mask = row_mask[:, None] & (ex[None, :] < E)
    logits = tl.load(logits_ptr + rows[:, None] * E + ex[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + ex, mask=ex < E, other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)
    neg_inf = float("-inf")
    biased = tl.where(mask, scores + bias[None, :], neg_inf)

    # Group score: the sum of the two largest biased scores in each group (a repeated max counts twice).
    per_group = E // N_GROUP
    expert_group = ex // per_group
    gi = tl.arange(0, BLOCK_G)
    group_score = tl.full((BLOCK_N, BLOCK_G), neg_inf, tl.float32)
    for g in tl.static_range(N_GROUP):
        in_g = (expert_group == g)[None, :] & mask
        vals = tl.where(in_g, biased, neg_inf)
        first, first_id = _argmax_lowest(vals, ex, BLOCK_E)
        second = tl.max(tl.where(ex[None, :] == first_id[:, None], neg_inf, vals), axis=1)
        group_score = tl.where(gi[None, :] == g, (first + second)[:, None], group_score)

    keep_group = tl.zeros((BLOCK_N, BLOCK_G), tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        _, best_g = _argmax_lowest(group_score, gi, BLOCK_G)
        hit = gi[None, :] == best_g[:, None]
        keep_group = keep_group | hit
        group_score = tl.where(hit, neg_inf, group_score)

    # Map kept groups back to experts: expert e is kept if its group's column in keep_group is set.
    keep_expert = tl.zeros((BLOCK_N, BLOCK_E), tl.int1)
    for g in tl.static_range(N_GROUP):
        kept_g = tl.max(tl.where(gi[None, :] == g, keep_group.to(tl.int32), 0), axis=1) > 0
        keep_expert = keep_expert | (kept_g[:, None] & (expert_group == g)[None, :])
    cand = tl.where(keep_expert & mask, biased, neg_inf)

    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    top_id = tl.zeros((BLOCK_N, BLOCK_K), tl.int64)
    for i in tl.static_range(TOP_K):
        _, best = _argmax_lowest(cand, ex, BLOCK_E)
        hit = ex[None, :] == best[:, None]
        w_i = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        top_w = tl.where(kk[None, :] == i, w_i[:, None], top_w)
        top_id = tl.where(kk[None, :] == i, best.to(tl.int64)[:, None], top_id)
        cand = tl.where(hit, neg_inf, cand)

    if NORM:
        top_w = tl.math.div_rn(top_w, tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * scaling
    out = rows[:, None] * TOP_K + kk[None, :]
    out_mask = row_mask[:, None] & (kk[None, :] < TOP_K)
    tl.store(w_ptr + out, top_w, mask=out_mask)
    tl.store(ids_ptr + out, top_id, mask=out_mask)


def group_limited_topk(
    logits: torch.Tensor,
    expert_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, top_k] fp32, ids [N, top_k] int64), ids sorted by biased score descending.

    Forward only: the result carries no autograd graph.
    """
    n, e = logits.shape
    logits = logits.contiguous()
    expert_bias = expert_bias.contiguous()
    weights = _empty((n, top_k), torch.float32, logits.device)
    ids = _empty((n, top_k), torch.int64, logits.device)
    if n == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_n = max(1, min(32, 8192 // block_e))
    _group_topk_kernel[(triton.cdiv(n, block_n),)](
        logits.detach(),
        expert_bias.detach(),
        weights,
        ids,
        n,
        e,
        float(routed_scaling_factor),
        BLOCK_N=block_n,
        BLOCK_E=block_e,
        N_GROUP=n_group,
        BLOCK_G=triton.next_power_of_2(n_group),
        TOPK_GROUP=topk_group,
        TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k),
        NORM=bool(norm_topk_prob),
    )
    return weights, ids
