"""Advantage estimators for outcome rewards, returned per token.

Legend: B sequences, T response tokens, G groups (prompts), N = group_size responses per prompt.
Rows ``g*N .. g*N+N-1`` are the N responses to prompt g (see ``rlplat.algos`` docstring).

GRPO (Shao et al., DeepSeekMath, 2024), outcome supervision:
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
    std is the unbiased (N-1) sample std of the group; eps is added to the std, not to the variance.
Dr.GRPO (Liu et al., "Understanding R1-Zero-Like Training", 2025): ``norm_by_std=False`` drops the division,
    A_i = r_i - mean_j r_j.
RLOO (Ahmadian et al., "Back to Basics", 2024): leave-one-out baseline,
    A_i = r_i - (1/(N-1)) sum_{j != i} r_j  (= N/(N-1) * (r_i - mean_j r_j)).
REINFORCE++ (Hu, 2025), gamma = 1: token return G_t = sum_{s >= t} r_s over the valid tokens of the
    sequence (the outcome reward sits on the last token, per-token KL penalties anywhere; build
    ``token_rewards_BT`` with ``rewards_at_last_token`` and ``kl.fold_kl_into_token_rewards``), then
    whitened over all valid tokens of the batch: A_t = (G_t - mean) / (std + eps).

Deviations: GRPO and RLOO need N >= 2 and raise otherwise (a group of one has no baseline). REINFORCE++
whitening uses the unbiased std over valid tokens, like GRPO, and eps on the std; with fewer than two
valid tokens it only centres. The whitening statistics are those of the batch passed in: to whiten over
the global batch across data-parallel ranks, call it on the gathered batch before sharding.
Every estimator returns ``adv_BT`` with the per-sequence (or per-token) value at valid tokens and 0 at
padding; advantages are constants for the loss (no gradient flows into rewards).
"""

import torch

from rlplat.algos.validation import (
    as_float,
    as_mask,
    check_2d,
    check_finite,
    check_group_size,
    check_shape,
    masked_values,
)


def _check_rewards(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_2d("mask_BT", mask_BT)
    check_shape("rewards_B", rewards_B, (mask_BT.shape[0],))
    rewards_B = as_float(rewards_B).detach()
    check_finite("rewards_B", rewards_B)
    return rewards_B, as_mask(mask_BT, mask_BT.shape)


def _broadcast(adv_B: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
    return torch.where(m_BT, adv_B[:, None], 0.0)


def grpo_advantages(
    rewards_B: torch.Tensor,
    mask_BT: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO group-normalised advantages (``norm_by_std=False``: Dr.GRPO), broadcast to valid tokens."""
    rewards_B, m_BT = _check_rewards(rewards_B, mask_BT)
    check_group_size(rewards_B.shape[0], group_size, min_size=2)
    r_GN = rewards_B.view(-1, group_size)
    adv_GN = r_GN - r_GN.mean(dim=1, keepdim=True)
    if norm_by_std:
        adv_GN = adv_GN / (r_GN.std(dim=1, correction=1, keepdim=True) + eps)
    return _broadcast(adv_GN.reshape(-1), m_BT)


def rloo_advantages(rewards_B: torch.Tensor, mask_BT: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO leave-one-out advantages, broadcast to valid tokens."""
    rewards_B, m_BT = _check_rewards(rewards_B, mask_BT)
    check_group_size(rewards_B.shape[0], group_size, min_size=2)
    r_GN = rewards_B.view(-1, group_size)
    baseline_GN = (r_GN.sum(dim=1, keepdim=True) - r_GN) / (group_size - 1)
    return _broadcast((r_GN - baseline_GN).reshape(-1), m_BT)


def rewards_at_last_token(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar reward on its last valid token; sequences with no valid token get none."""
    rewards_B, m_BT = _check_rewards(rewards_B, mask_BT)
    T = m_BT.shape[1]
    positions_BT = torch.arange(T, device=m_BT.device).expand_as(m_BT)
    last_B = torch.where(m_BT, positions_BT, -1).amax(dim=1)
    is_last_BT = (positions_BT == last_B[:, None]) & m_BT
    return torch.where(is_last_BT, rewards_B[:, None], 0.0)


def reinforce_pp_advantages(
    token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++: undiscounted return-to-go per token, whitened over the valid tokens of the batch."""
    check_2d("token_rewards_BT", token_rewards_BT)
    m_BT = as_mask(mask_BT, token_rewards_BT.shape)
    r_BT = masked_values("token_rewards_BT", token_rewards_BT.detach(), m_BT)
    returns_BT = r_BT.flip(1).cumsum(1).flip(1)
    n = m_BT.sum()
    mean = returns_BT.sum() / n.clamp_min(1)
    centred_BT = torch.where(m_BT, returns_BT - mean, 0.0)
    if n >= 2:
        std = (centred_BT.square().sum() / (n - 1)).sqrt()
        centred_BT = centred_BT / (std + eps)
    return centred_BT
