"""Reward workers: one Ray actor class for the role, a thin shell over ``rewards.runner.RewardRunner``, and
``RewardPool``, the driver's typed handle on them.

``RewardWorker`` is an async actor, so several batches can be in flight in one worker and a slow reward call
(a code run, a judge request) only occupies its own task. It reads the samples straight from the rollout
worker's object ref and returns only scores and their summary (``Scores``); whole groups go to one call (a group reward must see the whole
group). ``RewardPool.take_metrics`` merges the workers' per-reward call, error, timeout and latency counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.pool import WorkerPool, shard
from actors.rollout import Rollouts
from rewards.api import Sample
from rewards.runner import RewardRunner, ScoredSample
from rewards.summary import RewardSummary, summarize
from rlplat.data.prompts import PromptItem
from rlplat.reward_config import RewardsConfig
from rlplat.train.batch import SampleGroups


@dataclass
class Scores:
    """Per sample, in order: the combined reward, the accuracy verdict (``ScoredSample.correct``: None when
    no reward term counts toward accuracy) and whether a reward erred; and the batch's ``RewardSummary``
    (per-term means, error and timeout counts, the first error's text). Per-sample error texts and the
    rewards' ``info`` stay on the worker: the summary is all the driver reports."""

    rewards: list[float]
    correct: list[bool | None]
    errors: list[bool]
    summary: RewardSummary

    @staticmethod
    def of(scored: list[ScoredSample]) -> Scores:
        return Scores(
            [x.score for x in scored],
            [x.correct for x in scored],
            [bool(x.errors) for x in scored],
            summarize(scored),
        )

    @staticmethod
    def merge(parts: list[Scores]) -> Scores:
        return Scores(
            [x for p in parts for x in p.rewards],
            [x for p in parts for x in p.correct],
            [x for p in parts for x in p.errors],
            RewardSummary.merge([p.summary for p in parts]),
        )


class RewardWorker:
    """Scores groups of samples with the configured rewards."""

    def __init__(self, config: dict[str, Any] | RewardsConfig):
        self.runner = RewardRunner(
            config if isinstance(config, RewardsConfig) else RewardsConfig.model_validate(config)
        )

    async def score_groups(self, samples: SampleGroups, first: int, items: list[PromptItem]) -> Scores:
        """Scores of groups ``first`` .. ``first + len(items) - 1`` of ``samples``, whose prompts are ``items``."""
        n = samples.group_size
        lo, hi = first * n, (first + len(items)) * n
        tokens = samples.responses()[lo:hi]
        texts = (samples.texts or [""] * len(samples.response_lengths_S))[lo:hi]
        batch = [
            Sample(
                prompt=item.question,
                response=texts[k * n + j],
                response_tokens=tokens[k * n + j],
                label=item.answer,
                metadata={"group_id": item.id},
            )
            for k, item in enumerate(items)
            for j in range(n)
        ]
        return Scores.of(await self.runner.ascore(batch))

    def take_metrics(self) -> dict[str, float]:
        """The runner's counts since the last call (then reset); ``reward/abandoned_threads`` is cumulative."""
        metrics = self.runner.metrics()
        self.runner.reset_metrics()
        return metrics


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


def reward_totals(merged: dict[str, float]) -> dict[str, float]:
    """Over every reward term: calls, erring calls, timeouts and latency (the dashboard's reward charts)."""
    terms = {k.removesuffix("/calls") for k in merged if k.count("/") == 2 and k.endswith("/calls")}
    calls = sum(merged[f"{t}/calls"] for t in terms)
    return {
        "reward/calls": calls,
        "reward/call_errors": sum(merged[f"{t}/errors"] for t in terms),
        "reward/timeouts": sum(merged[f"{t}/timeouts"] for t in terms),
        "reward/latency_mean_s": (
            sum(merged[f"{t}/latency_mean_s"] * merged[f"{t}/calls"] for t in terms) / calls if calls else 0.0
        ),
        "reward/latency_max_s": max((merged[f"{t}/latency_max_s"] for t in terms), default=0.0),
    }


class RewardPool(WorkerPool):
    """``size`` reward workers; each rollout shard's groups are split over them."""

    def __init__(self, make: Callable[[], Any], size: int, max_restarts: int):
        super().__init__("reward", make, size, max_restarts)

    def score(self, rollouts: Rollouts, items: list[PromptItem]) -> Scores:
        """Scores of every sample of ``rollouts`` (whose prompts are ``items``), in order."""
        pieces = max(1, self.size // len(rollouts.refs))
        calls = [
            lambda actor, ref=ref, part=part, prompts=prompts: actor.score_groups.remote(
                ref, part[0], [items[prompts[i]] for i in part]
            )
            for ref, prompts in zip(rollouts.refs, rollouts.prompts, strict=True)
            for part in shard(len(prompts), pieces)
        ]
        return Scores.merge(self.map(calls))

    def take_metrics(self) -> dict[str, float]:
        """The workers' reward metrics since the last call, merged, with their totals over reward terms."""
        merged = merge_metrics(self.map([lambda actor: actor.take_metrics.remote()] * self.size))
        return {**merged, **reward_totals(merged)}
