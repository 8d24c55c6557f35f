"""Synthetic arithmetic task of the default experiment: ``a+b=`` style problems with exact integer answers.

Problems are drawn from a fixed space (operators x operand ranges). The held-out evaluation set is a
deterministic slice of that space, chosen by a hash of the problem text, so it never appears in warm-start
or RL training whatever the seed. Items look like GSM8K rows: ``question`` (the prompt text) and ``answer``
(the integer as a string), so the math verifier scores them like any other dataset.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def _is_eval(text: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < eval_fraction


def all_problems(max_operand: int, operators: str) -> list[Problem]:
    unknown = set(operators) - set(OPERATORS)
    if unknown:
        raise ValueError(f"unknown operators {sorted(unknown)}; choose from {''.join(OPERATORS)}")
    out = []
    for op in operators:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                out.append(Problem(f"{a}{op}{b}=", str(OPERATORS[op](a, b))))
    return out


def split(max_operand: int, operators: str, eval_fraction: float) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems; the split depends only on the problem text."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    problems = all_problems(max_operand, operators)
    train = [p for p in problems if not _is_eval(p.question, eval_fraction)]
    held_out = [p for p in problems if _is_eval(p.question, eval_fraction)]
    if not train or not held_out:
        raise ValueError("the problem space is too small for this eval_fraction; raise max_operand")
    return train, held_out


def batches(problems: list[Problem], batch_size: int, seed: int, start: int = 0):
    """An endless, reproducible stream of batches; ``start`` skips that many batches (resume)."""
    rng = random.Random(seed)
    index = 0
    while True:
        order = list(range(len(problems)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            if index >= start:
                yield index, [problems[j] for j in order[i : i + batch_size]]
            index += 1
