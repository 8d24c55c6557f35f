"""Math answer extraction and equivalence, built on math-verify with a layer for its gaps.

What this layer adds to ``math_verify.parse``/``verify``:
- Plain-text answers: math-verify reads ``sqrt(8)`` as nothing and ``2*sqrt(2)`` as ``2`` (silently wrong).
  Bare answers (no ``$``/``\\boxed``) are rewritten to LaTeX (``sqrt(x)`` -> ``\\sqrt{x}``, ``*`` -> ``\\cdot``,
  ``**`` -> ``^``) and wrapped in ``$...$`` before parsing, so ``\\sqrt{8}`` without delimiters parses too.
- Thread safety: math-verify's own timeouts use ``signal.alarm``, which only works in the main thread. We
  always pass ``parsing_timeout=None`` / ``timeout_seconds=None`` and bound calls from outside (the reward
  runner's per-reward timeout), so the verifier works in worker threads and Ray actors.
- Extraction that math-verify does not do: ``<answer>`` tags, GSM8K ``#### N`` and, for numeric (GSM8K-style)
  labels, the last number in the response.
- A normalised string match first (``f'`` vs ``f'``, ``\\dfrac`` vs ``\\frac``), which only ever says "equal".
- ``allow_set_relation_comp=True``: ``x \\in [-2, 7]`` equals ``-2 \\le x \\le 7`` (a sound verifier should say so).
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.registry import reward

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUM)
_GSM8K_LABEL_RE = re.compile(rf"^\s*\$?\s*({_NUM})\s*$")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_FINAL_RE = re.compile(r"final answer is[:\s]*(.+)", re.IGNORECASE)
# Commands that a doubled backslash (``\\frac``, from non-raw Python strings) most likely meant.
_DOUBLED_CMD_RE = re.compile(
    r"\\\\(?=(?:d?frac|tfrac|sqrt|le|ge|leq|geq|pi|cdot|times|left|right|text|mathrm|infty|in|cup|cap|pm)\b)"
)
_COMMA_NUMBER_RE = re.compile(r"^\s*-?\d+(?:,\d+)+(?:\.\d+)?\s*$")
_MAX_VERIFY_CHARS = 20_000


def _quiet_math_verify() -> None:
    # math-verify warns on every call that we disabled its alarm-based timeout; we did, on purpose.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_math_verify()


def _balanced(text: str, start: int, open_ch: str = "{", close_ch: str = "}") -> int:
    """Index just past the bracket group that opens at ``start``, or -1 when unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}``, braces balanced."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        end = _balanced(text, m.end() - 1)
        if end != -1:
            best = text[m.end() : end - 1]
    if best is None:
        spaced = re.findall(r"\\boxed ([^\s$]+)", text)  # the "\boxed 5" form
        if spaced:
            best = spaced[-1]
    return best


def last_number(text: str) -> str | None:
    nums = _NUMBER_RE.findall(text)
    return nums[-1] if nums else None


def extract_answer(text: str) -> tuple[str | None, str]:
    """The final answer a response commits to, and how it was found.

    Priority: ``<answer>`` tags (last), ``\\boxed{}`` (last), ``final answer is``, ``#### N``.
    """
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        inner = tags[-1].strip()
        return (last_boxed(inner) or inner), "answer_tag"
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    finals = _FINAL_RE.findall(text)
    if finals:
        ans = finals[-1].strip()
        ans = re.sub(r"\.?\s*I hope it is correct\.?$", "", ans).strip()
        return ans.rstrip(".").strip(), "final_answer_phrase"
    hashes = _HASHES_RE.findall(text)
    if hashes:
        return hashes[-1].strip(), "hashes"
    return None, "none"


def _plain_to_latex(s: str) -> str:
    """Rewrite plain-text math (``2*sqrt(2)``, ``x**2``, ``pi/4``) into LaTeX math-verify understands."""
    out = s
    # sqrt(...) with balanced parentheses -> \sqrt{...}; loop because arguments may nest.
    while True:
        m = re.search(r"(?<![\\a-zA-Z])sqrt\s*\(", out)
        if not m:
            break
        end = _balanced(out, m.end() - 1, "(", ")")
        if end == -1:
            break
        out = out[: m.start()] + r"\sqrt{" + out[m.end() : end - 1] + "}" + out[end:]
    out = re.sub(r"\*\*\s*\(([^()]*)\)", r"^{(\1)}", out)
    out = out.replace("**", "^")
    out = re.sub(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])", r"\\pi", out)
    out = out.replace("*", r" \cdot ")
    return out


