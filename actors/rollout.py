"""Rollout workers: one Ray actor class for the role, a thin shell over the configured rollout backend, and
``RolloutPool``, the driver's typed handle on them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.pool import WorkerPool, shard
from rlplat.train.batch import SampleGroups


@dataclass
class RolloutSummary:
    """What the loop reads of some samples (the samples themselves stay in the object store)."""

    response_lengths: list[int]  # per sample
    min_version: int
    texts: list[str]  # the response of each group's first sample, for the first groups asked for

    @staticmethod
    def of(samples: SampleGroups, texts: int) -> RolloutSummary:
        """The summary of ``samples``, with the first sample's text of its first ``texts`` groups."""
        n, all_texts = samples.group_size, samples.texts or []
        return RolloutSummary(
            samples.response_lengths_S.tolist(),
            int(samples.versions_S.min()),
            [all_texts[g * n] for g in range(min(texts, samples.num_groups))],
        )

    @staticmethod
    def merge(parts: list[RolloutSummary]) -> RolloutSummary:
        return RolloutSummary(
            [x for p in parts for x in p.response_lengths],
            min(p.min_version for p in parts),
            [t for p in parts for t in p.texts],
        )

    @property
    def samples(self) -> int:
        return len(self.response_lengths)

    @property
    def response_tokens(self) -> int:
        return sum(self.response_lengths)


class RolloutWorker:
    """Generates samples for token-id prompts and takes new weights between generations."""

    def __init__(self, config: dict[str, Any], tokenizer_dir: str | None, num_threads: int = 1):
        import kernels
        from rlplat.config import ExperimentConfig
        from rlplat.engine.backend import make_backend

        torch.set_num_threads(max(1, num_threads))
        cfg = ExperimentConfig.model_validate(config)
        # the rollout side's own kernel mode (rollout.batch_invariant; by default the trainer's)
        kernels.set_mode(cfg.kernels.backend, cfg.rollout_batch_invariant(), cfg.kernels.chunk_size)
        rollout = (
            cfg.rollout.model_copy(update={"tokenizer": tokenizer_dir}) if tokenizer_dir else cfg.rollout
        )
        self.backend = make_backend(cfg, rollout=rollout)

    def generate(
        self, prompts: list[list[int]], prompt_indices: list[int], sampling: dict[str, Any], texts: int
    ) -> tuple[SampleGroups, RolloutSummary]:
        """``sampling["n"]`` samples per prompt (seeded by ``prompt_indices``). Call with Ray's
        ``num_returns=2``: the samples go to the object store for the reward and trainer workers, and only the
        summary (with the first sample's text of the first ``texts`` groups) to the caller."""
        groups = self.backend.generate(prompts, sampling, prompt_indices=prompt_indices)
        flat = [s for g in groups for s in g]
        samples = SampleGroups.pack(
            prompts,
            [s.tokens for s in flat],
            [s.logprobs for s in flat],
            [s.version for s in flat],
            [s.text or "" for s in flat],
            [s.routes for s in flat] if flat and all(s.routes is not None for s in flat) else None,
        )
        return samples, RolloutSummary.of(samples, texts)

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> int:
        self.backend.update_weights(named_tensors, version)
        return self.backend.version


@dataclass
class Rollouts:
    """One step's samples as the driver holds them: object refs of ``SampleGroups`` in prompt order (never
    fetched by the driver), the prompts of each, and the summary the loop reads."""

    refs: list[ray.ObjectRef]
    prompts: list[list[int]]  # positions in the step's prompt list, per ref
    summary: RolloutSummary


class RolloutPool(WorkerPool):
    """``size`` rollout workers; a prompt list is split into contiguous shards, one per worker."""

    def __init__(
        self,
        make: Callable[[], Any],
        size: int,
        max_restarts: int,
        on_restart: Callable[[Any], None],
    ):
        super().__init__("rollout", make, size, max_restarts, on_restart)

    def generate(
        self, prompts: list[list[int]], prompt_indices: list[int], sampling: dict[str, Any], texts: int = 0
    ) -> Rollouts:
        shards = shard(len(prompts), self.size)
        calls = [
            lambda actor, s=s: actor.generate.options(num_returns=2).remote(
                [prompts[i] for i in s], [prompt_indices[i] for i in s], sampling, max(0, texts - s[0])
            )
            for s in shards
        ]
        # wait for the summaries only; a shard whose worker died is generated again by its replacement
        refs = self.map(calls, lambda out: (out[0], ray.get(out[1])))
        return Rollouts([r for r, _ in refs], shards, RolloutSummary.merge([s for _, s in refs]))

    def update_weights(self, bucket: ray.ObjectRef, version: int) -> None:
        """One bucket of weights to every worker (a replacement gets the buckets sent so far first)."""
        self.map([lambda actor: actor.update_weights.remote(bucket, version)] * self.size)
