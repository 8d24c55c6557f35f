import copy
import itertools

import pytest
import torch

import kernels
from rlplat.algos.config import AlgoConfig
from rlplat.train import NonFiniteError, Trainer, TrainerBackend, TrainerConfig, expert_bias_update
from rlplat.train.trainer import RowProbe

ALGO_METRICS = (
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac_dual",
    "approx_kl",
    "entropy",
    "mismatch_kl",
    "max_abs_dlogp",
)
# eps = 1 makes AdamW's first step ~ lr * g / (|g| + 1), smooth in g, so gradients that agree to fp32
# round-off give updates that agree too (with eps = 1e-8 the update is lr * sign(g) and flips on noise).
SMOOTH = dict(lr=1e-3, eps=1.0, grad_clip=None)


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def assert_same_update(a, b, before, rtol=1e-4, atol=1e-8):
    # atol: a few ulps of weights of size ~0.1 (the update is read back as a difference of weights)
    for name in before:
        da, db = a[name] - before[name], b[name] - before[name]
        torch.testing.assert_close(da, db, rtol=rtol, atol=atol, msg=name)


def test_logprobs_are_the_rollout_forward_bitwise(tiny, make_batch, on_policy):
    batch = make_batch(B=4, T=12)
    expected, _ = copy.deepcopy(tiny).eval().token_logprobs(batch.input_ids_BT, batch.targets_BT)
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(micro_batch_size=1, **SMOOTH))
    logp, _ = trainer.compute_logprobs(batch)
    m = batch.response_mask_BT
    assert torch.equal(logp[m], expected.detach()[m])
    out = trainer.train_step(on_policy(trainer, batch))
    # the training forward (grad on, other micro-batches, trimmed padding) is bitwise the rollout's too
    assert out["max_abs_dlogp"] == 0.0 and out["mismatch_kl"] == 0.0
    assert out["approx_kl"] == 0.0 and out["clip_frac"] == 0.0


def test_step_metrics_version_and_export(tiny, make_batch, on_policy):
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3))
    assert isinstance(trainer, TrainerBackend) and trainer.reference is None
    before = params(trainer)
    out = trainer.train_step(on_policy(trainer, make_batch()))
    for name in (*ALGO_METRICS, "grad_norm", "lr", "tokens", "time_s", "loss", "tokens_per_s"):
        assert name in out and out[name] == out[name], name
    assert out["version"] == 1 and trainer.version == 1 and out["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in params(trainer).items())
    tensors, version = trainer.export_weights()
    assert version == 1 and set(tensors) == set(tiny.state_dict())
    assert "model.layers.1.mlp.gate.expert_bias" in tensors and "lm_head.weight" in tensors
    buckets = list(trainer.export_weight_buckets(max_bytes=1 << 20))
    assert len(buckets) > 1 and [k for b in buckets for k in b] == list(tensors)  # all, once, in order
    for b in buckets:
        size = sum(t.numel() * t.element_size() for t in b.values())
        assert size <= 1 << 20 or len(b) == 1  # only a tensor larger than the bound is a bucket of its own
        for k, t in b.items():
            assert torch.equal(t, tensors[k]) and t.device.type == "cpu"


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_is_a_global_mean(tiny_model, make_batch, mode):
    algo = AlgoConfig(loss_agg_mode=mode)
    batch = make_batch(B=4, T=12)
    base = tiny_model()
    before = {k: v.detach().clone() for k, v in base.named_parameters()}
    results = []
    for cfg in (
        TrainerConfig(micro_batch_size=4, **SMOOTH),
        TrainerConfig(micro_batch_size=1, **SMOOTH),
        TrainerConfig(micro_batch_tokens=20, **SMOOTH),
    ):
        trainer = Trainer(copy.deepcopy(base), algo, cfg)
        out = trainer.train_step(batch)
        results.append((params(trainer), out["loss"]))
    for p, loss in results[1:]:
        assert_same_update(p, results[0][0], before)
        assert loss == pytest.approx(results[0][1], rel=1e-5)


def test_non_finite_loss_refuses_the_step(tiny, make_batch):
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3))
    with torch.no_grad():
        tiny.lm_head.weight[7, 3] = float("nan")
    before = params(trainer)
    with pytest.raises(NonFiniteError, match="loss is NaN"):
        trainer.train_step(make_batch())
    for k, v in params(trainer).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert trainer.version == 0 and trainer.step == 0 and trainer.optimizer.steps == 0


