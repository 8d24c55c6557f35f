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
        impl = kernels.triton_module("moe_routing")
        return impl.group_limited_topk(
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
