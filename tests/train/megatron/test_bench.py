"""The Megatron benchmark runs end to end on one CPU rank (the GPU figures come from the same code)."""

from __future__ import annotations

import json

import torch.distributed as dist

import kernels


def test_bench_runs_and_reports_alignment(tmp_path, monkeypatch):
    from megatron.core import parallel_state as ps

    from rlplat.bench.megatron import main
    from rlplat.train.dist import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    previous = kernels.get_mode()
    try:
        args = ["--preset", "tiny", "--precisions", "bf16,fp8", "--fp8-recipe", "kernels", "--batch", "2"]
        args += ["--seq-len", "8", "--repeats", "1", "--loss-steps", "4", "--out", str(tmp_path)]
        results = main(args)
    finally:
        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        kernels.restore_mode(previous)
    for precision in ("bf16", "fp8"):
        # one rank, rlplat's kernels on both sides (FP8 too): the trainer computes the rollout's log-probs
        assert results[precision]["alignment"] == {"bitwise": True, "max_abs_dlogp": 0.0, "mismatch_kl": 0.0}
        assert results[precision]["tokens_per_s"] > 0
        assert results[precision]["loss"]["final"] < results[precision]["loss"]["initial"]
    assert "final_loss_relative_gap" in results["fp8_vs_bf16"]
    (written,) = tmp_path.glob("megatron_train-*.json")
    doc = json.loads(written.read_text())
    assert doc["hardware"]["torch"] and doc["preset"] == "tiny" and doc["world"] == 1
