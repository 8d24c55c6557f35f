"""A step's samples stay off the driver, and a step makes one call to the trainer ranks plus the weight push.

The driver's ``ray.get`` and ``ray.put`` and every actor call it makes are recorded while the loop runs: no
value the driver fetches or puts is a batch of samples, and the trainer ranks see ``train_step`` and
``weight_buckets`` once per step (no separate version or log-prob calls)."""

from collections import Counter

import pytest
import ray
import torch
from ray.actor import ActorMethod

from rlplat.train.batch import SampleGroups, TrainBatch

pytestmark = pytest.mark.ray
STEPS = 3


def test_samples_stay_off_the_driver(local_ray, tmp_path, run_controller, monkeypatch):
    fetched, put, calls = [], [], Counter()
    real_get, real_put, real_remote = ray.get, ray.put, ActorMethod._remote

    def get(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        fetched.extend(out if isinstance(out, list) else [out])
        return out

    def put_once(value, *args, **kwargs):
        put.append(value)
        return real_put(value, *args, **kwargs)

    def remote(self, *args, **kwargs):
        calls[self._method_name] += 1
        return real_remote(self, *args, **kwargs)

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "put", put_once)
    monkeypatch.setattr(ActorMethod, "_remote", remote)
    _, lines = run_controller(tmp_path, [f"run.steps={STEPS}", "run.checkpoint_every=0"])
    assert len(lines) == STEPS and all(m["mismatch/max_abs_dlogp"] == 0.0 for _, m in lines)

    assert not [x for x in fetched if isinstance(x, SampleGroups | TrainBatch | torch.Tensor)]
    # what the driver puts: the step's rewards and correctness, once for every trainer rank
    assert len(put) == STEPS and all(isinstance(x, tuple) and len(x[0]) == 16 for x in put)
    # per step: one RL step and one weight push (plus the push before the first step and the final checkpoint)
    assert calls["train_step"] == STEPS and calls["weight_buckets"] == STEPS + 1
    assert calls["save_checkpoint"] == 1 and calls["generate"] == STEPS and calls["score_groups"] == STEPS
