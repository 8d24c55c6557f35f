"""Clipped policy-gradient losses, returned per token (aggregate with ``aggregation.aggregate_loss``).

Legend: B sequences, T response tokens. ``logp_BT`` are the current policy's log-probs (with grad),
``old_logp_BT`` those of the behaviour policy pi_old (see ``corrections.select_old_logp``), ``adv_BT``
token advantages. Every loss is ``loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))``
(the PPO pessimistic bound written as a loss), optionally dual-clipped; the losses differ in the ratio rho:

PPO (Schulman et al., 2017) with decoupled clip range (DAPO "clip-higher", Yu et al., 2025):
    rho_t = pi(y_t) / pi_old(y_t).
Dual-clip (Ye et al., "Mastering Complex Control in MOBA Games", 2020), advantages < 0 only:
    loss_t = min(loss_t, -A_t * c), c > 1, so a huge ratio on a bad token cannot blow the loss up.
GSPO (Zheng et al., "Group Sequence Policy Optimization", 2025): one length-normalised ratio per sequence,
    s_i = exp((1/|y_i|) sum_t log(pi(y_t) / pi_old(y_t))), clipped at sequence level (paper: 3e-4 / 4e-4).
LPO (Ling Team, "Ling 2.0 Technical Report", 2025): the same with a sentence as the unit,
    r_k = exp(mean_{t in sentence k} log(pi(y_t) / pi_old(y_t))) (geometric mean of token ratios),
    clipped at sentence level with eps = 0.03; every token of the sentence carries the sentence's loss, so
    a sentence weighs in proportion to its length under token-level aggregation. Sentence ids per token
    come from ``sentences.sentence_ids_BT`` (split after pause punctuation).

Implementation notes and deviations:
- GSPO and LPO use the "GSPO-token" form of the GSPO paper: rho_t = sg[s_unit] * pi(y_t) / sg[pi(y_t)].
  Its value equals s_unit and, when the advantage is constant within the unit, its gradient under any
  aggregation mode equals that of the sequence(sentence)-level objective; it also accepts per-token
  advantages (e.g. REINFORCE++ with a KL reward). The GSPO paper averages tokens within a sequence
  (``seq-mean-token-mean``); LPO weighs sentences by length (``token-mean``). Aggregation is the caller's
  choice (``algo.loss_agg_mode``).
- Dual-clip is available on all three losses; clip fractions are reported per token (for GSPO/LPO every
  token of a clipped unit counts as clipped).
- Importance weights for the train–inference mismatch (TIS, IcePop) are not applied here: multiply
  ``loss_BT`` by ``corrections.token_tis_weights`` and/or AND the ``corrections`` masks into ``mask_BT``.
- The log-ratio is clamped to [-20, 20] before ``exp`` (``ratios.clamp_log_ratio``), as verl does: a token
  whose log-ratio is beyond that (e.g. 99.5, which overflows float32) gets a finite loss (ratio e^20) and no
  gradient, instead of an inf loss and NaN gradients that make the trainer refuse the whole step. Within
  ±20 nothing changes. For GSPO / LPO the clamp wraps the whole GSPO-token exponent, so the same holds.
"""

from typing import NamedTuple

import torch

from rlplat.algos.ratios import clamp_log_ratio
from rlplat.algos.validation import as_mask, check_2d, check_shape, masked_values


class PolicyLossOutput(NamedTuple):
    """Per-token policy loss and the clipping bookkeeping ``metrics.clip_fractions`` reads."""

    loss_BT: torch.Tensor  # zero at padding
    ratio_BT: torch.Tensor  # the ratio that was clipped (token, sequence or sentence), detached
    clipped_low_BT: torch.Tensor  # bool: A < 0 and ratio < 1 - eps_low (no gradient)
    clipped_high_BT: torch.Tensor  # bool: A > 0 and ratio > 1 + eps_high (no gradient)
    clipped_dual_BT: torch.Tensor  # bool: A < 0 and ratio > c (no gradient)


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


