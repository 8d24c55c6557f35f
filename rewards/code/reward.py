"""The ``code`` reward: extract a program from a response and judge it in the sandbox.

Label formats (``sample.label``, a dict):
- assert tests (HumanEval/MBPP): ``{"tests": str, "entry_point": str | None, "prompt": str}``; ``prompt`` is the
  trusted code stub (HumanEval ``prompt``). The program is ``prompt + completion`` when the response only
  continues the stub, else ``prompt + "\\n" + code`` so stub imports and helpers stay available.
- stdin/stdout: ``{"inputs": [str], "outputs": [str], "language": "python", "compare": "lines"}``.

Only plain data crosses from candidate to tests, so tests that pass callbacks into the candidate, inspect
objects it returns, or rely on its printed output are not supported by the assert mode.

How the candidate ended is in ``info``: assert mode ``exit_code`` and ``signal`` of the candidate process,
stdio mode ``exit_codes`` and ``signals`` with one entry per case. A signal is a name ("SIGKILL" after a
timeout or when the sandbox stopped it, "SIGSEGV", ...) with ``None`` as the exit code; a normal exit has
its code and ``None`` as the signal; both are ``None`` when the process did not run.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.code.sandbox import Limits, default_sandbox, outputs_match
from rewards.registry import reward

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", ""}


def extract_code(response: str, language: str = "python") -> str:
    """The last fenced block in the wanted language (any fenced block as a fallback), else the raw text."""
    blocks = _FENCE_RE.findall(response)
    if not blocks:
        return response
    want = _PY_TAGS if language in ("python", "python3", "py") else {language.lower(), "cpp", "c++", "c"}
    matching = [code for tag, code in blocks if tag.lower() in want]
    return (matching or [code for _, code in blocks])[-1]


def build_program(prompt: str, code: str, entry_point: str | None) -> str:
    if not prompt:
        return code
    if entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return prompt + "\n" + code
    return prompt + code


def _limits(timeout_s: float, memory_mb: int, label: dict[str, Any]) -> Limits:
    t = label.get("timeout_s", timeout_s)
    if not isinstance(t, int | float) or t <= 0:
        raise ValueError(f"label timeout_s must be a positive number, got {t!r}")
    return Limits(timeout_s=float(t), memory_mb=int(memory_mb))


def judge_code(
    response: str,
    label: Any,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    partial: bool = False,
    extract: bool = True,
) -> RewardResult:
    """Judge one response; see the module docstring for the label formats."""
    if not isinstance(label, dict):
        raise TypeError(
            f"code label must be a dict with 'tests' (assert mode) or 'inputs'/'outputs' (stdio), got {type(label).__name__}"
        )
    limits = _limits(timeout_s, memory_mb, label)
    sb = default_sandbox()
    if "tests" in label:
        tests, entry, prompt = label["tests"], label.get("entry_point"), label.get("prompt") or ""
        if (
            not isinstance(tests, str)
            or not isinstance(prompt, str)
            or not (entry is None or isinstance(entry, str))
        ):
            raise TypeError(
                "assert label needs 'tests': str, optional 'entry_point': str, optional 'prompt': str"
            )
        code = extract_code(response) if extract else response
        program = build_program(prompt, code, entry)
        r = sb.run_assert(program, tests, entry_point=entry, prompt=prompt, limits=limits)
        passed = r.get("passed") is True
        err = r.get("error") if r.get("status") == "sandbox_error" else None
        return RewardResult(
            score=float(passed),
            extracted=code[:2000],
            verdict=r.get("status", "sandbox_error"),
            error=err,
            info={
                "detail": r.get("error"),
                "time_s": r.get("time_s"),
                "mode": "assert",
                "exit_code": r.get("candidate_exit"),
                "signal": r.get("candidate_signal"),
            },
        )
    if "inputs" in label and "outputs" in label:
        inputs, outputs = label["inputs"], label["outputs"]
        if not (isinstance(inputs, list) and isinstance(outputs, list) and len(inputs) == len(outputs)):
            raise ValueError("stdio label needs 'inputs' and 'outputs' lists of the same length")
        if not all(isinstance(x, str) for x in inputs + outputs):
            raise TypeError("stdio label inputs/outputs must be strings")
        language = label.get("language", "python")
        compare = label.get("compare", "lines")
        code = extract_code(response, language) if extract else response
        r = sb.run_stdio(code, inputs, language=language, limits=limits)
        if r.get("status") != "done":
            # Compile error, unsupported language, sandbox failure: no case ran.
            err = r.get("error") if r.get("status") == "sandbox_error" else None
            return RewardResult(
                score=0.0,
                extracted=code[:2000],
                verdict=r.get("status"),
                error=err,
                info={
                    "detail": (r.get("error") or "")[-2000:],
                    "cases": [r.get("status")] * len(inputs),
                    "exit_codes": [None] * len(inputs),
                    "signals": [None] * len(inputs),
                },
            )
        statuses = []
        for case, expected in zip(r["cases"], outputs):
            if case["status"] == "ok":
                statuses.append(
                    "passed" if outputs_match(case["stdout"], expected, compare) else "wrong_answer"
                )
            else:
                statuses.append(case["status"])
        n_pass = statuses.count("passed")
        all_pass = n_pass == len(outputs)
        verdict = "passed" if all_pass else next(s for s in statuses if s != "passed")
        score = n_pass / max(len(outputs), 1) if partial else float(all_pass)
        return RewardResult(
            score=score,
            extracted=code[:2000],
            verdict=verdict,
            info={
                "cases": statuses,
                "stderr_tail": [c.get("stderr_tail", "")[-300:] for c in r["cases"]],
                "exit_codes": [c.get("exit_code") for c in r["cases"]],
                "signals": [c.get("signal") for c in r["cases"]],
            },
        )
    raise ValueError("code label needs 'tests' (assert mode) or 'inputs' and 'outputs' (stdio mode)")


@reward("code")
def code_reward(
    sample: Sample, timeout_s: float = 5.0, memory_mb: int = 1024, partial: bool = False, extract: bool = True
) -> RewardResult:
    """1.0 when the program passes every test (``partial=True``: the fraction of stdio cases passed)."""
    return judge_code(
        sample.response,
        sample.label,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        partial=partial,
        extract=extract,
    )
