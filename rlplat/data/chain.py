"""Chained addition with a worked solution: the long-response task of the alignment ablation (issue 15).

A problem adds 3–5 one-digit numbers; the reference solution works through the partial sums and ends with the
answer after ``####``, so a response is 20–45 characters (one token each with the character tokenizer):

    question  4+8+3+9=
    solution  4+8=12, 12+3=15, 15+9=24. #### 24
    answer    24

The math verifier scores only the final answer. The held-out set is a deterministic slice of the problem space
chosen by a hash of the question, as for ``arith``, so it never appears in warm-start or RL training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from rlplat.data.arith import _is_eval


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str


def solve(operands: tuple[int, ...]) -> Problem:
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    question = "+".join(map(str, operands)) + "="
    return Problem(question, str(total), ", ".join(steps) + f". #### {total}")


def all_problems(max_operand: int, min_terms: int, max_terms: int) -> list[Problem]:
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"chain terms must satisfy 2 <= min <= max, got [{min_terms}, {max_terms}]")
    if (max_operand + 1) ** max_terms > 2_000_000:
        raise ValueError(
            f"{(max_operand + 1) ** max_terms:,} problems of up to {max_terms} terms over 0..{max_operand} is too "
            "many to enumerate; lower data.max_operand or data.chain_terms"
        )
    values = range(max_operand + 1)
    return [
        solve(ops) for n in range(min_terms, max_terms + 1) for ops in itertools.product(values, repeat=n)
    ]


def split(
    max_operand: int, min_terms: int, max_terms: int, eval_fraction: float
) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems; the split depends only on the question text."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    problems = all_problems(max_operand, min_terms, max_terms)
    train = [p for p in problems if not _is_eval(p.question, eval_fraction)]
    held_out = [p for p in problems if _is_eval(p.question, eval_fraction)]
    if not train or not held_out:
        raise ValueError("the problem space is too small for this eval_fraction")
    return train, held_out
