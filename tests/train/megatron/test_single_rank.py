"""One rank (what ``rlplat run`` starts in its trainer actor): the Megatron model's forward is bitwise the torch
model's — the rollout's — in fp32, bf16 and FP8, and the step matches the torch backend's. ``check_run`` refuses
larger layouts for one actor, with the way to run them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from actors.trainer import TrainerWorker
from rlplat.config import ExperimentConfig
from rlplat.engine.policy import build_policy
from rlplat.train import TrainBatch, Trainer


def _config(precision: str, **trainer) -> dict:
    trainer = {"backend": "megatron", "lr": 1e-3, **trainer}
    cfg = {"model": {"preset": "tiny", "precision": precision}, "trainer": trainer}
    return ExperimentConfig.model_validate(cfg).model_dump(mode="json")


def _batch() -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 512, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 3:9] = True
    rollout = torch.where(mask, -torch.rand(4, 12, generator=g), 0.0)
    return TrainBatch(ids, mask, rollout, group_size=2, rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0]))


# The backward adds a token's k expert-input gradients in another order than the torch model's, so the two
# gradients differ by round-off: g_meg - g_torch = Δ with ‖Δ‖ = ρ‖g‖, and the norms differ by at most that
# (|‖g_meg‖ - ‖g_torch‖| ≤ ‖Δ‖, Cauchy-Schwarz; equality only if Δ were parallel to g). ρ per precision:
# - fp32: one rounding (2^-24) of the sums, carried down the layers: ~1e-7 (measured norm differences ≤ 1e-7).
# - bf16: the same at 2^-8 = 0.4%; measured ρ = 0.8% (AMD EPYC, three batches), norms 0.02-0.2% apart.
# - fp8: every later gradient GEMM quantises its operands in 1x128 tiles scaled by the tile's max, so a
#   rounding difference anywhere in a tile re-rounds the whole tile to e4m3 (2^-4 relative, ~3.6% rms per
#   operand, two per GEMM: ~5%): ρ is FP8's quantisation error, not round-off. Measured ρ = 5.3-5.7%, norms
#   0.3-0.6% apart here and 1.1% on another machine; a 1% bound held only because Δ happened to be nearly
#   orthogonal to g. 10% bounds ρ with margin for the error to grow over the layers.
GRAD_NORM_RTOL = {"fp32": 1e-6, "bf16": 1e-2, "fp8": 1e-1}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_forward_is_bitwise_the_torch_models(one_rank, precision):
    # The worker sets its process's torch thread count (its own Ray actor process, in a run): keep this one's.
    trainer = TrainerWorker(_config(precision), num_threads=torch.get_num_threads()).trainer
    cfg = ExperimentConfig.model_validate(_config(precision))
    torch_trainer = Trainer(
        build_policy(cfg.model), cfg.algo, cfg.trainer.model_copy(update={"backend": "torch"})
    )
    batch = _batch()
    logp, ent = trainer.compute_logprobs(batch)
    ref_logp, ref_ent = torch_trainer.compute_logprobs(batch)
    assert torch.equal(logp, ref_logp) and torch.equal(ent, ref_ent)
    out, ref = trainer.train_step(batch), torch_trainer.train_step(batch)
    assert out["loss"] == ref["loss"] and out["version"] == 1.0
    assert out["grad_norm"] == pytest.approx(ref["grad_norm"], rel=GRAD_NORM_RTOL[precision])
    weights, version = trainer.export_weights()
    ref_weights, _ = torch_trainer.export_weights()
    assert version == 1 and set(weights) == set(ref_weights)
    for name, w in ref_weights.items():
        assert weights[name].dtype == w.dtype


def test_run_preflight_refuses_a_layout_that_does_not_fit_before_any_process_group():
    from rlplat.train.megatron.layout import check_run

    cfg = ExperimentConfig.model_validate(
        {
            "trainer": {"backend": "megatron", "megatron": {"tensor_parallel_size": 3}},
            "workers": {"trainer": {"num": 3}},
        }
    )
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        check_run(cfg)
    assert not dist.is_initialized()
