"""Deliberate misalignment (issue 15): a rollout side with its own precision and kernel mode, measured by the
log-prob mismatch and by routing disagreement; routing records round-trip from engine to trainer batch."""

import pytest
import torch

import kernels
from rlplat.algos.config import AlgoConfig
from rlplat.config import ExperimentConfig, ModelSection
from rlplat.engine import AlignmentConfig, NativeEngine, SamplingParams, build_policy
from rlplat.engine.alignment import alignment_requests, check_alignment
from rlplat.engine.backend import make_backend
from rlplat.engine.config import RolloutConfig
from rlplat.models.precision import precision_of
from rlplat.models.routing import routing_differs
from rlplat.train.batch import SampleGroups, TrainBatch
from rlplat.train.config import TrainerConfig
from rlplat.train.trainer import Trainer

SMALL = AlignmentConfig(num_prompts=3, n=2, prompt_length=(2, 10), max_new_tokens=(3, 6), seed=5)
TINY = ModelSection(preset="tiny", precision="fp32", seed=0)


def _requests():
    return alignment_requests(SMALL, SamplingParams(), vocab_size=512, special_ids=[0, 1])


def test_bf16_plain_rollout_against_fp32_trainer_mismatches_and_exact_does_not():
    prompts, params = _requests()
    exact_cfg = ExperimentConfig(model=TINY)
    exact = check_alignment(
        make_backend(exact_cfg), build_policy(TINY), prompts, params,
        rollout_batch_invariant=True, trainer_batch_invariant=True,
    )  # fmt: skip
    assert exact["exact"] and exact["mismatch_kl"] == 0.0

    cfg = ExperimentConfig(model=TINY, rollout=RolloutConfig(precision="bf16", batch_invariant=False))
    backend = make_backend(cfg)
    assert precision_of(backend.model) == "bf16"
    report = check_alignment(
        backend, build_policy(TINY), prompts, params,
        rollout_batch_invariant=cfg.rollout_batch_invariant(), trainer_batch_invariant=cfg.trainer_batch_invariant(),
    )  # fmt: skip
    assert not report["exact"] and report["max_abs_logprob_diff"] > 1e-3 and report["mismatch_kl"] > 0


def test_weight_sync_converts_into_a_rollout_of_another_precision():
    trainer = build_policy(TINY)
    for precision in ("bf16", "fp8"):
        engine = make_backend(ExperimentConfig(model=TINY, rollout=RolloutConfig(precision=precision)))
        with torch.no_grad():
            named = {k: v + 0.01 if v.is_floating_point() else v for k, v in trainer.state_dict().items()}
        engine.update_weights(named, 1)
        target = engine.model.state_dict()
        for name, value in named.items():
            assert target[name].dtype == (torch.float32 if "expert_bias" in name else torch.bfloat16)
            assert torch.equal(target[name], value.to(target[name].dtype)), name
        assert precision_of(engine.model) == precision


def _samples(engine: NativeEngine):
    prompts, params = _requests()
    groups = engine.generate(prompts, params)
    flat = [s for g in groups for s in g]
    return prompts, flat


def test_routing_round_trips_and_agrees_bitwise_in_the_exact_setting():
    engine = NativeEngine(build_policy(TINY), max_batch_size=3, record_routing=True)
    prompts, flat = _samples(engine)
    L, k = 3, 4  # the tiny preset: 4 layers, the first dense; 4 experts per token
    for s in flat:
        assert s.routes.shape == (len(s.tokens), L, k) and s.routes.dtype == torch.int16
    packed = SampleGroups.pack(
        prompts, [s.tokens for s in flat], [s.logprobs for s in flat], [0] * len(flat),
        routes=[s.routes for s in flat],
    )  # fmt: skip
    batch = TrainBatch.from_groups([packed], torch.arange(len(flat), dtype=torch.float32) % 2)
    assert torch.equal(batch.rollout_routes_BTLk[batch.response_mask_BT], torch.cat([s.routes for s in flat]))
    trainer = Trainer(build_policy(TINY), AlgoConfig(), TrainerConfig(micro_batch_size=2))
    out = trainer.train_step(batch)
    assert out["routing_disagreement"] == 0.0 and out["max_abs_dlogp"] == 0.0


def test_routing_disagrees_with_a_bf16_plain_rollout():
    cfg = ExperimentConfig(
        model=TINY, rollout=RolloutConfig(precision="bf16", batch_invariant=False, record_routing=True)
    )
    engine = make_backend(cfg)
    with kernels.kernel_mode(batch_invariant=False):
        prompts, flat = _samples(engine)
    packed = SampleGroups.pack(
        prompts, [s.tokens for s in flat], [s.logprobs for s in flat], [0] * len(flat),
        routes=[s.routes for s in flat],
    )  # fmt: skip
    batch = TrainBatch.from_groups([packed], torch.arange(len(flat), dtype=torch.float32) % 2)
    out = Trainer(build_policy(TINY), AlgoConfig(), TrainerConfig()).train_step(batch)
    assert 0.0 < out["routing_disagreement"] < 1.0 and out["max_abs_dlogp"] > 0


def test_routing_differs_compares_sets_not_order():
    a = torch.tensor([[[1, 2, 3, 4]], [[1, 2, 3, 4]]])
    b = torch.tensor([[[4, 3, 2, 1]], [[1, 2, 3, 5]]])
    assert routing_differs(a, b).tolist() == [[False], [True]]
    with pytest.raises(ValueError, match="differ"):
        routing_differs(a, b[:1])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rollout": {"backend": "vllm", "record_routing": True}}, "record_routing needs the native backend"),
        ({"model": {"precision": "bf16"}, "rollout": {"precision": "fp32"}}, "finer than the trainer"),
        ({"model": {"precision": "fp8"}, "rollout": {"precision": "bf16"}}, "finer than the trainer"),
    ],
)
def test_nonsense_rollout_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.model_validate(changes)


def test_rollout_settings_default_to_the_trainers():
    cfg = ExperimentConfig.model_validate(
        {"model": {"precision": "bf16"}, "kernels": {"batch_invariant": False}}
    )
    assert cfg.rollout_precision() == "bf16" and cfg.rollout_batch_invariant() is False
    cfg = ExperimentConfig.model_validate({"rollout": {"precision": "fp8", "batch_invariant": False}})
    assert (
        cfg.rollout_precision() == "fp8"
        and not cfg.rollout_batch_invariant()
        and cfg.trainer_batch_invariant()
    )
