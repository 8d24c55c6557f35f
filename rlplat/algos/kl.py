"""KL to a reference policy (k1, k2, k3 estimators), KL folded into rewards, and the entropy bonus.

Legend: B sequences, T tokens, V vocabulary. Tokens are sampled from pi, so with
x_t = log pi(y_t) - log pi_ref(y_t) and r_t = pi_ref(y_t) / pi(y_t) = exp(-x_t), per token
(Schulman, "Approximating KL Divergence", 2020):

    k1 = x_t                       unbiased for KL(pi || pi_ref), high variance, can be negative
    k2 = x_t^2 / 2                 biased, low variance, >= 0
    k3 = r_t - 1 - log r_t         unbiased, >= 0 (the GRPO / DeepSeekMath KL term)

As a loss term: ``loss_BT + beta * kl_estimate(logp_BT, ref_logp_BT, mask_BT, "k3")`` with gradient
through ``logp_BT``, aggregated like the policy loss (GRPO). In the reward (PPO-style, REINFORCE++): the
estimate is a constant, r'_t = r_t - beta * kl_t per token, or r'_i = r_i - beta * sum_t kl_it per sequence
(the sum over tokens estimates the KL of the whole response).

Entropy bonus: H_t = -sum_v p_v log p_v from the logits; the loss term is -coef * H_t (maximising
entropy), added to ``loss_BT`` before aggregation.

k3 exponentiates -x, so x is bounded below by -20 first, in both of its terms (``ratios.MAX_LOG_RATIO``,
as verl's ``low_var_kl``): a token with pi far below pi_ref (x = -99.5 overflows float32) gets a finite KL,
e^20 - 21, and no gradient, instead of inf / NaN that would refuse the step or crash the metrics. Values for
x >= -20 are unchanged. Deviations from verl: x > 20 is not clamped (e^-x underflows to 0 there, and k3 ~
x - 1 keeps its value and its pull toward pi_ref), and the k3 value is not clamped to [-10, 10] (see
``ratios``). k1 and k2 exponentiate nothing and are not bounded. Non-finite inputs raise.
"""

from typing import Literal, get_args

import torch

from rlplat.algos.ratios import MAX_LOG_RATIO
from rlplat.algos.validation import as_float, as_mask, check_2d, check_finite, check_shape, masked_values

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


def kl_estimate(
    logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, mask_BT: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs; zero at padding."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    check_2d("logp_BT", logp_BT)
    m_BT = as_mask(mask_BT, logp_BT.shape)
    check_shape("ref_logp_BT", ref_logp_BT, logp_BT.shape)
    x_BT = masked_values("logp_BT", logp_BT, m_BT) - masked_values("ref_logp_BT", ref_logp_BT, m_BT)
    if estimator == "k1":
        kl_BT = x_BT
    elif estimator == "k2":
        kl_BT = 0.5 * x_BT.square()
    else:
        # expm1 keeps r - 1 accurate when the policies are close; the bound keeps exp(-x) finite.
        x_BT = x_BT.clamp_min(-MAX_LOG_RATIO)
        kl_BT = torch.expm1(-x_BT) + x_BT
    return torch.where(m_BT, kl_BT, 0.0)


def fold_kl_into_token_rewards(
    token_rewards_BT: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, beta: float
) -> torch.Tensor:
    """``token_rewards_BT - beta * kl_BT`` at valid tokens (KL detached: a reward, not a loss)."""
    check_2d("token_rewards_BT", token_rewards_BT)
    m_BT = as_mask(mask_BT, token_rewards_BT.shape)
    check_shape("kl_BT", kl_BT, token_rewards_BT.shape)
    r_BT = masked_values("token_rewards_BT", token_rewards_BT.detach(), m_BT)
    return r_BT - beta * masked_values("kl_BT", kl_BT.detach(), m_BT)


def fold_kl_into_sequence_rewards(
    rewards_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor, beta: float
) -> torch.Tensor:
    """``rewards_B - beta * sum_t kl_BT`` (KL detached)."""
    check_2d("kl_BT", kl_BT)
    m_BT = as_mask(mask_BT, kl_BT.shape)
    check_shape("rewards_B", rewards_B, (kl_BT.shape[0],))
    rewards_B = as_float(rewards_B).detach()
    check_finite("rewards_B", rewards_B)
    return rewards_B - beta * masked_values("kl_BT", kl_BT.detach(), m_BT).sum(dim=1)


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, computed in float32; -inf logits (banned tokens) are fine."""
    if torch.isnan(logits_BTV).any() or torch.isposinf(logits_BTV).any():
        raise ValueError("logits_BTV holds NaN or +inf; entropy is undefined")
    if (logits_BTV.amax(dim=-1) == float("-inf")).any():
        raise ValueError("logits_BTV has a row where every logit is -inf; entropy is undefined")
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    # Clamping -inf to the most negative float keeps 0 * log 0 = 0 in value and gradient.
    safe_logp_BTV = logp_BTV.clamp_min(torch.finfo(logp_BTV.dtype).min)
    return -(logp_BTV.exp() * safe_logp_BTV).sum(dim=-1)


def entropy_bonus(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token loss term ``-coef * entropy_BT`` (zero at padding); add it to ``loss_BT``."""
    check_2d("entropy_BT", entropy_BT)
    m_BT = as_mask(mask_BT, entropy_BT.shape)
    return -coef * masked_values("entropy_BT", entropy_BT, m_BT)
