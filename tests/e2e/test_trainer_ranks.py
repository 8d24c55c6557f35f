"""Two data-parallel trainer ranks as two Ray actors in a placement group: they train the step together
(gloo), rank 0 pushes the weights, and the result matches one rank up to fp32 summation order."""

import pytest

pytestmark = pytest.mark.ray


def test_two_trainer_ranks_match_one(local_ray, tmp_path, run_controller):
    def ranks(n):
        extra = [
            f"trainer.dp_world_size={n}",
            f"workers.trainer.num={n}",
            f"workers.trainer.num_cpus={0.75 / n}",
            "trainer.weight_sync_bucket_mb=1",  # the tiny model's ~7 MiB reach the rollout in several buckets
        ]
        controller, lines = run_controller(
            tmp_path / str(n), ["run.steps=2", "run.checkpoint_every=0", *extra]
        )
        assert len(controller.weight_refs) > 4
        return [m for _, m in lines]

    one, two = ranks(1), ranks(2)
    assert len(two) == 2
    # the first step samples with the same initial weights: same batch, and the same update up to rounding
    assert two[0]["reward/mean"] == one[0]["reward/mean"]
    assert two[0]["train/loss"] == pytest.approx(one[0]["train/loss"], rel=1e-5, abs=1e-7)
    assert two[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=1e-4)
    for m in two:  # the rollout samples with rank 0's weights, which the trainer scores again exactly
        assert m["mismatch/max_abs_dlogp"] == 0.0
