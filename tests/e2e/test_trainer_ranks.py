"""Two data-parallel trainer ranks as two Ray actors in a placement group: they train the step together
(gloo), rank 0 pushes the weights, and the result matches one rank up to fp32 summation order."""

import pytest

from rlplat.config import load_config
from rlplat.controller import Controller
from rlplat.run import tokenizer_dir

pytestmark = pytest.mark.ray


def _run(tmp_path, ranks: int) -> list[dict]:
    cfg = load_config(
        "configs/tiny_math.yaml",
        [
            "run.steps=2",
            "run.eval_every=0",
            "run.checkpoint_every=0",
            "data.prompts_per_step=4",
            "rollout.sampling.n=4",
            "rollout.sampling.max_new_tokens=8",
            f"trainer.dp_world_size={ranks}",
            f"workers.trainer.num={ranks}",
            f"workers.trainer.num_cpus={0.75 / ranks}",
            "wandb.mode=disabled",
        ],
    )
    controller = Controller(cfg, tmp_path, tokenizer_dir(cfg, tmp_path))
    seen = []
    try:
        controller.push_weights()
        controller.run(0, lambda: False, lambda step, m: seen.append(m))
    finally:
        controller.trainer.kill()
        controller.close()
    return seen


def test_two_trainer_ranks_match_one(local_ray, tmp_path):
    one = _run(tmp_path / "one", 1)
    two = _run(tmp_path / "two", 2)
    assert len(two) == 2
    # the first step samples with the same initial weights: same batch, and the same update up to rounding
    assert two[0]["reward/mean"] == one[0]["reward/mean"]
    assert two[0]["train/loss"] == pytest.approx(one[0]["train/loss"], rel=1e-5, abs=1e-7)
    assert two[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=1e-4)
    for m in two:  # the rollout samples with rank 0's weights, which the trainer scores again exactly
        assert m["mismatch/max_abs_dlogp"] == 0.0
