"""The code reward on the shared stdin/stdout cases and HumanEval-format tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rewards import RewardRunner, Sample
from rewards.code.reward import build_program, extract_code, judge_code
from rewards.code.sandbox import _root_mode_available, outputs_match

DATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "code_stdio_cases.jsonl"
# verl's integer codes for non-boolean case results
VERL_CODES = {-2: "runtime_error", -3: "timeout", -4: "compile_error"}


def _cases():
    if not DATA.exists():
        if os.environ.get("CI"):  # CI always has ../shared beside the checkout
            raise FileNotFoundError(DATA)
        return []
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not DATA.exists(), reason="shared testdata not present")
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["id"])
def test_stdio_cases(case):
    if case["language"] != "python" and not _root_mode_available():
        pytest.skip("native languages need the root sandbox mode")
    label = {"inputs": case["inputs"], "outputs": case["outputs"], "language": case["language"]}
    # The timeout case sleeps 10 s against a 5 s limit; 1.5 s shows the same thing faster.
    r = judge_code(case["code"], label, timeout_s=min(case["run_timeout_s"], 1.5), extract=False)
    expected = [
        ("passed" if x is True else "wrong_answer") if isinstance(x, bool) else VERL_CODES[x]
        for x in case["expected_case_results"]
    ]
    assert r.info["cases"] == expected
    assert (r.score == 1.0) is case["expected_all_pass"]
    status = {"success": "passed"}.get(case["expected_status"], case["expected_status"])
    assert r.verdict == status


@pytest.mark.skipif(not _root_mode_available(), reason="C++ runs only in the root sandbox mode")
def test_cpp_program_runs():
    code = '#include <iostream>\nint main(){long a,b; std::cin>>a>>b; std::cout<<a+b<<"\\n";}\n'
    r = judge_code(code, {"inputs": ["1 2", "5 7"], "outputs": ["3", "12"], "language": "cpp"}, extract=False)
    assert r.score == 1.0, r


def test_unsupported_language():
    r = judge_code("main = print 1", {"inputs": [""], "outputs": ["1"], "language": "haskell"}, extract=False)
    assert r.score == 0.0 and r.verdict == "unsupported_language" and r.error is None


HE_PROMPT = 'from typing import List\n\n\ndef below_zero(ops: List[int]) -> bool:\n    """True if the running sum dips below zero."""\n'
HE_TESTS = "def check(candidate):\n    assert candidate([1, 2, -4, 5]) is True\n    assert candidate([1, 2, -3]) is False\n"
HE_LABEL = {"tests": HE_TESTS, "entry_point": "below_zero", "prompt": HE_PROMPT}


def test_humaneval_completion_and_full_function():
    body = "    s = 0\n    for o in ops:\n        s += o\n        if s < 0:\n            return True\n    return False\n"
    full = "Here you go:\n```python\ndef below_zero(ops):\n    s = 0\n    for o in ops:\n        s += o\n        if s < 0:\n            return True\n    return False\n```\n"
    runner = RewardRunner({"terms": [{"name": "code", "args": {"timeout_s": 3}}]})
    out = runner.score(
        [
            Sample(response=body, label=HE_LABEL),
            Sample(response=full, label=HE_LABEL),
            Sample(response="```python\ndef below_zero(ops):\n    return False\n```", label=HE_LABEL),
            Sample(response="x", label=None),
            Sample(response="x", label={"nothing": 1}),
        ]
    )
    assert [o.score for o in out] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert out[2].components["code"].verdict == "failed"
    assert "TypeError" in out[3].errors["code"] and "ValueError" in out[4].errors["code"]


def test_mbpp_style_asserts_without_entry_point():
    label = {"tests": "assert sq(3) == 9\nassert sq(-2) == 4\n"}
    assert judge_code("def sq(x):\n    return x * x\n", label).score == 1.0
    assert judge_code("def sq(x):\n    return x + x\n", label).score == 0.0
    # A candidate cannot replace builtins the tests use: `abs` stays the judge's own.
    assert (
        judge_code(
            "def abs(x):\n    return 0\ndef sq(x):\n    return 1\n",
            {"tests": "assert abs(sq(3) - 9) < 1e-9\n"},
        ).score
        == 0.0
    )


def test_helpers():
    assert extract_code("a\n```py\nx=1\n```\n```python\nx=2\n```") == "x=2\n"
    assert extract_code("plain") == "plain"
    assert build_program("def f():\n", "    return 1\n", "f") == "def f():\n    return 1\n"
    assert build_program("import os\ndef f():\n", "def f():\n    return 1\n", "f").endswith(
        "\ndef f():\n    return 1\n"
    )
    assert outputs_match("1 \n2\n\n", "1\n2") and not outputs_match("1 \n2", "1\n2", "exact")
    assert outputs_match("1  2\n", "1 2", "tokens")


def test_exit_code_and_signal_are_reported():
    code = (
        "import os, signal, sys\n"
        "how = input()\n"
        "if how == 'exit':\n    sys.exit(4)\n"
        "if how == 'segv':\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "print(1)\n"
    )
    r = judge_code(code, {"inputs": ["ok", "exit", "segv"], "outputs": ["1"] * 3}, extract=False)
    assert r.info["cases"] == ["passed", "runtime_error", "runtime_error"]
    assert r.info["exit_codes"] == [0, 4, None]
    assert r.info["signals"] == [None, None, "SIGSEGV"]

    label = {"tests": "assert sq(3) == 9\n"}
    correct = judge_code("def sq(x):\n    return x * x\n", label)
    assert (correct.score, correct.info["exit_code"], correct.info["signal"]) == (1.0, 0, None)
    exits = judge_code("import os\nos._exit(3)\n", label)
    assert (exits.score, exits.info["exit_code"], exits.info["signal"]) == (0.0, 3, None)
    crash = judge_code("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", label)
    assert (crash.score, crash.info["exit_code"], crash.info["signal"]) == (0.0, None, "SIGSEGV")
    # A candidate still running at the deadline is killed by the sandbox.
    spin = judge_code("while True:\n    pass\n", label, timeout_s=1.0)
    assert (spin.verdict, spin.info["exit_code"], spin.info["signal"]) == ("timeout", None, "SIGKILL")
