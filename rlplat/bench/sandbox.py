"""``rlplat bench sandbox``: code-sandbox throughput, HumanEval-size programs per second through a worker pool.

Correctness is checked first (every correct program passes, every buggy one fails); only then is the pool
timed, next to a baseline in the same run: one plain ``python -c`` subprocess per program with no isolation
at all. The result file (``bench_results/code_sandbox-<date>.json``, ``rlplat.bench.common.write_result``)
names the hardware and the sandbox mode.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console

from rewards.code.sandbox import Limits, Sandbox
from rlplat.bench.common import CorrectnessError, run_reported, write_result

# Ten HumanEval-size problems (stub + docstring, a ~5-15 line solution, a check() with several asserts).
_PROBLEMS = [
    (
        "has_close_elements",
        "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        '    """Check if in given list of numbers, are any two numbers closer to each other than threshold."""\n',
        "    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
        "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n",
        "def check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
        "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n",
    ),
    (
        "separate_paren_groups",
        "from typing import List\n\n\ndef separate_paren_groups(paren_string: str) -> List[str]:\n"
        '    """Split balanced parenthesis groups, ignoring spaces."""\n',
        "    out, cur, depth = [], [], 0\n    for c in paren_string:\n        if c == '(':\n            depth += 1\n"
        "            cur.append(c)\n        elif c == ')':\n            depth -= 1\n            cur.append(c)\n"
        "            if depth == 0:\n                out.append(''.join(cur))\n                cur = []\n    return out\n",
        "def check(candidate):\n    assert candidate('(()()) ((())) () ((())()())') == ['(()())', '((()))', '()', '((())()())']\n"
        "    assert candidate('() (()) ((())) (((())))') == ['()', '(())', '((()))', '(((())))']\n"
        "    assert candidate('( ) (( )) (( )( ))') == ['()', '(())', '(()())']\n",
    ),
    (
        "below_zero",
        "from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n"
        '    """Detect if the balance of the account falls below zero."""\n',
        "    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n",
        "def check(candidate):\n    assert candidate([]) == False\n    assert candidate([1, 2, -3, 1, 2, -3]) == False\n"
        "    assert candidate([1, 2, -4, 5, 6]) == True\n    assert candidate([1, -1, 2, -2, 5, -5, 4, -5]) == True\n",
    ),
    (
        "mean_absolute_deviation",
        "from typing import List\n\n\ndef mean_absolute_deviation(numbers: List[float]) -> float:\n"
        '    """Mean absolute deviation around the mean."""\n',
        "    mean = sum(numbers) / len(numbers)\n    return sum(abs(x - mean) for x in numbers) / len(numbers)\n",
        "def check(candidate):\n    assert abs(candidate([1.0, 2.0, 3.0]) - 2.0/3.0) < 1e-6\n"
        "    assert abs(candidate([1.0, 2.0, 3.0, 4.0]) - 1.0) < 1e-6\n    assert abs(candidate([1.0, 2.0, 3.0, 4.0, 5.0]) - 6.0/5.0) < 1e-6\n",
    ),
    (
        "intersperse",
        "from typing import List\n\n\ndef intersperse(numbers: List[int], delimeter: int) -> List[int]:\n"
        '    """Insert a number between every two consecutive elements."""\n',
        "    out = []\n    for i, n in enumerate(numbers):\n        if i:\n            out.append(delimeter)\n        out.append(n)\n    return out\n",
        "def check(candidate):\n    assert candidate([], 7) == []\n    assert candidate([5, 6, 3, 2], 8) == [5, 8, 6, 8, 3, 8, 2]\n"
        "    assert candidate([2, 2, 2], 2) == [2, 2, 2, 2, 2]\n",
    ),
    (
        "sum_product",
        "from typing import List, Tuple\n\n\ndef sum_product(numbers: List[int]) -> Tuple[int, int]:\n"
        '    """Return (sum, product) of the list."""\n',
        "    s, p = 0, 1\n    for n in numbers:\n        s += n\n        p *= n\n    return s, p\n",
        "def check(candidate):\n    assert candidate([]) == (0, 1)\n    assert candidate([1, 1, 1]) == (3, 1)\n"
        "    assert candidate([100, 0]) == (100, 0)\n    assert candidate([3, 5, 7]) == (15, 105)\n",
    ),
    (
        "rolling_max",
        "from typing import List\n\n\ndef rolling_max(numbers: List[int]) -> List[int]:\n"
        '    """Rolling maximum element found until given moment in the sequence."""\n',
        "    out, m = [], None\n    for n in numbers:\n        m = n if m is None else max(m, n)\n        out.append(m)\n    return out\n",
        "def check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 2, 3, 4]) == [1, 2, 3, 4]\n"
        "    assert candidate([4, 3, 2, 1]) == [4, 4, 4, 4]\n    assert candidate([3, 2, 3, 100, 3]) == [3, 3, 3, 100, 100]\n",
    ),
    (
        "make_palindrome",
        "def is_palindrome(string: str) -> bool:\n    return string == string[::-1]\n\n\n"
        "def make_palindrome(string: str) -> str:\n"
        '    """Find the shortest palindrome that begins with a supplied string."""\n',
        "    for i in range(len(string) + 1):\n        if is_palindrome(string[i:]):\n"
        "            return string + string[:i][::-1]\n    return string\n",
        "def check(candidate):\n    assert candidate('') == ''\n    assert candidate('x') == 'x'\n"
        "    assert candidate('xyz') == 'xyzyx'\n    assert candidate('xyx') == 'xyx'\n    assert candidate('jerry') == 'jerryrrej'\n",
    ),
    (
        "string_xor",
        'def string_xor(a: str, b: str) -> str:\n    """Binary XOR of two strings of 0s and 1s."""\n',
        "    return ''.join('0' if x == y else '1' for x, y in zip(a, b))\n",
        "def check(candidate):\n    assert candidate('111000', '101010') == '010010'\n"
        "    assert candidate('1', '1') == '0'\n    assert candidate('0101', '0000') == '0101'\n",
    ),
    (
        "longest",
        "from typing import List, Optional\n\n\ndef longest(strings: List[str]) -> Optional[str]:\n"
        '    """Return the longest string (first one on ties), None for an empty list."""\n',
        "    if not strings:\n        return None\n    best = strings[0]\n    for s in strings:\n"
        "        if len(s) > len(best):\n            best = s\n    return best\n",
        "def check(candidate):\n    assert candidate([]) == None\n    assert candidate(['x', 'y', 'z']) == 'x'\n"
        "    assert candidate(['x', 'yyy', 'zzzz', 'www', 'kkkk', 'abc']) == 'zzzz'\n",
    ),
]


def run_code_bench(
    n_programs: int = 300, workers: int = 4, out_dir: str = "bench_results", baseline_programs: int = 40
) -> dict[str, Any]:
    """Time ``n_programs`` HumanEval-size judgements with ``workers`` concurrent runs; write the result file
    and return its payload with its ``path``."""
    limits = Limits(timeout_s=5.0)
    with Sandbox() as sb:
        # Correctness first: each correct solution passes, each with a bug fails.
        for name, prompt, body, tests in _PROBLEMS:
            ok = sb.run_assert(prompt + body, tests, entry_point=name, prompt=prompt, limits=limits)
            bad = sb.run_assert(
                prompt + "    return None\n", tests, entry_point=name, prompt=prompt, limits=limits
            )
            if ok.get("passed") is not True or bad.get("passed") is not False:
                raise CorrectnessError(f"benchmark problem {name} judged wrongly: {ok} / {bad}; not timing")
        jobs = [_PROBLEMS[i % len(_PROBLEMS)] for i in range(n_programs)]

        def one(p: tuple[str, str, str, str]) -> bool:
            name, prompt, body, tests = p
            return (
                sb.run_assert(prompt + body, tests, entry_point=name, prompt=prompt, limits=limits).get(
                    "passed"
                )
                is True
            )

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            passed = sum(pool.map(one, jobs))
        elapsed = time.perf_counter() - t0
        mode = sb.mode

    def naive(p: tuple[str, str, str, str]) -> bool:
        name, prompt, body, tests = p
        src = prompt + body + "\n" + tests + f"\ncheck({name})\n"
        return (
            subprocess.run([sys.executable, "-I", "-c", src], capture_output=True, timeout=30).returncode == 0
        )

    base_jobs = [_PROBLEMS[i % len(_PROBLEMS)] for i in range(baseline_programs)]
    t1 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        base_passed = sum(pool.map(naive, base_jobs))
    base_elapsed = time.perf_counter() - t1
    result: dict[str, Any] = {
        "sandbox_mode": mode,
        "workers": workers,
        "programs": n_programs,
        "passed": passed,
        "seconds": round(elapsed, 3),
        "programs_per_s": round(n_programs / elapsed, 1),
        "baseline": {
            "what": "one `python -I -c program+tests` subprocess per program, no isolation",
            "programs": baseline_programs,
            "passed": base_passed,
            "programs_per_s": round(baseline_programs / base_elapsed, 1),
        },
    }
    return {**result, "path": str(write_result("code_sandbox", result, out_dir))}


def run_from_args(args: argparse.Namespace) -> int:
    def run(console: Console) -> None:
        result = run_code_bench(args.programs, args.workers, args.out, args.baseline_programs)
        console.print(
            f"{result['sandbox_mode']} sandbox, {args.workers} workers: {result['programs_per_s']} programs/s "
            f"(baseline without isolation: {result['baseline']['programs_per_s']}); wrote {result['path']}"
        )

    return run_reported(run)


def register(bench_sub) -> None:
    p = bench_sub.add_parser("sandbox", help="code-sandbox throughput: HumanEval-size programs per second")
    p.add_argument("--programs", type=int, default=300, help="programs judged through the sandbox")
    p.add_argument("--workers", type=int, default=4, help="concurrent sandbox runs")
    p.add_argument("--baseline-programs", type=int, default=40, help="programs of the no-isolation baseline")
    p.add_argument("--out", default="bench_results", help="directory of the result file")
    p.set_defaults(func=run_from_args)
