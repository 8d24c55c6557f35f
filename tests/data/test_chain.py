"""The chain task (issue 15): worked solutions the warm start imitates, the math verifier's final answer, and
a held-out split that never meets training."""

from rewards.math_reward import score_math
from rlplat.data.prompts import DataConfig, load_prompts


def test_chain_items_demonstrate_the_worked_solution_and_math_items_the_answer():
    train, held_out = load_prompts(DataConfig(source="chain", max_operand=9, chain_terms=(3, 4)), seed=0)
    assert not {p.question for p in train} & {p.question for p in held_out}
    for p in train[:50] + held_out[:50]:
        assert p.demonstration == p.solution and p.demonstration.endswith(f"#### {p.answer}")
        assert 20 <= len(p.demonstration) <= 60  # one token per character with the preset's tokenizer
        assert score_math(p.demonstration, p.answer).score == 1.0
        assert score_math(p.demonstration.replace(f"#### {p.answer}", "#### 99"), p.answer).score == 0.0
    arith, _ = load_prompts(DataConfig(source="arith"), seed=0)
    assert all(p.demonstration == p.answer for p in arith)  # tiny_math's warm start is unchanged
