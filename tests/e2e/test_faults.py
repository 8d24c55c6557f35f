"""Workers killed mid-step are replaced, their prompts re-issued, and every prompt is scored exactly once."""

import threading
import time

import pytest
import ray

from rlplat.config import load_config
from rlplat.controller import Controller, ProgressHooks
from rlplat.run import tokenizer_dir

pytestmark = pytest.mark.ray


def test_killed_rollout_and_reward_workers_are_replaced(local_ray, tmp_path):
    cfg = load_config(
        "configs/tiny_math.yaml",
        [
            "run.steps=4",
            "run.warm_start_steps=0",
            "run.eval_every=0",
            "run.checkpoint_every=0",
            "data.prompts_per_step=4",
            "rollout.sampling.n=4",
            "rollout.sampling.max_new_tokens=16",
            "workers.rollout.num_cpus=0.5",
            "workers.rollout.num=2",
            "wandb.mode=disabled",
        ],
    )
    controller = Controller(cfg, tmp_path, tokenizer_dir(cfg, tmp_path))
    seen = []

    def kill_soon(pool, delay):
        # fired from step 1's callback: lands while step 2's calls are in flight (or just before them)
        threading.Timer(delay, lambda: ray.kill(pool.actors[0], no_restart=True)).start()

    def on_step(step, metrics):
        seen.append(metrics)
        if step == 0:
            kill_soon(controller.rollout, 0.05)
        if step == 1:
            kill_soon(controller.rewards, 0.3)

    try:
        assert controller.run(False, lambda: False, ProgressHooks(step=on_step)) == 4
        time.sleep(0.1)
        assert controller.rollout.restarts >= 1 and controller.rewards.restarts >= 1
        for m in seen:
            assert m["prompts/issued"] == m["prompts/scored"] == 4
            assert m["samples/scored"] == 16
        assert seen[-1]["faults/rollout_restarts"] >= 1 and seen[-1]["faults/reward_restarts"] >= 1
        assert all(m["mismatch/max_abs_dlogp"] == 0.0 for m in seen)  # replacements got the current weights
    finally:
        controller.close()
