"""The GPU-only production config and launch templates are validated here, though they cannot run on CPU."""

import subprocess
from pathlib import Path

import yaml

from rlplat.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_ring_mini_gsm8k_config():
    cfg = load_config(ROOT / "configs/ring_mini_linear_gsm8k.yaml")
    assert cfg.model.path and cfg.model.precision == "fp8"
    assert cfg.rollout.backend == "vllm" and cfg.kernels.batch_invariant
    assert cfg.workers.trainer.num == cfg.trainer.dp_world_size and cfg.workers.trainer.num_gpus == 1
    assert cfg.data.source == "jsonl" and "{question}" in cfg.data.prompt_template
    assert "{}" in cfg.data.prompt_template.format(question="q")  # the escaped \\boxed{} survives formatting


def test_launch_templates_parse():
    for name in ("ray_cluster.yaml", "kuberay_rayjob.yaml"):
        doc = yaml.safe_load((ROOT / "launch" / name).read_text())
        assert doc
    job = yaml.safe_load((ROOT / "launch/kuberay_rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("rlplat run configs/")
    assert subprocess.run(["bash", "-n", str(ROOT / "launch/slurm_ray.sbatch")]).returncode == 0
