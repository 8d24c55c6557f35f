"""Errors and terms are visible in what the reward side returns (issue 14): per-term means, error counts and
the first error's text as metrics, and an accuracy that is defined for rewards returning a plain float."""

from __future__ import annotations

import itertools
import json
import logging

import pytest

from rewards import (
    RewardResult,
    RewardRunner,
    RewardSummary,
    Sample,
    ScoredSample,
    reward_metrics,
    summarize,
)
from rewards.runner import term_passes


def judge_crash(samples):
    """A group reward failing the way the unsafe native judge did."""
    raise IndexError("list index out of range")


def plain_float(sample, value: float = 1.0):
    return value


def test_term_passes_rule():
    # An explicit verdict decides, whatever the score (a verifier with correct=2; a length term's 0.5).
    assert term_passes(RewardResult(score=0.5, verdict="correct"), 1.0)
    assert not term_passes(RewardResult(score=1.0, verdict="wrong"), 1.0)
    # Otherwise (a plain float, or verdicts such as "passed", "ok", "judged") the score meets the threshold.
    assert term_passes(RewardResult(score=1.0), 1.0)
    assert not term_passes(RewardResult(score=0.99), 1.0)
    assert term_passes(RewardResult(score=0.5), 0.5)
    assert term_passes(RewardResult(score=1.0, verdict="passed"), 1.0)
    assert not term_passes(RewardResult(score=-1.0, verdict="missing_or_malformed_think_answer"), 1.0)
    # A failed call is never correct, even when its fallback score is high.
    assert not term_passes(RewardResult(score=1.0, verdict="correct", error="boom"), 1.0)


def test_float_rewards_have_an_accuracy():
    """Issue 14: a reward returning a plain float always showed accuracy 0.00."""
    name = "tests.rewards.test_summary:plain_float"
    runner = RewardRunner({"terms": [{"name": name, "label": "f"}]})
    assert [o.correct for o in runner.score([Sample()])] == [True]
    runner = RewardRunner({"terms": [{"name": name, "label": "f", "args": {"value": 0.7}}]})
    assert [o.correct for o in runner.score([Sample()])] == [False]
    runner = RewardRunner(
        {"terms": [{"name": name, "label": "f", "args": {"value": 0.7}, "correct_threshold": 0.5}]}
    )
    assert [o.correct for o in runner.score([Sample()])] == [True]


def test_accuracy_combines_counted_terms():
    samples = [
        Sample(response="<think>t</think><answer>\\boxed{4}</answer>", label="4"),
        Sample(response="\\boxed{4}", label="4"),  # right answer, wrong format
        Sample(response="<think>t</think><answer>\\boxed{5}</answer>", label="4"),
    ]
    both = RewardRunner({"terms": [{"name": "math"}, {"name": "think_format"}]}).score(samples)
    assert [o.correct for o in both] == [True, False, False]
    # A term with correct_threshold null (a shaping term) does not count; with none counted, no verdict.
    answer_only = RewardRunner(
        {"terms": [{"name": "math"}, {"name": "think_format", "correct_threshold": None}]}
    ).score(samples)
    assert [o.correct for o in answer_only] == [True, True, False]
    none = RewardRunner({"terms": [{"name": "think_format", "correct_threshold": None}]}).score(samples)
    assert [o.correct for o in none] == [None, None, None]
    assert summarize(none).accuracy is None and "reward/accuracy" not in reward_metrics(none)


def test_errors_and_terms_reach_the_metrics(caplog):
    """Issue 14's tiny_gar step: 6 reward errors of 6 samples, and the only sign was `reward 0.000`."""
    runner = RewardRunner(
        {
            "terms": [
                # not counted toward accuracy, which is the math term's alone (a failed counted term
                # fails the sample: test_term_passes_rule)
                {
                    "name": "tests.rewards.test_summary:judge_crash",
                    "group": True,
                    "label": "gar",
                    "correct_threshold": None,
                },
                {"name": "math", "weight": 0.5},
            ]
        }
    )
    samples = [
        Sample(prompt=f"q{g}", response=f"\\boxed{{{k}}}", label="1", metadata={"group_id": g})
        for g in range(2)
        for k in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="rewards.runner"):
        scored = runner.score(samples)
    assert "6 of 6 samples" in caplog.text and "gar: IndexError: list index out of range" in caplog.text
    s = summarize(scored)
    assert (s.samples, s.errors, s.first_error) == (6, 6, "gar: IndexError: list index out of range")
    assert s.terms["gar"].errors == 6 and s.terms["math"].errors == 0
    assert s.terms["math"].first_error is None and s.correct == 2 and s.judged == 6
    assert reward_metrics(scored) == {
        "reward/mean": pytest.approx(0.5 * 2 / 6),
        "reward/errors": 6.0,
        "reward/accuracy": pytest.approx(2 / 6),
        "reward/gar_mean": 0.0,
        "reward/gar_errors": 6.0,
        "reward/gar_timeouts": 0.0,
        "reward/math_mean": pytest.approx(2 / 6),
        "reward/math_errors": 0.0,
        "reward/math_timeouts": 0.0,
    }
    assert set(reward_metrics(scored, prefix="eval")) == {k.replace("reward/", "eval/") for k in s.metrics()}


def test_summary_counts_timeouts_and_handles_edge_cases():
    scored = [
        ScoredSample(1.0, {"a": RewardResult(1.0)}, correct=True),
        ScoredSample(-1.0, {"a": RewardResult(-1.0, verdict="timeout", error="timed out after 1.0s")}, False),
    ]
    s = summarize(scored)
    assert (s.terms["a"].errors, s.terms["a"].timeouts, s.terms["a"].mean) == (1, 1, 0.0)
    assert s.first_error == "a: timed out after 1.0s" and s.accuracy == 0.5
    empty = summarize([])
    assert (empty.samples, empty.mean, empty.accuracy, empty.terms) == (0, 0.0, None, {})
    with pytest.raises(TypeError, match="ScoredSample"):
        summarize([1.0])  # type: ignore[list-item]


def test_shard_summaries_merge_into_the_whole_batch_summary():
    """Reward workers summarise their shards; the driver's merge must equal the summary of the whole step."""
    ok, bad = RewardResult(1.0, verdict="correct"), RewardResult(0.0, verdict="error", error="ValueError: x")
    scored = [
        ScoredSample(1.5, {"a": ok, "b": RewardResult(0.5)}, correct=True),
        ScoredSample(0.5, {"a": bad, "b": RewardResult(0.5)}, correct=False),
        ScoredSample(0.0, {"a": RewardResult(0.0, verdict="timeout", error="timed out after 1s")}, False),
        ScoredSample(2.0, {"a": ok, "b": RewardResult(1.0)}, correct=True),
        ScoredSample(1.0, {"a": ok, "b": RewardResult(0.0, verdict="error", error="KeyError: b")}, False),
    ]
    whole = summarize(scored)
    for cuts in ([], [2], [1, 3], [0, 5]):  # an empty shard (a worker given no groups) included
        bounds = [0, *cuts, len(scored)]
        parts = [summarize(scored[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
        merged = RewardSummary.merge(parts)
        assert merged.metrics() == pytest.approx(whole.metrics()), cuts
        assert (merged.first_error, merged.samples, merged.judged) == (whole.first_error, 5, 5)
        assert merged.terms["b"].first_error == "KeyError: b" and merged.terms["b"].samples == 4
    assert RewardSummary.from_dict(json.loads(json.dumps(whole.as_dict()))) == whole
    assert not whole.all_failed and summarize(scored[1:3]).all_failed and not summarize([]).all_failed
