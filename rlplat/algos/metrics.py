"""Training metrics computed from the tensors of one (micro-)batch; all detached 0-d tensors.

Legend: B sequences, T tokens. Means are over valid tokens and are 0 when nothing is valid. To combine
micro-batches or ranks, weight each mean by its valid-token count (``mask_BT.sum()``); ``max_abs_dlogp``
combines by max.

- clip fractions: share of valid tokens whose loss took the clipped branch (no gradient): low (A < 0,
  ratio < 1 - eps_low), high (A > 0, ratio > 1 + eps_high), dual (A < 0, ratio > c), and any of them.
- approx KL(pi_old || pi): k3 with samples from pi_old, the PPO early-warning statistic.
- KL to reference: ``kl.kl_estimate`` averaged.
- entropy: mean token entropy.
- mismatch: k3 estimate of KL(pi_rollout || pi_train) (samples come from the rollout engine) and
  max |log pi_train - log pi_rollout| over valid tokens.
- IcePop masked fraction: valid tokens IcePop removed.
The gradient norm is the trainer's (it needs the optimizer's parameters), not here.
"""

import torch

from rlplat.algos.kl import KLEstimator, kl_estimate
from rlplat.algos.losses import PolicyLossOutput
from rlplat.algos.validation import as_mask, check_2d, masked_values


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean of ``x_BT`` over valid tokens (0 when none are valid); raises on non-finite valid values."""
    check_2d("x_BT", x_BT)
    m_BT = as_mask(mask_BT, x_BT.shape)
    x_BT = masked_values("x_BT", x_BT.detach(), m_BT)
    return x_BT.sum() / m_BT.sum().clamp_min(1).to(x_BT.dtype)


@torch.no_grad()
def clip_fractions(out: PolicyLossOutput, mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    m_BT = as_mask(mask_BT, out.loss_BT.shape)
    n = m_BT.sum().clamp_min(1).float()
    any_BT = out.clipped_low_BT | out.clipped_high_BT | out.clipped_dual_BT

    def frac(flags_BT: torch.Tensor) -> torch.Tensor:
        return (flags_BT & m_BT).sum().float() / n

    return {
        "clip_frac_low": frac(out.clipped_low_BT),
        "clip_frac_high": frac(out.clipped_high_BT),
        "clip_frac_dual": frac(out.clipped_dual_BT),
        "clip_frac": frac(any_BT),
    }


@torch.no_grad()
def approx_kl(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi), mean over valid tokens."""
    return masked_mean(kl_estimate(old_logp_BT, logp_BT, mask_BT, "k3"), mask_BT)


@torch.no_grad()
def kl_to_ref(
    logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, mask_BT: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """KL(pi || pi_ref) estimate, mean over valid tokens."""
    return masked_mean(kl_estimate(logp_BT, ref_logp_BT, mask_BT, estimator), mask_BT)


@torch.no_grad()
def entropy_mean(entropy_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return masked_mean(entropy_BT, mask_BT)


@torch.no_grad()
def mismatch_metrics(
    train_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, mask_BT: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Train–inference mismatch: k3 KL(pi_rollout || pi_train) and max |delta logp| over valid tokens."""
    kl_BT = kl_estimate(rollout_logp_BT, train_logp_BT, mask_BT, "k3")
    m_BT = as_mask(mask_BT, kl_BT.shape)
    dlogp_BT = masked_values("train_logp_BT", train_logp_BT, m_BT) - masked_values(
        "rollout_logp_BT", rollout_logp_BT, m_BT
    )
    max_abs = dlogp_BT.abs().amax() if dlogp_BT.numel() else dlogp_BT.new_zeros(())
    return {"mismatch_kl": masked_mean(kl_BT, m_BT), "max_abs_dlogp": max_abs}


@torch.no_grad()
def icepop_masked_fraction(keep_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Share of valid tokens that an IcePop keep mask removed (0 when none are valid)."""
    m_BT = as_mask(mask_BT, keep_BT.shape)
    k_BT = as_mask(keep_BT, m_BT.shape, name="keep_BT")
    n = m_BT.sum()
    return (m_BT & ~k_BT).sum().float() / n.clamp_min(1).float()