def test_non_finite_gradient_refuses_the_step(tiny, make_batch):
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3))
    bias_before = tiny.model.layers[1].mlp.gate.expert_bias.clone()
    before = params(trainer)
    tiny.model.norm.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match="gradient norm"):
        trainer.train_step(make_batch())
    assert all(torch.equal(v, before[k]) for k, v in params(trainer).items())
    assert torch.equal(tiny.model.layers[1].mlp.gate.expert_bias, bias_before)
    assert trainer.version == 0 and trainer.optimizer.steps == 0
    assert not any(g.any() for g in trainer.optimizer.grads())


def test_bad_samples_error_or_skip_their_group(tiny_model, make_batch):
    batch = make_batch(B=6, T=10, group_size=2)
    batch.rollout_logp_BT[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        Trainer(tiny_model(), AlgoConfig(), TrainerConfig()).train_step(batch)
    trainer = Trainer(tiny_model(), AlgoConfig(), TrainerConfig(bad_samples="skip"))
    out = trainer.train_step(batch)
    assert out["bad_samples_dropped"] == 2 and out["kept_samples"] == 4 and out["loss"] == out["loss"]


def test_dynamic_sampling_drops_zero_variance_groups(tiny, make_batch):
    batch = make_batch(B=4, T=10, group_size=2, rewards_B=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    trainer = Trainer(tiny, AlgoConfig(dynamic_sampling=True), TrainerConfig())
    out = trainer.train_step(batch)
    assert out["dynamic_sampling_dropped"] == 2 and out["kept_samples"] == 2 and trainer.version == 1
    batch.rewards_B = torch.tensor([1.0, 1.0, 0.0, 0.0])
    out = trainer.train_step(batch)
    # a skipped step changes no weight, but it is a step: the lr schedule and checkpoint names count it
    assert out["skipped"] == 1 and trainer.version == 1 and trainer.step == 2


def test_probe_reports_kept_rows_when_filters_drop_some(tiny, make_batch, on_policy):
    # group 1 (rows 2, 3) has zero variance and is dropped; the probed rows around it keep their own tokens
    # (slots were once numbered over every probed row, dropped ones too, and indexed past the probe tensor)
    batch = make_batch(B=6, T=10, group_size=2, rewards_B=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))
    trainer = Trainer(tiny, AlgoConfig(dynamic_sampling=True), TrainerConfig())
    batch = on_policy(trainer, batch)
    logp = batch.rollout_logp_BT.clone()
    probe = RowProbe([5, 2, 0, 5])
    out = trainer.train_step(batch, probe)
    assert out["dynamic_sampling_dropped"] == 2 and probe.tokens[1] is None
    for i, row in ((0, 5), (2, 0), (3, 5)):
        expected = logp[row][batch.response_mask_BT[row]].tolist()
        assert probe.tokens[i]["train_logp"] == expected and probe.tokens[i]["rollout_logp"] == expected


def test_kl_builds_a_frozen_reference(tiny, make_batch):
    algo = AlgoConfig(kl={"mode": "loss", "coef": 0.1})
    trainer = Trainer(tiny, algo, TrainerConfig(lr=1e-2))
    ref_before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    batch = make_batch()
    trainer.train_step(batch)
    out = trainer.train_step(batch)
    assert out["kl_to_ref"] > 0
    assert all(torch.equal(v, ref_before[k]) for k, v in trainer.reference.state_dict().items())


@pytest.mark.parametrize(
    "algo",
    [
        dict(policy_loss="gspo", correction={"method": "token_tis"}),
        dict(policy_loss="lpo", correction={"method": "icepop"}, entropy_coef=0.01),
        dict(
            advantage_estimator="reinforce_pp",
            kl={"mode": "reward", "coef": 0.05},
            correction={"method": "sequence_mis"},
        ),
    ],
)
def test_recipes_run(tiny, make_batch, algo):
    batch = make_batch(B=4, T=10)
    batch.sentence_ids_BT = torch.arange(10).repeat(4, 1) // 3
    out = Trainer(tiny, AlgoConfig(**algo), TrainerConfig(lr=1e-3)).train_step(batch)
    assert out["version"] == 1 and out["loss"] == out["loss"]
    if algo.get("correction", {}).get("method") == "icepop":
        assert 0.0 <= out["icepop_masked_fraction"] <= 1.0


def test_lpo_needs_sentence_ids(tiny, make_batch):
    with pytest.raises(ValueError, match="sentence_ids_BT"):
        Trainer(tiny, AlgoConfig(policy_loss="lpo"), TrainerConfig()).train_step(make_batch())


def test_bf16_trains_with_fp32_master_weights(tiny, make_batch):
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3), precision="bf16")
    trainer.train_step(make_batch(B=2, T=8, group_size=2))
    masters = trainer.optimizer.state_dict()["master"]
    for p, m in zip(trainer.params, masters, strict=True):
        assert m.dtype == torch.float32 and p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
    # the step's updates are kept below bf16's resolution in the masters (else they would be bf16 weights)
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)
    assert tiny.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32


