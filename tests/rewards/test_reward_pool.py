"""The Ray reward-worker pool: batches spread over workers, whole groups together, merged metrics."""

from __future__ import annotations

import time

import pytest

from actors.reward import RewardWorker, RewardWorkerPool, merge_metrics
from rewards import Sample


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_pool_scores_concurrently_with_metrics(ray_session):
    config = {
        "terms": [
            {"name": "math", "weight": 1.0},
            {"name": "tests.rewards.test_runner:sleepy", "weight": 0.0, "timeout_s": 0.3, "label": "slow"},
            {"name": "evo_cot_length", "weight": 0.5},
        ]
    }
    pool = RewardWorkerPool(config, num_workers=2)
    samples = [
        Sample(prompt=f"q{i % 3}", response=f"\\boxed{{{i % 2}}}", label="1", response_tokens=[0] * (i + 1))
        for i in range(12)
    ]
    t0 = time.perf_counter()
    out = pool.score(samples)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # 12 sleepy calls of 5 s each time out at 0.3 s, concurrently
    assert [o.components["math"].score for o in out] == [float(i % 2) for i in range(12)]
    assert all(o.components["slow"].verdict == "timeout" for o in out)
    # evo_cot_length needs whole groups: q1 is samples 1, 4, 7, 10, all correct, lengths 2, 5, 8, 11.
    assert out[1].components["evo_cot_length"].score == pytest.approx(0.5)
    assert out[10].components["evo_cot_length"].score == pytest.approx(-0.5)
    m = pool.metrics()
    assert m["reward/slow/timeouts"] == 12 and m["reward/math/calls"] == 12 and m["reward/math/errors"] == 0
    assert m["reward/math/latency_mean_s"] > 0
    pool.shutdown()


def test_worker_class_without_ray_and_merge():
    import asyncio

    w = RewardWorker({"terms": [{"name": "math"}]})
    assert asyncio.run(w.score([Sample(response="\\boxed{2}", label="2")]))[0].score == 1.0
    m = merge_metrics(
        [
            {"reward/a/calls": 1, "reward/a/latency_mean_s": 1.0, "reward/a/latency_max_s": 1.0},
            {"reward/a/calls": 3, "reward/a/latency_mean_s": 2.0, "reward/a/latency_max_s": 3.0},
        ]
    )
    assert m == {"reward/a/calls": 4, "reward/a/latency_mean_s": 1.75, "reward/a/latency_max_s": 3.0}
