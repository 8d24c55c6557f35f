"""The rollout backend interface that the embedded engine and the vLLM plugin both satisfy.

A backend turns token-id prompts into ``Sample``s (``generate``), takes new weights between generations
(``update_weights``), says which policy version it serves (``version``) and how it is doing (``health``).
``make_backend`` picks one from ``rollout.backend``. The backends import only the ``Sample`` type
(``rlplat.engine.sample``), so this module sits above them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from rlplat.engine.config import RolloutConfig, SamplingParams
from rlplat.engine.sample import Sample

if TYPE_CHECKING:
    from rlplat.config import ExperimentConfig
    from rlplat.models import RingLinearForCausalLM


@runtime_checkable
class RolloutBackend(Protocol):
    @property
    def version(self) -> int:
        """The policy version of the weights being served."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """``sampling.n`` samples for each prompt, in prompt order. ``prompt_indices`` (default: positions)
        seed the sampling and label the samples, so a prompt keeps its samples whichever batch it lands in."""
        ...

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Swap in new weights (by HF name) between generations; refuse names or shapes that do not match."""
        ...

    def health(self) -> dict[str, Any]: ...


def make_backend(
    cfg: ExperimentConfig,
    policy: RingLinearForCausalLM | None = None,
    *,
    rollout: RolloutConfig | None = None,
) -> RolloutBackend:
    """The backend named by ``cfg.rollout.backend`` for the model of ``cfg.model``.

    ``policy`` reuses an already built native model (at its own precision); ``rollout`` replaces
    ``cfg.rollout`` (or the defaults, for a config without that section). The model is built at
    ``rollout.precision`` (null: ``model.precision``); the rollout's kernel mode is the caller's to set, for
    the process (``RolloutWorker``) or around calls (``rlplat check-alignment``).
    """
    rollout = rollout or getattr(cfg, "rollout", None) or RolloutConfig()
    model = cfg.model.model_copy(update={"precision": rollout.precision or cfg.model.precision})
    if rollout.backend == "native":
        from rlplat.engine.engine import NativeEngine
        from rlplat.engine.policy import build_policy

        tokenizer = _tokenizer(rollout.tokenizer, required=True) or _tokenizer(cfg.model.path, required=False)
        return NativeEngine(
            policy if policy is not None else build_policy(model),
            tokenizer,
            max_batch_size=rollout.max_batch_size,
            default_sampling=rollout.sampling,
            record_routing=rollout.record_routing,
        )
    if rollout.backend == "vllm":
        # vllm_backend imports vLLM only when the backend is built, and says which extra to install.
        from rlplat.engine.vllm_backend import VLLMBackend

        return VLLMBackend.from_config(cfg, rollout, policy)
    raise ValueError(f"unknown rollout.backend {rollout.backend!r}; choose native or vllm")


def _tokenizer(path: str | None, required: bool):
    """The tokenizer in ``path``; a checkpoint without one (``required=False``) still generates token ids."""
    from pathlib import Path

    from rlplat.data.tokenizers import TextTokenizer

    if path is None or not (required or (Path(path) / "tokenizer.json").exists()):
        return None
    return TextTokenizer.from_dir(path)