def test_expert_bias_update_hand_computed():
    bias = torch.zeros(4)
    # load [4, 2, 2, 0]: e = 2 - load = [-2, 0, 0, 2], sign [-1, 0, 0, 1], mean 0
    assert expert_bias_update(bias, torch.tensor([4, 2, 2, 0]), 0.1).tolist() == pytest.approx(
        [-0.1, 0, 0, 0.1]
    )
    # load [3, 1, 1, 1]: e = [-1.5, .5, .5, .5], sign [-1, 1, 1, 1], mean 0.5 -> u * [-1.5, .5, .5, .5]
    out = expert_bias_update(bias + 1.0, torch.tensor([3, 1, 1, 1]), 0.01)
    assert out.tolist() == pytest.approx([1 - 0.015, 1.005, 1.005, 1.005])


def test_expert_bias_update_from_token_counts(tiny, make_batch):
    batch = make_batch(B=4, T=12)
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3, expert_bias_update_rate=1e-3))
    before = {n: m.gate.expert_bias.clone() for n, m in trainer.expert_load.moes.items()}
    trainer.train_step(batch)
    k = tiny.config.num_experts_per_tok
    tokens = int((batch.lengths_B - 1).clamp_min(1).sum())
    for name, moe in trainer.expert_load.moes.items():
        counts = trainer.expert_load.counts[name]
        assert int(counts.sum()) == tokens * k  # every real input token, k experts each, no padding
        expected = expert_bias_update(before[name], counts, 1e-3)
        assert torch.equal(moe.gate.expert_bias, expected)
        assert not torch.equal(moe.gate.expert_bias, before[name])


def test_expert_bias_is_off_by_default(tiny, make_batch):
    bias = tiny.model.layers[1].mlp.gate.expert_bias.clone()
    Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3)).train_step(make_batch())
    assert torch.equal(tiny.model.layers[1].mlp.gate.expert_bias, bias)


def test_plain_kernel_mode_is_scoped_to_the_trainer(tiny, make_batch):
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(batch_invariant=False))
    out = trainer.train_step(make_batch())
    assert out["version"] == 1 and kernels.get_mode().batch_invariant


def test_world_size_must_match(tiny):
    with pytest.raises(ValueError, match="dp_world_size"):
        Trainer(tiny, AlgoConfig(), TrainerConfig(dp_world_size=2))


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_learning_rate_schedule(tiny, decay):
    cfg = TrainerConfig(lr=1.0, lr_warmup_steps=2, lr_decay=decay, lr_decay_steps=6, lr_min_ratio=0.1)
    trainer = Trainer(tiny, AlgoConfig(), cfg)
    lrs = []
    for step in range(8):
        trainer.step = step
        lrs.append(trainer._lr())
    assert lrs[:2] == [0.5, 1.0]  # warm-up: step k of 2 at k/2
    if decay == "constant":
        assert lrs[2:] == [1.0] * 6
        return
    assert lrs[5] == pytest.approx(0.1) and lrs[6:] == pytest.approx([0.1, 0.1])  # the floor from step 6 on
    assert all(a > b for a, b in itertools.pairwise(lrs[1:6]))  # strictly down in between
    middle = 0.1 + 0.9 * 0.5  # halfway through the decay (step 4 of 2..6) both shapes are at the midpoint
    assert lrs[3] == pytest.approx(middle)


def test_lr_decay_needs_its_length(tiny):
    with pytest.raises(ValueError, match="lr_decay_steps"):
        TrainerConfig(lr_decay="linear", lr_warmup_steps=5, lr_decay_steps=5)
    with pytest.raises(ValueError, match=r"needs trainer\.lr_decay_steps"):
        Trainer(tiny, AlgoConfig(), TrainerConfig(lr_decay="linear"))


def test_lr_decay_over_the_run_follows_run_steps():
    from rlplat.config import ExperimentConfig, load_config

    cfg = load_config("configs/tiny_math.yaml", ["run.steps=400"])
    assert cfg.trainer.lr_decay == "linear" and cfg.trainer.lr_decay_steps is None  # config.yaml keeps null
    assert cfg.trainer_config().lr_decay_steps == 400
    explicit = load_config("configs/tiny_math.yaml", ["trainer.lr_decay_steps=100"])
    assert explicit.trainer_config().lr_decay_steps == 100
    with pytest.raises(ValueError, match="needs more steps than"):
        ExperimentConfig.model_validate(
            {"run": {"steps": 5}, "trainer": {"lr_decay": "cosine", "lr_warmup_steps": 5}}
        )
