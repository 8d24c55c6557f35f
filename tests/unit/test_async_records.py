"""Async mode's stream records keep a step's scores: per sample, and the step's reward summary (per-term means
and errors, the first error's text), through JSON as the Redis stream stores them."""

import json

import torch

from actors.reward import Scores
from rewards import RewardResult, ScoredSample
from rlplat.async_rollout import from_records, to_records
from rlplat.train.batch import SampleGroups


def test_records_round_trip_scores_and_summary():
    prompts, responses = [[1, 2], [3]], [[4], [5, 6], [7], [8, 9, 10]]
    parts = [
        SampleGroups.pack(
            prompts[i : i + 1],
            responses[2 * i : 2 * i + 2],
            [torch.full((len(r),), -0.5) for r in responses[2 * i : 2 * i + 2]],
            [0, 0],
            ["a", "b"],
        )
        for i in range(2)
    ]
    bad = RewardResult(0.0, verdict="error", error="ValueError: down")
    scored = [
        ScoredSample(1.0, {"f": RewardResult(1.0)}, correct=True),
        ScoredSample(0.0, {"f": bad}, correct=False),
        ScoredSample(0.0, {"f": bad}, correct=False),
        ScoredSample(0.5, {"f": RewardResult(0.5)}, correct=False),
    ]
    scores = Scores.of(scored)
    records = json.loads(json.dumps(to_records(parts, scores, 3, 1.0, 2.0)))
    assert [("reward_summary" in r) for r in records] == [True, False, False, False]  # on the first only
    samples, back = from_records(records, prompts)
    assert back == scores
    assert back.summary.first_error == "f: ValueError: down" and back.summary.terms["f"].errors == 2
    assert samples.responses() == responses