def _is_bare(s: str) -> bool:
    # Only short single-line strings are answers to wrap; prose must go to math-verify untouched.
    if len(s) > 120 or "\n" in s.strip():
        return False
    return not any(tok in s for tok in ("$", "\\(", "\\[", "\\boxed", "\\fbox", "\\begin{align", "<answer>"))


def _prepare(s: str) -> str:
    s = _DOUBLED_CMD_RE.sub(r"\\", s)
    if _COMMA_NUMBER_RE.match(s):
        # "1,22" / "7,425,000": math-verify's number reader resolves thousands vs decimal commas; inside
        # $...$ LaTeX would read them as a tuple.
        return s.strip()
    if _is_bare(s):
        s = s.strip().rstrip("\\").strip()
        return "$" + _plain_to_latex(s) + "$"
    return s


def _norm_str(s: str) -> str:
    s = _DOUBLED_CMD_RE.sub(r"\\", s)
    s = re.sub(r"\\(?:left|right|!|,|;|:|displaystyle)", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").rstrip("\\")


def _parse(s: str) -> list[Any]:
    from math_verify import parse

    return parse(s, parsing_timeout=None)


def math_equal(gold: str, pred: str) -> bool:
    """True when ``pred`` states the same mathematical answer as ``gold``.

    ``gold`` may be a bare answer or a reference solution with ``\\boxed{}``; ``pred`` may be a bare answer
    or a whole completion. Has no timeout of its own (see the module docstring).
    """
    from math_verify import verify

    if not isinstance(gold, str) or not isinstance(pred, str):
        raise TypeError(f"math_equal takes strings, got {type(gold).__name__} and {type(pred).__name__}")
    if _norm_str(gold) and _norm_str(gold) == _norm_str(pred):
        return True
    g = _parse(_prepare(gold)) or _parse(gold)
    p_text = pred
    extracted, how = extract_answer(pred)
    if extracted is not None and how in ("answer_tag", "hashes"):
        p_text = extracted
    p = _parse(_prepare(p_text)) or _parse(p_text)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None, allow_set_relation_comp=True))


def _decimal(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def score_math(response: str, label: Any) -> RewardResult:
    """Score one response against a math label (bare answer, reference solution, or GSM8K number)."""
    if label is None:
        return RewardResult(
            score=0.0, verdict="no_label", error="sample has no label; math needs the reference answer"
        )
    if isinstance(label, int | float) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        raise TypeError(f"math label must be a string or number, got {type(label).__name__}")
    if len(response) > _MAX_VERIFY_CHARS:
        # Sympy on huge inputs can take minutes; only the tail carries the final answer.
        response = response[-_MAX_VERIFY_CHARS:]
    extracted, how = extract_answer(response)
    m = _GSM8K_LABEL_RE.match(label)
    if m:
        # GSM8K-style numeric label: compare numbers exactly, falling back to the last number in the text.
        if extracted is None:
            extracted, how = last_number(response), "last_number"
        if extracted is None:
            return RewardResult(score=0.0, extracted=None, verdict="no_answer", info={"how": how})
        cleaned = re.sub(r"^\$|\\\$|\\%|%|\\!|\\,|\s|\.$", "", extracted)
        gold_n, pred_n = _decimal(m.group(1)), _decimal(cleaned)
        if pred_n is not None and gold_n is not None:
            ok = pred_n == gold_n
        else:
            ok = math_equal(m.group(1), extracted)
        return RewardResult(
            score=float(ok), extracted=extracted, verdict="correct" if ok else "wrong", info={"how": how}
        )
    ok = math_equal(label, response)
    if extracted is None:
        how = "math_verify"
    return RewardResult(
        score=float(ok), extracted=extracted, verdict="correct" if ok else "wrong", info={"how": how}
    )


@reward("math")
def math_reward(sample: Sample, correct: float = 1.0, wrong: float = 0.0) -> RewardResult:
    """1.0 (``correct``) when the response's final answer equals ``sample.label``, else ``wrong``."""
    res = score_math(sample.response, sample.label)
    if res.error is None:
        res.score = correct if res.score > 0 else wrong
    return res
