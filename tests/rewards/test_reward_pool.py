"""Reward workers: samples read from a rollout's object ref, whole groups scored together, and the workers'
call metrics (timeouts, latency) merged over workers for metrics.jsonl."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from actors.reward import RewardPool, RewardWorker, merge_metrics, reward_totals
from actors.rollout import Rollouts, RolloutSummary
from rlplat.data.prompts import PromptItem
from rlplat.train.batch import SampleGroups

N = 4


def samples(answers: list[list[int]], lengths: list[list[int]]) -> tuple[SampleGroups, list[PromptItem]]:
    """One group per entry: responses ``\\boxed{answer}`` of ``lengths`` tokens; every label is 1."""
    texts = [f"\\boxed{{{a}}}" for group in answers for a in group]
    tokens = [[0] * n for group in lengths for n in group]
    packed = SampleGroups.pack(
        [[1, 2]] * len(answers), tokens, [torch.zeros(len(t)) for t in tokens], [0] * len(tokens), texts
    )
    return packed, [PromptItem(f"q{g}", f"q{g}", "1") for g in range(len(answers))]


def test_worker_scores_whole_groups_and_reports_metrics_since_last_call():
    config = {"terms": [{"name": "math", "weight": 1.0}, {"name": "evo_cot_length", "weight": 0.5}]}
    worker = RewardWorker(config)
    packed, items = samples([[0, 1, 1, 1], [1, 1, 1, 1]], [[1, 2, 3, 4], [2, 5, 8, 11]])
    scores = asyncio.run(worker.score_groups(packed, 1, items[1:]))  # the second group only
    # evo_cot_length sees the whole group: the shortest correct answer gets +0.5, the longest -0.5
    assert scores.rewards[0] == pytest.approx(1.25) and scores.rewards[-1] == pytest.approx(0.75)
    assert scores.correct == [True] * N and scores.errors == [False] * N
    assert scores.summary.samples == N and scores.summary.terms["math"].mean == 1.0
    first = worker.take_metrics()
    assert first["reward/math/calls"] == N and first["reward/evo_cot_length/calls"] == 1
    assert "reward/math/calls" not in worker.take_metrics()  # reset by the first report


@pytest.mark.ray
def test_pool_scores_from_refs_concurrently_with_metrics():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = {
            "terms": [
                {"name": "math", "weight": 1.0},
                {
                    "name": "tests.rewards.test_runner:sleepy",
                    "args": {"seconds": 30.0},  # the Ray workers, and their abandoned calls, end at shutdown
                    "weight": 0.0,
                    "timeout_s": 0.3,
                    "label": "slow",
                },
            ]
        }
        actor = ray.remote(RewardWorker).options(num_cpus=0.5)
        pool = RewardPool(lambda: actor.remote(config), 2, max_restarts=0)
        packed, items = samples([[g % 2] * N for g in range(3)], [[1] * N] * 3)
        rollouts = Rollouts([ray.put(packed)], [[0, 1, 2]], RolloutSummary.of(packed, 0))
        pool.take_metrics()  # the workers are up: their start-up is not in the time below
        t0 = time.perf_counter()
        scores = pool.score(rollouts, items)
        # 12 sleepy calls of 30 s each, abandoned at their 0.3 s timeout: far less than one call's sleep
        assert time.perf_counter() - t0 < 15.0
        assert scores.rewards == [float(g % 2) for g in range(3) for _ in range(N)]
        assert scores.errors == [True] * 12 and scores.correct == [False] * 12  # a timeout is no verdict
        # the shards' summaries, merged on the driver: what metrics.jsonl and the run log show
        s = scores.summary
        assert (s.samples, s.errors, s.terms["slow"].timeouts, s.terms["math"].errors) == (12, 12, 12, 0)
        assert s.first_error == "slow: timed out after 0.3s" and s.all_failed
        assert s.terms["math"].mean == pytest.approx(1 / 3) and s.accuracy == 0.0  # groups 0, 1, 0 right
        m = pool.take_metrics()
        assert (
            m["reward/slow/timeouts"] == 12 and m["reward/math/calls"] == 12 and m["reward/math/errors"] == 0
        )
        assert m["reward/timeouts"] == 12 and m["reward/calls"] == 24 and m["reward/latency_max_s"] >= 0.3
        assert pool.take_metrics()["reward/calls"] == 0  # counted once
    finally:
        ray.shutdown()


def test_merge_and_totals():
    m = merge_metrics(
        [
            {"reward/a/calls": 1, "reward/a/latency_mean_s": 1.0, "reward/a/latency_max_s": 1.0},
            {"reward/a/calls": 3, "reward/a/latency_mean_s": 2.0, "reward/a/latency_max_s": 3.0},
        ]
    )
    assert m == {"reward/a/calls": 4, "reward/a/latency_mean_s": 1.75, "reward/a/latency_max_s": 3.0}
    per_term = {"calls": 2, "errors": 1, "timeouts": 0, "latency_mean_s": 0.5, "latency_max_s": 1.0}
    both = {f"reward/{t}/{k}": v for t in ("a", "b") for k, v in per_term.items()}
    both["reward/b/calls"], both["reward/b/latency_max_s"] = 6, 4.0
    totals = reward_totals({**both, "reward/abandoned_threads": 1})
    assert totals == {
        "reward/calls": 8,
        "reward/call_errors": 2,
        "reward/timeouts": 0,
        "reward/latency_mean_s": 0.5,
        "reward/latency_max_s": 4.0,
    }
