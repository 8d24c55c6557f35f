"""Think-format reward and the Evo-CoT length term."""

from __future__ import annotations

import pytest

from rewards import RewardRunner, Sample
from rewards.format import length_term, think_format

ON = {"system": "You are helpful. detailed thinking on"}
OFF = {"system": "detailed thinking off"}


@pytest.mark.parametrize(
    "meta,response,score",
    [
        (ON, "<think>reason</think><answer>4</answer>", 1.0),
        (ON, "  <think>\nreason\n</think>\n<answer>4</answer>\n", 1.0),
        (ON, "<think></think><answer>4</answer>", -1.0),  # empty thinking
        (ON, "<think>r</think>4", -1.0),  # no answer block
        (ON, "<think>r</think><answer>4</answer> trailing", -1.0),
        (ON, "<think>a</think><think>b</think><answer>4</answer>", -1.0),
        (ON, "4", -1.0),
        (OFF, "4", 1.0),
        (OFF, "<think></think>4", 1.0),
        (OFF, "<think>secret reasoning</think><answer>4</answer>", -1.0),
        (OFF, "<think>unterminated", -1.0),
        ({"thinking": False}, "<think>x</think>", -1.0),
    ],
)
def test_think_format(meta, response, score):
    assert think_format(Sample(response=response, metadata=meta)).score == score


def test_thinking_switch_from_prompt_and_default():
    assert think_format(Sample(prompt="detailed thinking off\nQ", response="4")).info["thinking"] is False
    assert think_format(Sample(response="4"), default_on=False).score == 1.0


def test_length_term_formula():
    lengths, correct = [10, 20, 30], [True, True, False]
    p = [0.5 - (n - 10) / (20 + 1e-9) for n in lengths]
    assert length_term(lengths, correct) == [p[0], p[1], min(p[2], 0.0)]
    assert length_term([10, 20], [False, False]) == [0.0, pytest.approx(-0.5)]
    assert length_term([7, 7], [True, False]) == [0.5, 0.0]


def test_evo_cot_length_group_reward_uses_tokens_and_math_correctness():
    runner = RewardRunner({"terms": [{"name": "evo_cot_length"}]})
    samples = [
        Sample(prompt="q", response="\\boxed{4}", response_tokens=[1] * 10, label="4"),
        Sample(prompt="q", response="\\boxed{4}", response_tokens=[1] * 30, label="4"),
        Sample(prompt="q", response="\\boxed{5}", response_tokens=[1] * 20, label="4"),
        Sample(prompt="other", response="x", metadata={"correct": True}),
    ]
    out = runner.score(samples)
    got = [o.score for o in out]
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(-0.5) and got[2] == 0.0
    assert got[3] == 0.5
    assert out[0].components["evo_cot_length"].info == {"length": 10, "unit": "tokens"}
