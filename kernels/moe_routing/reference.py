"""Sigmoid router with expert bias and group-limited top-k (Ling 2.0 / DeepSeek-V3 style).

scores = sigmoid(logits) in fp32; the expert bias shifts scores for *selection only*. A group's score is
the sum of its two best biased scores; the best ``topk_group`` of ``n_group`` groups stay eligible. The
``top_k`` best biased experts among them are chosen, sorted best first with ties going to the lower id.
Their unbiased scores, renormalised (optional) and times ``routed_scaling_factor``, are the combine weights.
"""

from __future__ import annotations

import torch

from kernels.batch_invariant.reference import sigmoid as exp_sigmoid
from kernels.batch_invariant.reference import tree_sum


def _topk_stable(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A stable descending sort breaks ties by index, which torch.topk does not promise.
    values, ids = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


def group_limited_topk(
    logits_NE: torch.Tensor,
    expert_bias_E: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    invariant: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    N, E = logits_NE.shape
    scores = exp_sigmoid(logits_NE.float()) if invariant else torch.sigmoid(logits_NE.float())
    biased = scores + expert_bias_E.float()
    if n_group > 1:
        top2, _ = _topk_stable(biased.view(N, n_group, E // n_group), 2)
        group_scores = top2[..., 0] + top2[..., 1]
        _, keep = _topk_stable(group_scores, topk_group)
        group_mask = torch.zeros(N, n_group, dtype=torch.bool, device=logits_NE.device)
        group_mask.scatter_(1, keep, True)
        eligible = group_mask.repeat_interleave(E // n_group, dim=1)
        biased = biased.masked_fill(~eligible, float("-inf"))
    _, ids = _topk_stable(biased, top_k)
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        total = tree_sum(weights, dim=-1) if invariant else weights.sum(-1)
        weights = weights / (total[:, None] + 1e-20)
    return weights * routed_scaling_factor, ids


class _ExpertRows(torch.autograd.Function):
    """Forward: the rows ``x[order // k]``. Backward: each row's gradient written to its own (token, slot) place
    of an [N, k, C] buffer (``order`` is a permutation, so no place is written twice), then summed over the k
    slots in a fixed order. The library backward of that gather adds the k rows of a token into one place with
    threads racing (torch's CPU ``index_put_``, atomics on GPUs), so gradients would differ run to run."""

    @staticmethod
    def forward(ctx, x_NC: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k, ctx.N = k, x_NC.shape[0]
        return x_NC.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (order,) = ctx.saved_tensors
        slots = grad_rows.new_zeros(ctx.N * ctx.k, grad_rows.shape[-1]).index_copy_(0, order, grad_rows)
        return slots.view(ctx.N, ctx.k, -1).sum(1), None, None


def expert_rows(x_NC: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Row ``order[i] // k`` of x for every i: a token's input once for each of its k (token, slot) pairs, in
    the order ``order`` (a permutation of the N·k pairs, token-major ids). Deterministic gradients."""
    return _ExpertRows.apply(x_NC, order, k)
