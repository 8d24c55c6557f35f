"""Format and length rewards: the think/answer format and the Evo-CoT length term.

``think_format`` — the "detailed thinking on/off" switch of decoupled (reasoning vs. direct) fine-tuning:
- thinking on (system prompt says ``detailed thinking on``): the response must be exactly
  ``<think>…</think><answer>…</answer>`` (whitespace around the blocks allowed), both non-empty, each tag
  once -> ``bonus``; anything else -> ``penalty``.
- thinking off: a non-empty ``<think>`` block is penalised (``penalty``); a response without one (an empty
  ``<think></think>`` is tolerated) -> ``bonus``.
Our reading, since the sources state the rule in prose only: the off case rewards obeying the switch rather
than being neutral, so that on and off are trained symmetrically. The mode comes from
``metadata["thinking"]`` (bool) when set, else the system prompt (``metadata["system"]``), else the prompt.

``evo_cot_length`` (group reward) — p(l) = 0.5 - (l - l_min) / (l_max - l_min + 1e-9) over the group's
lengths; reward p when correct, min(p, 0) when wrong (the Kimi k1.5 length penalty that Ling 2.0's Evo-CoT
uses). Lengths are token counts when every sample has ``response_tokens``, else characters. Correctness is
``metadata["correct"]`` when present, else the ``correctness`` reward (default ``math``) scoring > 0.5.
Deviation: the 1e-9 keeps the term defined for a group of equal lengths, where every p is 0.5.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.registry import resolve, reward

_SWITCH_RE = re.compile(r"detailed thinking\s+(on|off)\b", re.IGNORECASE)
_FULL_RE = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)


def thinking_mode(sample: Sample, default: bool = True) -> bool:
    flag = sample.metadata.get("thinking")
    if isinstance(flag, bool):
        return flag
    for text in (sample.metadata.get("system"), sample.metadata.get("system_prompt"), sample.prompt):
        if isinstance(text, str):
            m = _SWITCH_RE.findall(text)
            if m:
                return m[-1].lower() == "on"
    return default


@reward("think_format")
def think_format(
    sample: Sample, bonus: float = 1.0, penalty: float = -1.0, default_on: bool = True
) -> RewardResult:
    on = thinking_mode(sample, default_on)
    r = sample.response
    if on:
        m = _FULL_RE.match(r)
        ok = bool(m) and bool(m.group(1).strip()) and bool(m.group(2).strip())
        ok = ok and r.count("<think>") == 1 and r.count("</think>") == 1 and r.count("<answer>") == 1
        why = "ok" if ok else "missing_or_malformed_think_answer"
    else:
        ok = not any(t.strip() for t in _THINK_RE.findall(r))
        why = "ok" if ok else "thinking_when_off"
    return RewardResult(score=bonus if ok else penalty, verdict=why, info={"thinking": on})


def length_term(lengths: list[int], correct: list[bool]) -> list[float]:
    """Evo-CoT / k1.5 length term for one group."""
    if len(lengths) != len(correct):
        raise ValueError("lengths and correct must have the same size")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    out = []
    for length, ok in zip(lengths, correct):
        p = 0.5 - (length - lo) / (hi - lo + 1e-9)
        out.append(p if ok else min(p, 0.0))
    return out


@reward("evo_cot_length", group=True)
def evo_cot_length(
    samples: list[Sample], correctness: str = "math", threshold: float = 0.5
) -> list[RewardResult]:
    use_tokens = all(s.response_tokens is not None for s in samples)
    lengths = [len(s.response_tokens) if use_tokens else len(s.response) for s in samples]  # type: ignore[arg-type]
    checker: Any = None
    correct = []
    for s in samples:
        flag = s.metadata.get("correct")
        if not isinstance(flag, bool):
            if checker is None:
                d = resolve(correctness)
                if d.group or d.is_class or d.is_async:
                    raise ValueError(
                        f"evo_cot_length correctness reward {correctness!r} must be a plain per-sample function"
                    )
                checker = d.fn
            flag = RewardResult.coerce(checker(s)).score > threshold
        correct.append(flag)
    terms = length_term(lengths, correct)
    unit = "tokens" if use_tokens else "chars"
    return [
        RewardResult(score=t, verdict="correct" if c else "wrong", info={"length": n, "unit": unit})
        for t, n, c in zip(terms, lengths, correct)
    ]
