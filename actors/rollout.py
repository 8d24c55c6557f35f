"""Rollout worker: one Ray actor wrapping the configured rollout backend (the embedded engine by default)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class RolloutWorker:
    """Generates samples for token-id prompts and takes new weights between generations."""

    def __init__(self, config: dict[str, Any], tokenizer_dir: str | None, num_threads: int = 1):
        import kernels
        from rlplat.config import ExperimentConfig
        from rlplat.engine.backend import make_backend

        torch.set_num_threads(max(1, num_threads))
        cfg = ExperimentConfig.model_validate(config)
        kernels.set_mode(cfg.kernels.backend, cfg.kernels.batch_invariant, cfg.kernels.chunk_size)
        rollout = (
            cfg.rollout.model_copy(update={"tokenizer": tokenizer_dir}) if tokenizer_dir else cfg.rollout
        )
        self.backend = make_backend(cfg, rollout=rollout)

    def generate(
        self, prompts: list[list[int]], prompt_indices: list[int], sampling: dict[str, Any]
    ) -> list[list[dict]]:
        groups = self.backend.generate(prompts, sampling, prompt_indices=prompt_indices)
        # numpy arrays travel through Ray's object store without a copy; torch tensors are pickled.
        return [
            [
                {
                    "prompt_index": s.prompt_index,
                    "sample_index": s.sample_index,
                    "tokens": np.asarray(s.tokens, dtype=np.int64),
                    "logprobs": s.logprobs.numpy(),
                    "finish_reason": s.finish_reason,
                    "version": s.version,
                    "text": s.text,
                }
                for s in group
            ]
            for group in groups
        ]

    def encode(self, texts: list[str], chat: bool) -> list[list[int]]:
        engine = self.backend
        if chat:
            return [engine.encode_prompt([{"role": "user", "content": t}]) for t in texts]
        return [engine.encode_prompt(t) for t in texts]

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> int:
        self.backend.update_weights(named_tensors, version)
        return self.backend.version

    def health(self) -> dict[str, Any]:
        return self.backend.health()
