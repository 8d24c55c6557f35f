"""Weights leave the Megatron backend exactly: export in HF names (whole or in bounded buckets), sharded
checkpoints that resume bitwise and convert to HF, and a refusal to resume under other parallel sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlplat.models import load_pretrained
from rlplat.train.megatron.convert import megatron_to_hf
from rlplat.train.megatron.layout import ParallelLayout, check_checkpoint_layout

LAYOUTS = ("tp2", "ep2", "tp2ep2", "dp2")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_is_the_hf_weights_exactly(runs, reference, layout):
    before = runs.trainer(layout)["before"]
    assert set(before) == set(reference.before)
    for name, w in reference.before.items():
        assert before[name].dtype == w.dtype and torch.equal(before[name], w), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_buckets_are_bounded_and_complete(runs, reference, layout):
    buckets = runs.trainer(layout)["buckets"]  # names per bucket, exported with max_bytes=200_000
    names = [n for b in buckets for n in b]
    assert sorted(names) == sorted(reference.after) and len(names) == len(set(names))
    nbytes = {n: t.numel() * t.element_size() for n, t in reference.after.items()}
    assert len(buckets) > 1
    for b in buckets:
        assert len(b) == 1 or sum(nbytes[n] for n in b) <= 200_000


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_resumes_bitwise(runs, layout):
    r = runs.trainer(layout)
    assert r["position"] == {"next": 3} and r["restored_version"] == 1
    for name, w in r["after"].items():
        assert torch.equal(r["restored"][name], w), name
    assert torch.equal(r["logp_restored"], r["logp1"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_converts_to_hf(runs, layout, tmp_path):
    ckpt = Path(runs.trainer(layout)["ckpt"])
    model = load_pretrained(megatron_to_hf(ckpt, tmp_path / "hf"))
    after = runs.trainer(layout)["after"]
    state = model.state_dict()
    assert set(state) == set(after)
    for name, w in after.items():
        assert torch.equal(state[name], w), name


def test_checkpoint_resumes_under_another_data_parallel_size(runs, one_rank):
    """The dp2 run's checkpoint holds the optimizer state whole (gathered from both ranks' halves): one process
    loads it and takes the second step the torch Trainer takes (AdamW's second step reads both moments)."""
    from rlplat.models.config import RingLinearConfig
    from rlplat.train import Trainer, TrainerConfig, load_checkpoint
    from rlplat.train.config import MegatronConfig
    from rlplat.train.megatron.trainer import MegatronTrainer, init_megatron

    batch = runs.batch()
    torch_trainer = Trainer(load_pretrained(runs.hf_dir), None, TrainerConfig(**runs.opt))
    for _ in range(2):
        torch_trainer.train_step(batch)
    expected, _ = torch_trainer.export_weights()

    tcfg = TrainerConfig(backend="megatron", megatron=MegatronConfig(), **runs.opt)
    init_megatron(RingLinearConfig.from_json(runs.hf_dir / "config.json"), tcfg, rank=0, world_size=1)
    trainer = MegatronTrainer(runs.hf_dir, None, tcfg, precision="fp32")
    load_checkpoint(trainer, runs.trainer("dp2")["ckpt"])
    trainer.train_step(batch)
    got, version = trainer.export_weights()
    assert version == 2
    first = runs.trainer("dp2")["after"]
    for name, w in expected.items():
        step, ref_step = got[name] - first[name], w - first[name]
        tol = 1e-4 * float(ref_step.abs().max()) + 2.5e-7  # as test_train_step_matches_torch_trainer
        torch.testing.assert_close(step, ref_step, rtol=0, atol=tol, msg=name)


def test_checkpoint_under_other_sizes_is_refused(runs):
    ckpt = Path(runs.trainer("tp2")["ckpt"])
    check_checkpoint_layout(ckpt, ParallelLayout(tp=2, ep=1, dp=1))
    with pytest.raises(ValueError, match=r"saved with tensor_parallel_size=2.*this run uses 1.*convert"):
        check_checkpoint_layout(ckpt, ParallelLayout(tp=1, ep=1, dp=2))
    with pytest.raises(ValueError, match="expert_parallel_size=1"):
        check_checkpoint_layout(ckpt, ParallelLayout(tp=2, ep=2, dp=1))


def test_checkpoint_is_found_by_resume_and_refused_by_the_torch_backend(runs):
    from rlplat.train import Trainer, latest_checkpoint, load_checkpoint

    ckpt = Path(runs.trainer("ep2")["ckpt"])
    assert latest_checkpoint(ckpt.parent) == ckpt  # what `rlplat run --resume` and trainer restarts use
    assert not (ckpt / "trainer.pt").exists()  # found through the commit's meta.json, not a stand-in file
    with pytest.raises(ValueError, match="not written by the torch trainer"):
        load_checkpoint(Trainer(load_pretrained(runs.hf_dir)), ckpt)
