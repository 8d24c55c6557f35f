"""Tensor, expert and pipeline parallelism change where the maths runs, not its result: each layout of the
two-process gloo runs against the single-process model and Trainer on the same weights and batch (fp32).

Tolerances: a row-parallel GEMM sums its reduction in tp partial sums, and gradients of replicated tensors
are summed over ranks in another order, so those differ from one process by fp32 round-off (≤ 1e-5 relative
to the tensor's largest gradient here; the bound below leaves 10x). Under expert parallelism alone every
per-token op is unsplit, so the forward is bitwise the single-process one; so it is under pipeline
parallelism, where only the place of the layers changes (hidden states cross stages exactly).
"""

from __future__ import annotations

import pytest
import torch

LAYOUTS = ("tp2", "ep2", "tp2ep2")  # (tensor, expert, data) = (2, 1, 1), (1, 2, 2), (2, 2, 1)
# and (pipeline) = 2: a stage has no forward of its own, so trainer level; and (data) = 2 alone, where dense
# tensors and experts shard their optimizer state over two groups of the same two ranks
TRAINER_LAYOUTS = (*LAYOUTS, "pp2", "dp2")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the tensor's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_logprobs_match_one_process(runs, reference, layout):
    r = runs.module(layout)
    logp = torch.full_like(reference.logp, float("nan"))
    for rows, part in r["logp"]:
        logp[rows] = part
    assert torch.isfinite(logp).all(), "some rows were not computed by any data-parallel rank"
    torch.testing.assert_close(r["loss"], reference.loss, rtol=1e-6, atol=0)
    # experts over ranks go through Megatron's all-to-all dispatcher; without that there is nothing to send
    assert r["dispatchers"] == {"MoEAlltoAllTokenDispatcher" if "ep2" in layout else "NoneType"}
    if layout == "ep2":
        assert torch.equal(logp, reference.logp)
    else:
        torch.testing.assert_close(logp, reference.logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_one_process(runs, reference, layout):
    grads = runs.module(layout)["grads"]
    assert set(grads) == set(reference.grads)
    for name, g in reference.grads.items():
        assert rel_err(grads[name], g) < 1e-4, f"{layout}: gradient of {name} differs"
    expected_norm = torch.sqrt(sum(g.double().square().sum() for g in reference.grads.values()))
    assert runs.module(layout)["grad_norm"] == pytest.approx(float(expected_norm), rel=1e-6)


@pytest.mark.parametrize("layout", TRAINER_LAYOUTS)
def test_train_step_matches_torch_trainer(runs, reference, layout):
    r = runs.trainer(layout)
    if layout == "pp2":  # the last stage's log-probs, broadcast to the first (which answers)
        assert torch.equal(r["logp0"], reference.logp0)
        assert r["metrics"]["loss"] == reference.metrics["loss"]
    torch.testing.assert_close(r["logp0"], reference.logp0, rtol=0, atol=1e-5)
    for key in ("loss_tokens", "response_tokens", "tokens", "kept_samples"):
        assert r["metrics"][key] == reference.metrics[key], key
    # a mean over layers: over the stages' sums (fp64) under pipeline parallelism, so not bitwise there
    imbalance = r["metrics"]["expert_load_imbalance"]
    assert imbalance == pytest.approx(
        reference.metrics["expert_load_imbalance"], rel=1e-6 if layout == "pp2" else 0
    )
    assert r["metrics"]["grad_norm"] == pytest.approx(reference.metrics["grad_norm"], rel=1e-5)
    assert r["metrics"]["loss"] == pytest.approx(reference.metrics["loss"], abs=1e-6)
    assert r["version"] == 1
    moved = 0
    for name, w in reference.after.items():
        step, ref_step = r["after"][name] - reference.before[name], w - reference.before[name]
        if not ref_step.any():  # an expert no token was routed to: no gradient, no step
            assert not step.any(), name
            continue
        moved += 1
        # 1e-4 of the step for the gradients' round-off, plus 2 fp32 ulps of a weight near 1 (the norms)
        tol = 1e-4 * float(ref_step.abs().max()) + 2.5e-7
        torch.testing.assert_close(step, ref_step, rtol=0, atol=tol, msg=f"{layout}: update of {name}")
    assert moved > len(reference.after) // 2


@pytest.mark.parametrize("layout", ["uneven", "uneven-pp2"])
def test_micro_batches_with_kl(runs, reference, layout):
    """9 rows in micro-batches of 2 with KL to a reference model. EP=2: 5 and 4 rows per rank (3 and 2
    forwards, evened out for the all-to-alls). PP=2: 5 micro-batches through the 1F1B schedule, the reference
    log-probs through its forward-only schedule."""
    r = runs.trainer(layout)
    for key in ("loss_tokens", "tokens", "kept_samples"):
        assert r["metrics"][key] == reference.uneven_metrics[key], key
    assert r["metrics"]["kl_to_ref"] == pytest.approx(reference.uneven_metrics["kl_to_ref"], abs=1e-9)
    assert r["metrics"]["grad_norm"] == pytest.approx(reference.uneven_metrics["grad_norm"], rel=1e-5)
    assert r["metrics"]["loss"] == pytest.approx(reference.uneven_metrics["loss"], abs=1e-6)
    for name, w in reference.uneven_after.items():
        step, ref_step = r["after"][name] - reference.before[name], w - reference.before[name]
        tol = 1e-4 * float(ref_step.abs().max()) + 2.5e-7  # as in test_train_step_matches_torch_trainer
        torch.testing.assert_close(step, ref_step, rtol=0, atol=tol, msg=f"update of {name}")


def test_pipeline_in_bf16_accumulates_into_fp32_masters(runs, reference):
    """PP=2 in bf16 with 5 micro-batches: each backward's bf16 gradient is moved into the fp32 master as it
    arrives (hooks; the schedule, not the Trainer, calls backward). The loss is the torch Trainer's bitwise;
    gradients differ by bf16 round-off (the embedding's and layers' backward sum in other orders), so the
    updates agree to a small fraction of their size (0.7% here), where a lost micro-batch would cost ~20%."""
    r = runs.trainer("pp2-bf16")
    metrics, after = reference.bf16_metrics, reference.bf16_after  # the torch Trainer, bf16, same batch
    assert r["metrics"]["loss"] == metrics["loss"]
    assert r["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=2e-3)
    assert {n: t.dtype for n, t in r["after"].items()} == {n: t.dtype for n, t in after.items()}
    diff = sum(float((r["after"][n].float() - w.float()).abs().sum()) for n, w in after.items())
    step = sum(float((w.float() - reference.before[n].float()).abs().sum()) for n, w in after.items())
    assert diff < 0.02 * step


def test_nan_on_one_expert_parallel_rank_refuses_the_step_everywhere(runs):
    """A rank whose log-probs are NaN still runs its backward (the all-to-alls pair up across ranks); then
    every rank raises NonFiniteError and no weight moved."""
    r = runs.trainer("nan-ep2")
    assert all("NaN/inf" in o for o in r["outcomes"]), r["outcomes"]
    assert r["unchanged"]


@pytest.mark.parametrize("layout", TRAINER_LAYOUTS)
def test_optimizer_state_is_sharded_over_data_parallel_ranks(runs, layout):
    """Masters and moments: dense tensors split over the data-parallel ranks, experts over the ranks that hold
    the same experts (expert-data-parallel: tp × dp / ep, since experts are not split by tp), as Megatron's
    distributed optimizer splits them. (dense, expert) group sizes per layout:"""
    sizes = {"tp2": (1, 2), "ep2": (2, 1), "tp2ep2": (1, 1), "pp2": (1, 1), "dp2": (2, 2)}[layout]
    for rank in runs.trainer(layout)["sharding"]:
        for kind, ranks in zip(("dense", "expert"), sizes, strict=True):
            params, held = rank[kind]
            assert params / ranks <= held <= params / ranks + 2 * ranks, (kind, rank)
