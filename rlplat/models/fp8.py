"""Switch a model's linear layers to blockwise FP8 GEMM inputs (1×128 activation tiles, 128×128 weight blocks).

Applied from outside the architecture, as torchtitan does its float8 conversion. The router (fp32 logits)
and the LM head (fp32 log-probs) keep higher precision, because they define routing decisions and the
log-probs RL trains on.
"""

from __future__ import annotations

from torch import nn

from rlplat.models.ring_linear import Linear


def enable_fp8(model: nn.Module, enabled: bool = True) -> int:
    """Set FP8 on every rlplat ``Linear`` in ``model``; returns how many layers were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.fp8 = enabled
            count += 1
    return count
