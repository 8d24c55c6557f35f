"""The reward plugin contract: what a reward receives and what it returns.

A reward is ``fn(sample, **args) -> float | RewardResult`` (sync or ``async def``); a *group* reward is
``fn(samples, **args) -> list[float | RewardResult]`` and receives every response to one prompt at once
(GAR, the Evo-CoT length term). These signatures are pinned by ``tests/rewards/test_contracts.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One response to score.

    ``label`` is the ground truth in whatever form the reward expects (a math answer string, a dict of tests
    for code); ``metadata`` carries per-sample extras such as the system prompt or a group id.
    """

    prompt: str = ""
    response: str = ""
    response_tokens: list[int] | None = None
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> Sample:
        """Build a Sample from a JSON case; raises ValueError/TypeError naming the bad field."""
        if not isinstance(d, dict):
            raise TypeError(f"a case must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"prompt", "response", "response_tokens", "label", "metadata", "id"}
        extra = {k: d[k] for k in unknown}
        prompt, response = d.get("prompt", ""), d.get("response", "")
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise TypeError(f"case field {name!r} must be a string, got {type(value).__name__}")
        tokens = d.get("response_tokens")
        if tokens is not None and not (isinstance(tokens, list) and all(type(t) is int for t in tokens)):
            raise TypeError("case field 'response_tokens' must be a list of ints or absent")
        metadata = d.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TypeError("case field 'metadata' must be an object")
        # Unknown top-level keys (e.g. 'system', 'group') land in metadata so a JSONL file from another tool
        # still scores without rewriting it.
        metadata = {**extra, **metadata}
        if "id" in d:
            metadata.setdefault("id", d["id"])
        return cls(
            prompt=prompt, response=response, response_tokens=tokens, label=d.get("label"), metadata=metadata
        )


@dataclass
class RewardResult:
    """A score plus what explains it.

    ``verdict`` is a short machine-readable word ("correct", "wrong", "no_answer", "timeout", "error", ...);
    ``error`` is set when the reward itself failed (then ``score`` is the configured fallback).
    """

    score: float
    extracted: str | None = None
    verdict: str | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Any) -> RewardResult:
        """Accept what a reward may return (a number or a RewardResult); reject anything else."""
        if isinstance(value, RewardResult):
            result = value
        elif isinstance(value, bool):
            # bool is an int subclass; accept it (pass/fail rewards) but make the score an honest float.
            result = cls(score=float(value))
        elif isinstance(value, int | float):
            result = cls(score=float(value))
        else:
            raise TypeError(
                f"a reward must return a float or RewardResult, got {type(value).__name__}; "
                "wrap extra information in RewardResult(score=..., info={...})"
            )
        if not isinstance(result.score, int | float) or not math.isfinite(float(result.score)):
            raise ValueError(f"a reward returned a non-finite score {result.score!r}")
        result.score = float(result.score)
        return result
