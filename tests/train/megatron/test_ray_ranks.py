"""``rlplat run``'s path for a multi-rank Megatron layout: one trainer actor per rank in a placement group
(``actors.trainer.TrainerGroup``), TP=2 on gloo. Every rank takes every call; rank 0 pushes HF-named
weights to the rollout worker. The CPU shim reaches the actors' processes through Ray's
``worker_process_setup_hook``, so the library itself carries no CPU accommodation."""

import pytest

from rlplat.config import load_config
from rlplat.run import preflight

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_with_shim(monkeypatch):
    import ray

    def install_shim():  # pickled by value into every Ray worker
        import torch

        if not torch.cuda.is_available():
            torch.cuda.current_device = lambda: torch.device("cpu")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance, whatever cluster the shell names
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": install_shim})
    yield
    ray.shutdown()


def test_tensor_parallel_trainer_ranks_as_ray_actors(ray_with_shim, tmp_path, run_controller):
    overrides = [
        "run.steps=2",
        "run.checkpoint_every=1",
        "trainer.backend=megatron",
        "trainer.megatron.tensor_parallel_size=2",
        "workers.trainer.num=2",
        "workers.trainer.num_cpus=0.375",
    ]
    preflight(load_config("configs/tiny_math.yaml", overrides))
    _, lines = run_controller(tmp_path, overrides)
    assert len(lines) == 2 and (tmp_path / "checkpoints" / "latest").exists()
    for _, m in lines:
        assert m["samples/scored"] == 16 and m["train/tokens"] > 0
        # tensor-parallel sums round differently from the rollout's single-device forward, within fp32 noise
        assert m["mismatch/max_abs_dlogp"] < 1e-4
