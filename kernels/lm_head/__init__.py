"""Public fused LM-head ops: log-probs + entropy without materialising [tokens, vocab], and fp32 logits."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_ndim
from kernels.lm_head import reference


def lm_head_logprobs(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target under softmax(h·Wᵀ / temperature), entropy), both fp32 [N]."""
    check_ndim("hidden", h_ND, 2, "N, D")
    check_ndim("lm_head weight", w_VD, 2, "V, D")
    check_float("hidden", h_ND)
    check_float("lm_head weight", w_VD)
    if h_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(
            f"lm_head_logprobs: hidden D={h_ND.shape[1]} but weight is {tuple(w_VD.shape)} [V, D]"
        )
    if targets_N.shape != (h_ND.shape[0],) or targets_N.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"lm_head_logprobs: targets must be integer [N={h_ND.shape[0]}], got {targets_N.dtype} {tuple(targets_N.shape)}"
        )
    if targets_N.numel() and (int(targets_N.min()) < 0 or int(targets_N.max()) >= w_VD.shape[0]):
        raise ValueError(f"lm_head_logprobs: target ids must be in [0, {w_VD.shape[0]}) (the vocabulary)")
    if not temperature > 0:
        raise ValueError(f"lm_head_logprobs: temperature must be > 0, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"lm_head_logprobs: chunk_rows must be ≥ 1, got {chunk_rows}")
    return reference.lm_head_logprobs(
        h_ND, w_VD, targets_N.long(), float(temperature), chunk_rows, kernels.get_mode().batch_invariant
    )


def lm_head_logits(h_ND: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    check_ndim("lm_head weight", w_VD, 2, "V, D")
    if h_ND.shape[-1] != w_VD.shape[1]:
        raise ValueError(
            f"lm_head_logits: hidden D={h_ND.shape[-1]} but weight is {tuple(w_VD.shape)} [V, D]"
        )
    return reference.lm_head_logits(h_ND, w_VD, kernels.get_mode().batch_invariant)
