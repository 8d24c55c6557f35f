"""Reward workers: one Ray actor class for the role, a thin shell over ``rewards.runner.RewardRunner``.

``RewardWorker`` is an async actor, so several batches can be in flight in one worker and a slow reward call
(a code run, a judge request) only occupies its own task. ``RewardWorkerPool`` spreads a batch over the
workers by prompt group (a group reward must see the whole group) and gathers the results in order;
``metrics()`` merges per-reward call, error, timeout and latency counts across workers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rewards.api import Sample
from rewards.runner import RewardRunner, ScoredSample, group_key
from rlplat.reward_config import RewardsConfig


class RewardWorker:
    """Scores batches with the configured rewards. Use through ``ray.remote`` (see ``RewardWorkerPool``)."""

    def __init__(self, config: dict[str, Any] | RewardsConfig):
        self.runner = RewardRunner(
            config if isinstance(config, RewardsConfig) else RewardsConfig.model_validate(config)
        )

    async def score(self, samples: list[Sample]) -> list[ScoredSample]:
        return await self.runner.ascore(samples)

    def metrics(self) -> dict[str, float]:
        return self.runner.metrics()

    def ping(self) -> str:
        return "ok"


def merge_metrics(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """Sum counts, take the max of maxima, and weight mean latencies/scores by calls."""
    out: dict[str, float] = defaultdict(float)
    weighted: dict[str, float] = defaultdict(float)
    for m in per_worker:
        for k, v in m.items():
            if k.endswith(("_mean_s", "score_mean")):
                calls = m.get(k.rsplit("/", 1)[0] + "/calls", 0)
                weighted[k] += v * calls
            elif k.endswith("_max_s"):
                out[k] = max(out[k], v)
            else:
                out[k] += v
    for k, total in weighted.items():
        calls = out.get(k.rsplit("/", 1)[0] + "/calls", 0)
        out[k] = total / calls if calls else 0.0
    return dict(out)


class RewardWorkerPool:
    """``num_workers`` RewardWorker actors; ``score(samples)`` returns one ScoredSample per sample, in order."""

    def __init__(
        self, config: dict[str, Any] | RewardsConfig, num_workers: int | None = None, num_cpus: float = 1.0
    ):
        import ray

        cfg = config if isinstance(config, RewardsConfig) else RewardsConfig.model_validate(config)
        n = num_workers or cfg.num_workers
        if n < 1:
            raise ValueError(f"num_workers must be >= 1, got {n}")
        actor = ray.remote(num_cpus=num_cpus)(RewardWorker)
        self.workers = [actor.remote(cfg.model_dump()) for _ in range(n)]
        ray.get([w.ping.remote() for w in self.workers])

    def submit(self, samples: list[Sample]) -> tuple[list[Any], list[list[int]]]:
        """Start scoring; returns (object refs, sample indices per ref). Whole groups go to one worker."""
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            groups[group_key(s) if isinstance(s, Sample) else ("bad", i)].append(i)
        shards: list[list[int]] = [[] for _ in self.workers]
        for idx in sorted(groups.values(), key=len, reverse=True):
            min(shards, key=len).extend(idx)
        refs, index = [], []
        for w, shard in zip(self.workers, shards):
            if shard:
                refs.append(w.score.remote([samples[i] for i in shard]))
                index.append(shard)
        return refs, index

    def score(self, samples: list[Sample]) -> list[ScoredSample]:
        import ray

        refs, index = self.submit(samples)
        out: list[ScoredSample | None] = [None] * len(samples)
        for shard, results in zip(index, ray.get(refs)):
            for i, r in zip(shard, results):
                out[i] = r
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, float]:
        import ray

        return merge_metrics(ray.get([w.metrics.remote() for w in self.workers]))

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