def _inputs(
    logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor, mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_2d("logp_BT", logp_BT)
    m_BT = as_mask(mask_BT, logp_BT.shape)
    check_shape("old_logp_BT", old_logp_BT, logp_BT.shape)
    check_shape("adv_BT", adv_BT, logp_BT.shape)
    logp_BT = masked_values("logp_BT", logp_BT, m_BT)
    old_logp_BT = masked_values("old_logp_BT", old_logp_BT.detach(), m_BT)
    adv_BT = masked_values("adv_BT", adv_BT.detach(), m_BT)
    return logp_BT, old_logp_BT, adv_BT, m_BT


def _clipped_surrogate(
    ratio_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    m_BT: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> PolicyLossOutput:
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    r_BT = ratio_BT.detach()
    negative_BT = adv_BT < 0
    clipped_low_BT = negative_BT & (r_BT < 1.0 - clip_low) & m_BT
    clipped_high_BT = (adv_BT > 0) & (r_BT > 1.0 + clip_high) & m_BT
    clipped_dual_BT = torch.zeros_like(m_BT)
    if dual_clip is not None:
        loss_BT = torch.where(negative_BT, torch.minimum(loss_BT, -adv_BT * dual_clip), loss_BT)
        clipped_dual_BT = negative_BT & (r_BT > dual_clip) & m_BT
    loss_BT = torch.where(m_BT, loss_BT, 0.0)
    return PolicyLossOutput(loss_BT, r_BT, clipped_low_BT, clipped_high_BT, clipped_dual_BT)


def ppo_clip_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """Token-level PPO clip loss with separate low/high clip and optional dual-clip constant c > 1."""
    _check_clip(clip_low, clip_high, dual_clip)
    logp_BT, old_logp_BT, adv_BT, m_BT = _inputs(logp_BT, old_logp_BT, adv_BT, mask_BT)
    ratio_BT = torch.exp(clamp_log_ratio(logp_BT - old_logp_BT))
    return _clipped_surrogate(ratio_BT, adv_BT, m_BT, clip_low, clip_high, dual_clip)


def unit_mean_log_ratio(
    log_ratio_BT: torch.Tensor, m_BT: torch.Tensor, unit_ids_BT: torch.Tensor
) -> torch.Tensor:
    """Mean of ``log_ratio_BT`` over the valid tokens of each (sequence, unit id), broadcast back to tokens.

    ``m_BT`` is a bool mask; ``unit_ids_BT`` are non-negative ints labelling units within each row (ids need
    not be contiguous, and equal ids in different rows are different units). Zero at padding.
    """
    B = log_ratio_BT.shape[0]
    ids_BT = torch.where(m_BT, unit_ids_BT.long(), 0)
    num_ids = int(ids_BT.max()) + 1 if ids_BT.numel() else 1
    # One flat slot per (row, unit id); padding lands in slot (row, 0) with weight 0.
    slot_BT = torch.arange(B, device=ids_BT.device)[:, None] * num_ids + ids_BT
    weight_BT = m_BT.to(log_ratio_BT.dtype)
    zeros_U = log_ratio_BT.new_zeros(B * num_ids)
    sum_U = zeros_U.index_add(0, slot_BT.reshape(-1), (log_ratio_BT * weight_BT).reshape(-1))
    count_U = zeros_U.index_add(0, slot_BT.reshape(-1), weight_BT.reshape(-1))
    mean_U = sum_U / count_U.clamp_min(1.0)
    return torch.where(m_BT, mean_U[slot_BT], 0.0)


def _unit_ratio_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    m_BT: torch.Tensor,
    unit_ids_BT: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> PolicyLossOutput:
    unit_log_ratio_BT = unit_mean_log_ratio(logp_BT - old_logp_BT, m_BT, unit_ids_BT)
    # GSPO-token: value exp(unit mean log-ratio), gradient s_unit * grad log pi(y_t) per token. The clamp
    # wraps the gradient term too: a unit beyond ±20 gets a finite ratio and no gradient, as in PPO.
    ratio_BT = torch.exp(clamp_log_ratio(logp_BT - logp_BT.detach() + unit_log_ratio_BT.detach()))
    return _clipped_surrogate(ratio_BT, adv_BT, m_BT, clip_low, clip_high, dual_clip)


def gspo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """GSPO: sequence-level ratio exp(mean_t log-ratio), clipped per sequence."""
    _check_clip(clip_low, clip_high, dual_clip)
    logp_BT, old_logp_BT, adv_BT, m_BT = _inputs(logp_BT, old_logp_BT, adv_BT, mask_BT)
    unit_ids_BT = torch.zeros_like(m_BT, dtype=torch.long)
    return _unit_ratio_loss(logp_BT, old_logp_BT, adv_BT, m_BT, unit_ids_BT, clip_low, clip_high, dual_clip)


def lpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    sentence_ids_BT: torch.Tensor,
    *,
    clip_low: float = 0.03,
    clip_high: float = 0.03,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """LPO (Ling 2.0): sentence-level ratio = geometric mean of token ratios in the sentence, clipped per sentence."""
    _check_clip(clip_low, clip_high, dual_clip)
    logp_BT, old_logp_BT, adv_BT, m_BT = _inputs(logp_BT, old_logp_BT, adv_BT, mask_BT)
    check_shape("sentence_ids_BT", sentence_ids_BT, logp_BT.shape)
    if sentence_ids_BT.is_floating_point() or sentence_ids_BT.dtype == torch.bool:
        raise ValueError(f"sentence_ids_BT must be an integer tensor, got {sentence_ids_BT.dtype}")
    if (sentence_ids_BT[m_BT] < 0).any():
        raise ValueError("sentence_ids_BT must be >= 0 at valid tokens")
    return _unit_ratio_loss(
        logp_BT, old_logp_BT, adv_BT, m_BT, sentence_ids_BT, clip_low, clip_high, dual_clip
    )
