"""Train–inference mismatch corrections for rollout backends whose log-probs differ from the trainer's.

Legend: B sequences, T tokens. ``rollout_logp_BT``: log-probs reported by the rollout engine
(pi_rollout); ``old_logp_BT`` / ``train_logp_BT``: the trainer's recomputed log-probs under the same
weights (pi_old = pi_train(theta_old)); delta_t = log pi_old(y_t) - log pi_rollout(y_t).

Token TIS (Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025):
    w_t = min(exp(delta_t), C); multiply the per-token policy loss by w_t.
Sequence TIS: w_i = min(exp(sum_t delta_t), C) = truncated product of the token ratios, broadcast to tokens.
IcePop (Ling Team, Ring-1T report "Every Step Evolves", 2025): keep token t only if
    alpha <= exp(delta_t) <= beta; masked tokens get no gradient. Returns the keep mask and the masked
    fraction of valid tokens.
Sequence rejection, MIS (Liu et al., "When Speed Kills Stability", 2025): drop a whole sequence when its
    ratio exp(sum_t delta_t) (``ratio="product"``) or exp(mean_t delta_t) (``ratio="geometric"``) lies
    outside [low, high].
π_old choice: with an exact (bitwise-aligned) backend the rollout log-probs are pi_old and the trainer's
    recompute pass can be skipped (``select_old_logp(..., use_rollout_logp=True)``); otherwise recompute.

Deviations: the Ring-1T objective writes IcePop as M(k) = k inside [alpha, beta], i.e. the mask times the
ratio; here IcePop is the mask alone and the ratio weight is the separate TIS option, so the two compose
(``loss_BT * token_tis_weights(...)`` with ``mask_BT & keep_BT``). Ratios are compared in log space so a
product over thousands of tokens cannot overflow. All weights and masks are constants (no gradient).

Overflow: none of these needs the ±20 log-ratio clamp of the losses and KL (``ratios``). TIS truncates in log
space, exp(min(delta, log C)), so the weight is at most C, and a very negative delta underflows to a weight
of 0. IcePop and MIS compare delta with log alpha / log beta (log low / log high) and never exponentiate.
A clamp here would change decisions, not only values: with a bound beyond e^20 (IcePop beta = 1e10, say)
a clamped delta of 99.5 would pass as 20 and the token would be kept.
"""

import math
from typing import Literal, NamedTuple

import torch

from rlplat.algos.validation import as_mask, check_2d, check_shape, masked_values


class IcePopResult(NamedTuple):
    keep_BT: torch.Tensor  # bool, False at padding and at masked tokens
    masked_fraction: torch.Tensor  # 0-d float: masked valid tokens / valid tokens (0 if none)


class RejectionResult(NamedTuple):
    keep_B: torch.Tensor  # bool per sequence; sequences without valid tokens are kept (they carry no loss)
    keep_BT: torch.Tensor  # keep_B broadcast to valid tokens
    rejected_fraction: torch.Tensor  # 0-d float: rejected / sequences with valid tokens (0 if none)


def _log_ratio(
    num_logp_BT: torch.Tensor, den_logp_BT: torch.Tensor, mask_BT: torch.Tensor, num_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    check_2d(num_name, num_logp_BT)
    m_BT = as_mask(mask_BT, num_logp_BT.shape)
    check_shape("rollout_logp_BT", den_logp_BT, num_logp_BT.shape)
    num_BT = masked_values(num_name, num_logp_BT.detach(), m_BT)
    den_BT = masked_values("rollout_logp_BT", den_logp_BT.detach(), m_BT)
    return num_BT - den_BT, m_BT


def _check_cap(cap: float) -> None:
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")


def select_old_logp(
    rollout_logp_BT: torch.Tensor, recomputed_logp_BT: torch.Tensor | None, *, use_rollout_logp: bool
) -> torch.Tensor:
    """pi_old log-probs: the rollout's (exact backends) or the trainer's recomputed ones."""
    if use_rollout_logp:
        return rollout_logp_BT.detach()
    if recomputed_logp_BT is None:
        raise ValueError(
            "use_rollout_logp=False needs recomputed_logp_BT (run the trainer's log-prob pass first)"
        )
    check_shape("recomputed_logp_BT", recomputed_logp_BT, rollout_logp_BT.shape)
    return recomputed_logp_BT.detach()


def token_tis_weights(
    old_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, cap: float = 2.0
) -> torch.Tensor:
    """Token-level truncated IS weight min(pi_old / pi_rollout, cap); zero at padding."""
    _check_cap(cap)
    delta_BT, m_BT = _log_ratio(old_logp_BT, rollout_logp_BT, mask_BT, "old_logp_BT")
    return torch.where(m_BT, delta_BT.clamp_max(math.log(cap)).exp(), 0.0)


def sequence_tis_weights(
    old_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, cap: float = 2.0
) -> torch.Tensor:
    """Sequence-level truncated IS weight min(prod_t pi_old / pi_rollout, cap), broadcast to valid tokens."""
    _check_cap(cap)
    delta_BT, m_BT = _log_ratio(old_logp_BT, rollout_logp_BT, mask_BT, "old_logp_BT")
    w_B = delta_BT.sum(dim=1).clamp_max(math.log(cap)).exp()
    return torch.where(m_BT, w_B[:, None], 0.0)


def icepop_mask(
    train_logp_BT: torch.Tensor,
    rollout_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 5.0,
) -> IcePopResult:
    """IcePop: keep tokens with alpha <= pi_train / pi_rollout <= beta."""
    if not 0 < alpha <= 1 <= beta:
        raise ValueError(f"IcePop needs 0 < alpha <= 1 <= beta, got alpha={alpha}, beta={beta}")
    delta_BT, m_BT = _log_ratio(train_logp_BT, rollout_logp_BT, mask_BT, "train_logp_BT")
    keep_BT = m_BT & (delta_BT >= math.log(alpha)) & (delta_BT <= math.log(beta))
    n_valid = m_BT.sum()
    masked_fraction = (n_valid - keep_BT.sum()).float() / n_valid.clamp_min(1).float()
    return IcePopResult(keep_BT, masked_fraction)


def sequence_rejection_mask(
    old_logp_BT: torch.Tensor,
    rollout_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    low: float = 0.0,
    high: float = 2.0,
    ratio: Literal["product", "geometric"] = "product",
) -> RejectionResult:
    """MIS: reject whole sequences whose ratio pi_old / pi_rollout lies outside [low, high]."""
    if not 0 <= low <= 1 <= high:
        raise ValueError(f"sequence rejection needs 0 <= low <= 1 <= high, got low={low}, high={high}")
    if ratio not in ("product", "geometric"):
        raise ValueError(f"ratio must be 'product' or 'geometric', got {ratio!r}")
    delta_BT, m_BT = _log_ratio(old_logp_BT, rollout_logp_BT, mask_BT, "old_logp_BT")
    log_ratio_B = delta_BT.sum(dim=1)
    n_tokens_B = m_BT.sum(dim=1)
    if ratio == "geometric":
        log_ratio_B = log_ratio_B / n_tokens_B.clamp_min(1)
    log_low = math.log(low) if low > 0 else -math.inf
    keep_B = (log_ratio_B >= log_low) & (log_ratio_B <= math.log(high))
    has_tokens_B = n_tokens_B > 0
    keep_B = keep_B | ~has_tokens_B
    rejected_fraction = (~keep_B).sum().float() / has_tokens_B.sum().clamp_min(1).float()
    return RejectionResult(keep_B, m_BT & keep_B[:, None], rejected_fraction)
