import re

import pytest

from rlplat.data import arith


def test_answers_are_exact():
    problems = arith.all_problems(19, "+-*")
    assert len(problems) == 3 * 20 * 20
    for p in problems:
        match = re.fullmatch(r"(\d+)([+*-])(\d+)=", p.question)
        assert match, p
        a, op, b = int(match[1]), match[2], int(match[3])
        assert p.answer == str(arith.OPERATORS[op](a, b)), p


def test_split_is_disjoint_complete_and_deterministic():
    train, held_out = arith.split(19, "+", 0.25)
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert len(train) + len(held_out) == 20 * 20
    again_train, again_held_out = arith.split(19, "+", 0.25)
    assert (train, held_out) == (again_train, again_held_out)


def test_held_out_membership_depends_only_on_the_problem_text():
    # Growing the operand range must not move a problem between train and held-out.
    _, small = arith.split(9, "+", 0.25)
    _, large = arith.split(19, "+", 0.25)
    small_q = {p.question for p in small}
    assert small_q <= {p.question for p in large}
    assert 0.15 < len(large) / 400 < 0.35


def test_batches_resume_where_they_left_off():
    train, _ = arith.split(19, "+", 0.25)
    stream = arith.batches(train, 8, seed=3)
    first = [next(stream) for _ in range(50)]
    resumed = arith.batches(train, 8, seed=3, start=40)
    assert [next(resumed) for _ in range(10)] == first[40:]


@pytest.mark.parametrize(
    ("max_operand", "operators", "fraction", "message"),
    [
        (9, "/", 0.25, "unknown operators"),
        (9, "+", 1.0, "eval_fraction"),
        (1, "+", 0.01, "too small"),
    ],
)
def test_bad_arguments_say_what_to_do(max_operand, operators, fraction, message):
    with pytest.raises(ValueError, match=message):
        arith.split(max_operand, operators, fraction)
