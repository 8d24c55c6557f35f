"""Loss aggregation that stays a true global mean under gradient accumulation and data parallelism.

Legend: B sequences, T tokens; ``loss_BT`` per-token losses, ``mask_BT`` valid tokens, n_b = valid tokens
of sequence b. Over the whole global batch (all micro-batches on all data-parallel ranks):

    token-mean               sum_{b,t} L_bt / sum_b n_b                       (DAPO)
    seq-mean-token-sum       sum_{b,t} L_bt / S                               S = sequences with n_b > 0
    seq-mean-token-mean      sum_b (sum_t L_bt / n_b) / S                     (GRPO paper, GSPO)
    seq-mean-token-sum-norm  sum_{b,t} L_bt / (S * max_len)                   (Dr.GRPO: a constant length)

Each is a sum of per-sequence terms divided by a global normaliser, so it splits exactly:

    normaliser = global_normalizer(all micro-batch masks of this rank, mode, max_len)
    all_reduce(normaliser, SUM) across data-parallel ranks                     # the caller's job
    for micro-batch k: aggregate_loss(loss_k_BT, mask_k_BT, mode, normaliser).backward()
    all_reduce(grads, SUM) across ranks

The micro-batch losses then add up to the full-batch loss and their gradients to its gradient. Taking a
mean per micro-batch and averaging those (a mean of means) weighs tokens in small micro-batches more; this
module never does that. If the data-parallel wrapper AVERAGES gradients (torch DDP does), multiply each
micro-batch loss by the world size to undo the division.

Deviations: empty sequences (n_b = 0) count neither as tokens nor as sequences, so an empty response
cannot dilute the mean; the seq-mean-token-sum-norm normaliser counts sequences instead of using the
Dr.GRPO paper's fixed batch size, so dropping samples (dynamic sampling) keeps the scale per sequence.
All-masked inputs give a zero loss (normaliser 0 is treated as 1; the numerator is 0).
"""

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from rlplat.algos.validation import as_mask, check_2d, masked_values

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)


def _check_mode(mode: str, max_len: int | None) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")
    if mode == "seq-mean-token-sum-norm" and (not isinstance(max_len, int) or max_len <= 0):
        raise ValueError(f"mode 'seq-mean-token-sum-norm' needs max_len, a positive int; got {max_len!r}")


def global_normalizer(
    masks_BT: Sequence[torch.Tensor], mode: AggMode, *, max_len: int | None = None
) -> torch.Tensor:
    """The denominator of ``mode`` for these micro-batch masks, as an exact int64 scalar tensor.

    Call once per optimizer step with all of this rank's micro-batch masks, then all-reduce (SUM) the
    result across data-parallel ranks before passing it to ``aggregate_loss``. The result lives on the
    CPU; move it to the GPU for an NCCL all-reduce.
    """
    _check_mode(mode, max_len)
    total = torch.zeros((), dtype=torch.long)
    for i, mask_BT in enumerate(masks_BT):
        check_2d(f"masks_BT[{i}]", mask_BT)
        m_BT = as_mask(mask_BT, mask_BT.shape, name=f"masks_BT[{i}]")
        if mode == "token-mean":
            total = total + m_BT.sum().cpu()
        else:
            total = total + m_BT.any(dim=1).sum().cpu()
    if mode == "seq-mean-token-sum-norm":
        total = total * max_len
    return total


def aggregate_loss(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    mode: AggMode,
    normalizer: torch.Tensor | int | float,
) -> torch.Tensor:
    """This micro-batch's share of the global loss: its numerator divided by the global ``normalizer``."""
    _check_mode(mode, max_len=1)
    check_2d("loss_BT", loss_BT)
    m_BT = as_mask(mask_BT, loss_BT.shape)
    loss_BT = masked_values("loss_BT", loss_BT, m_BT)
    norm = torch.as_tensor(normalizer).detach()
    if norm.numel() != 1 or not torch.isfinite(norm.double()) or norm < 0:
        raise ValueError(f"normalizer must be one finite value >= 0, got {normalizer!r}")
    if mode == "seq-mean-token-mean":
        n_tokens_B = m_BT.sum(dim=1).clamp_min(1).to(loss_BT.dtype)
        numerator = (loss_BT.sum(dim=1) / n_tokens_B).sum()
    else:
        numerator = loss_BT.sum()
    # float64 keeps counts above 2**24 exact before the single rounding to the loss dtype.
    return numerator / norm.to(device=loss_BT.device, dtype=torch.float64).clamp_min(1.0).to(loss_BT.dtype)
