"""Output buffers of the Triton kernels. Tests set ``POISON_OUTPUTS``: buffers then start as NaN (-1 for
integers), so an element a kernel forgets to write shows up instead of passing as leftover memory."""

from __future__ import annotations

import torch

POISON_OUTPUTS = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
