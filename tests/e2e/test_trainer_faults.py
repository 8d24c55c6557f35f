"""A trainer killed mid-run is replaced from the latest checkpoint, and the steps since then are trained again
on the same samples: regenerated in sync mode, read back from the Redis stream's pending entries in async
mode. Nothing is lost and nothing is trained twice into the final weights."""

import json

import pytest
import ray
import redis

pytestmark = pytest.mark.ray

STEPS, PROMPTS, N = 6, 4, 4
SAME_SAMPLES = ("reward/mean", "samples/scored", "response/tokens", "accuracy/train")


def _run_killing_trainer(run_controller, run_dir, mode: str, redis_url: str | None, kill_after_step: int):
    overrides = [f"run.steps={STEPS}", "run.checkpoint_every=2", f"run.mode={mode}"]
    if redis_url is not None:
        overrides.append(f"redis.url={redis_url}")
    stream_key = []

    def kill(controller, step):
        if controller.source is not None and not stream_key:
            stream_key.append(controller.source.stream.cfg.stream)
        if step == kill_after_step and controller.trainer_restarts == 0:
            ray.kill(controller.trainer.actors[-1], no_restart=True)

    controller, lines = run_controller(run_dir, overrides, kill)
    return controller, lines, (stream_key or [None])[0]


def _check_replay(controller, lines, kill_after_step):
    # checkpoints after steps 1, 3, 5: a kill after step 2 loses step 2 (trained, not committed) and the
    # attempt at step 3; both are trained again from the step-1 checkpoint.
    assert controller.trainer_restarts == 1
    assert [s for s, _ in lines] == [0, 1, 2, 2, 3, 4, 5]
    (first, again) = [m for s, m in lines if s == kill_after_step]
    for key in (*SAME_SAMPLES, "train/loss", "train/grad_norm"):
        assert first[key] == again[key], key  # same samples, same weights: bitwise the same step
    assert again["faults/trainer_restarts"] == 1
    for _, m in lines:
        assert m["prompts/issued"] == m["prompts/scored"] == PROMPTS
        assert m["samples/scored"] == PROMPTS * N
        assert m["mismatch/max_abs_dlogp"] == 0.0  # the replacement's weights reached the rollout workers


def test_sync_trainer_killed_is_replaced_from_checkpoint(local_ray, tmp_path, run_controller):
    controller, lines, _ = _run_killing_trainer(run_controller, tmp_path, "sync", None, kill_after_step=2)
    _check_replay(controller, lines, 2)


@pytest.mark.redis
def test_async_trainer_killed_loses_no_sample(local_ray, tmp_path, redis_server_url, run_controller):
    controller, lines, key = _run_killing_trainer(run_controller, tmp_path, "async", redis_server_url, 2)
    _check_replay(controller, lines, 2)
    last = lines[-1][1]
    total = STEPS * PROMPTS * N
    # every sample published once and acked once; the replayed ones came back from the pending list
    assert last["stream/published"] == total
    assert last["stream/acked"] == total
    assert last["stream/recovered"] >= PROMPTS * N  # at least step 2's samples, maybe the ones read ahead
    assert last["stream/pending"] == 0 and last["stream/undelivered"] == 0
    assert all(m["samples/staleness_max"] <= 1 for _, m in lines)
    client = redis.Redis.from_url(redis_server_url)
    try:
        assert client.xlen(key) == total
        assert client.xpending(key, "trainer")["pending"] == 0
        assert int(client.get(f"{key}:last_step")) == STEPS - 1
        steps = [json.loads(f[b"sample"])["step"] for _, f in client.xrange(key)]
        assert steps == sorted(steps) and all(steps.count(k) == PROMPTS * N for k in range(STEPS))
    finally:
        client.close()
