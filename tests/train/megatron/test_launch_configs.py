"""The Megatron launch configs validate and their parallel layouts fit the released model shapes (checked here
against the presets of the same shapes; the GPU and Transformer Engine checks are for the launch machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlplat.config import load_config
from rlplat.models import preset
from rlplat.train.megatron.layout import check_layout

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("name", "model", "ranks"),
    [
        ("ring_mini_linear_megatron.yaml", "ring-mini-linear-2.0", 4),
        ("ring_flash_linear_megatron.yaml", "ring-flash-linear-2.0", 32),
    ],
)
def test_megatron_launch_config(name, model, ranks):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.trainer.backend == "megatron" and cfg.model.path
    assert cfg.model.precision == "fp8" and cfg.trainer.megatron.fp8_recipe == "te_blockwise"
    assert cfg.rollout.backend == "vllm" and cfg.kernels.batch_invariant
    lay = check_layout(
        preset(model), cfg.trainer, precision=cfg.model.precision, world_size=ranks, hardware=False
    )
    assert lay.world == ranks == cfg.workers.trainer.num and cfg.workers.trainer.num_gpus == 1
    assert lay.ep > 1  # the experts are what does not fit one GPU
    assert "{}" in cfg.data.prompt_template.format(question="q")


def test_flash_config_spans_nodes():
    cfg = load_config(ROOT / "configs/ring_flash_linear_megatron.yaml")
    assert cfg.trainer.megatron.pipeline_parallel_size > 1  # stages across nodes, tensor parallel inside one
    gpus = (
        cfg.workers.trainer.num * cfg.workers.trainer.num_gpus
        + cfg.workers.rollout.num * cfg.workers.rollout.num_gpus
    )
    assert gpus > 8
