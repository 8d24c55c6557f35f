"""Dynamic sampling (DAPO, Yu et al., 2025): drop prompt groups whose raw correctness has zero variance.

Legend: B samples, N = group_size, groups stored contiguously (rows g*N .. g*N+N-1). A group where every
sample is right (or every one wrong) has all GRPO/RLOO advantages equal to zero, so it only dilutes the
batch. Zero variance means exactly equal values: pass raw correctness (0/1 or bool), not shaped rewards
that carry float noise.

Deviation: DAPO keeps sampling until the batch is full; refilling is the rollout loop's job, this function
only computes the mask.
"""

import torch

from rlplat.algos.validation import as_float, check_finite, check_group_size


def dynamic_sampling_mask(correctness_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool mask over samples: True for samples of groups whose correctness is not all equal."""
    if not isinstance(correctness_B, torch.Tensor) or correctness_B.dim() != 1:
        raise ValueError("correctness_B must be a 1-D tensor with one value per sample")
    c_B = as_float(correctness_B)
    check_finite("correctness_B", c_B)
    check_group_size(c_B.shape[0], group_size)
    c_GN = c_B.view(-1, group_size)
    varied_G = c_GN.amax(dim=1) != c_GN.amin(dim=1)
    return varied_G.repeat_interleave(group_size)
