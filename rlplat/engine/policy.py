"""Build the policy model from the ``model:`` config section, the same way for rollout and trainer.

Precision (``model.precision``):
- fp32: the model as built (a checkpoint is loaded in fp32);
- bf16: parameters cast to bf16; buffers (RoPE tables, decays, expert bias) stay fp32 (``rlplat.models.to_precision``);
- fp8: the bf16 model with blockwise-FP8 GEMM inputs in its linear layers.
A checkpoint is always loaded in fp32 and then converted, so a path and a preset at the same precision go
through the same conversion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlplat.models import RingLinearForCausalLM, load_pretrained, preset, to_precision

if TYPE_CHECKING:
    from rlplat.config import ModelSection


def build_policy(model: ModelSection, device: torch.device | str | None = None) -> RingLinearForCausalLM:
    """The policy of ``model`` (a ``rlplat.config.ModelSection``) in eval mode at its precision, on ``device``
    (default ``model.device``)."""
    device = torch.device(device if device is not None else model.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={device} but this machine has no CUDA device; use model.device=cpu")
    if model.path is not None:
        if model.overrides:
            raise ValueError(
                "model.overrides changes preset fields; with model.path, edit the checkpoint's config.json instead"
            )
        policy = load_pretrained(model.path, dtype=torch.float32, device=device)
    else:
        policy = RingLinearForCausalLM(preset(model.preset, **model.overrides)).to(device)
        policy.reset_parameters(seed=model.seed)
    return to_precision(policy, model.precision).eval()
