"""Rollout log-probs equal the trainer's forward bitwise, in fp32, bf16 and fp8, under continuous batching."""

import argparse
import json
import math

import pytest
import torch

import kernels
from rlplat.config import ModelSection
from rlplat.engine import AlignmentConfig, NativeEngine, SamplingParams, build_policy
from rlplat.engine.alignment import alignment_requests, check_alignment, compare
from rlplat.engine.cli import register

# 4 prompts x 2 samples = 8 sequences through 3 rows; budgets of 2..6 tokens make them leave at different
# steps, so sequences join a running batch. Small because bf16/fp8 GEMMs are slow on CPU.
SMALL = AlignmentConfig(num_prompts=4, n=2, prompt_length=(1, 12), max_new_tokens=(2, 6), seed=3)


def run_check(precision, sampling, max_batch_size=3):
    section = ModelSection(preset="tiny", precision=precision, seed=0)
    engine = NativeEngine(build_policy(section), max_batch_size=max_batch_size)
    prompts, params = alignment_requests(SMALL, sampling, vocab_size=512, special_ids=[0, 1])
    assert len({len(p) for p in prompts}) > 1, "prompt lengths should be mixed"
    return check_alignment(engine, build_policy(section), prompts, params)


@pytest.mark.parametrize(
    ("precision", "sampling"),
    [
        ("fp32", SamplingParams()),
        ("bf16", SamplingParams(temperature=0.7, top_k=50, top_p=0.9)),
        ("fp8", SamplingParams(temperature=1.3, top_p=0.95)),
    ],
)
def test_native_engine_is_exact(precision, sampling):
    report = run_check(precision, sampling)
    assert report["num_sequences"] == 8 and report["num_tokens"] > 8
    assert report["exact"] is True, report
    assert report["max_abs_logprob_diff"] == 0.0 and report["mismatch_kl"] == 0.0


def test_greedy_is_exact():
    assert run_check("fp32", SamplingParams(greedy=True, temperature=0))["exact"]


def test_plain_kernels_are_not_exact():
    """The check can fail: without batch-invariant kernels, cached decode drifts from the full forward."""
    with kernels.kernel_mode(batch_invariant=False):
        report = run_check("fp32", SamplingParams())
    assert not report["exact"]
    assert 0 < report["max_abs_logprob_diff"] < 1e-3 and report["mismatch_kl"] < 1e-8


def test_compare_stays_finite_for_a_wild_token():
    # trainer - rollout = 799.5: exp overflows float64 (709.8); the k3 term is bounded at a log-ratio of 20,
    # so the report is strict JSON.
    report = compare([torch.tensor([-800.0, -1.0])], [torch.tensor([-0.5, -1.0])])
    assert report["max_abs_logprob_diff"] == 799.5 and not report["exact"]
    assert report["mismatch_kl"] == pytest.approx((math.expm1(20.0) - 20.0) / 2)
    json.dumps(report, allow_nan=False)


def test_cli_prints_the_report(capsys, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("model:\n  preset: tiny\n  precision: fp32\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    flags = ["model.seed=1", "--num-prompts", "2", "--n", "2", "--max-batch-size", "3"]
    args = parser.parse_args(["check-alignment", str(config), *flags])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    expected = {"backend": "native", "precision": "fp32", "num_sequences": 4, "exact": True}
    assert {k: report[k] for k in expected} == expected
    assert report["max_abs_logprob_diff"] == 0.0 and report["mean_abs_logprob_diff"] == 0.0
    assert report["mismatch_kl"] == 0.0 and report["num_tokens"] >= 16
