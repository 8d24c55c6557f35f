"""Public MoE routing op."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_ndim, check_shape
from kernels.moe_routing import reference


def group_limited_topk(
    logits_NE: torch.Tensor,
    expert_bias_E: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: returns (weights [N, top_k] fp32, expert ids [N, top_k] int64)."""
    check_ndim("logits", logits_NE, 2, "N, E")
    check_float("logits", logits_NE, (torch.float32,))
    E = logits_NE.shape[1]
    check_shape("expert_bias", expert_bias_E, (E,), "E")
    if n_group < 1 or E % n_group:
        raise ValueError(f"moe routing: num_experts={E} must be divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"moe routing: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if n_group > 1 and E // n_group < 2:
        raise ValueError(f"moe routing: each group needs ≥ 2 experts (E={E}, n_group={n_group})")
    eligible = E if n_group == 1 else topk_group * (E // n_group)
    if not 1 <= top_k <= eligible:
        raise ValueError(
            f"moe routing: top_k={top_k} must be in [1, {eligible}] (experts in the kept groups)"
        )
    mode = kernels.get_mode()
    if mode.backend == "triton":
        return _TritonRouting.apply(
            logits_NE, expert_bias_E, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob
        )
    return reference.group_limited_topk(
        logits_NE,
        expert_bias_E,
        top_k,
        n_group,
        topk_group,
        routed_scaling_factor,
        norm_topk_prob,
        invariant=mode.batch_invariant,
    )


class _TritonRouting(torch.autograd.Function):
    """The Triton kernel's routing, with the gradient of the combine weights w.r.t. the router logits (the
    selection itself has none). With s = sigmoid(logit) of the k chosen experts and c the scaling factor,
    w = c·s / Σs (or c·s without renormalisation), so ∂w_i/∂s_j = c(δ_ij − w_i/c)/Σs and ∂s/∂logit = s(1 − s)."""

    @staticmethod
    def forward(ctx, logits_NE, expert_bias_E, top_k, n_group, topk_group, scaling, norm_topk_prob):
        impl = kernels.triton_module("moe_routing")
        weights_Nk, ids_Nk = impl.group_limited_topk(
            logits_NE, expert_bias_E, top_k, n_group, topk_group, scaling, norm_topk_prob
        )
        ctx.save_for_backward(logits_NE, ids_Nk)
        ctx.scaling, ctx.norm = scaling, norm_topk_prob
        ctx.mark_non_differentiable(ids_Nk)
        return weights_Nk, ids_Nk

    @staticmethod
    def backward(ctx, grad_w_Nk, _grad_ids):
        logits_NE, ids_Nk = ctx.saved_tensors
        s = torch.sigmoid(logits_NE.gather(1, ids_Nk))
        if ctx.norm:
            total = s.sum(-1, keepdim=True) + 1e-20
            grad_s = ctx.scaling / total * (grad_w_Nk - (grad_w_Nk * s).sum(-1, keepdim=True) / total)
        else:
            grad_s = ctx.scaling * grad_w_Nk
        grad_logits = torch.zeros_like(logits_NE).scatter_add_(1, ids_Nk, grad_s * s * (1 - s))
        return grad_logits, None, None, None, None, None, None


def expert_rows(x_NC: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """A token's row once per (token, slot) pair, pairs in ``order`` (a permutation of N·k token-major pair
    ids, e.g. grouped by expert): ``x[order // k]`` with a deterministic backward (see the reference)."""
    check_ndim("x", x_NC, 2, "N, C")
    if order.shape != (x_NC.shape[0] * k,):
        raise ValueError(
            f"expert_rows: order must hold the N·k = {x_NC.shape[0] * k} pair ids, got {tuple(order.shape)}"
        )
    return reference.expert_rows(x_NC, order, k)
