"""Typed config for the ``rewards:`` section of an experiment: which rewards, their weights and timeouts.

It lives in the library, below ``rewards/`` (the runner that it configures) and ``actors/`` (the reward
workers), because ``rlplat.config`` mounts it and must not import either.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RewardSpec(BaseModel):
    """One reward term of the combined score."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "math",
        description=(
            "Registry name ('math', or a name a plugin registers with @reward), or for a user plugin "
            "'package.module:function' or 'path/to/file.py:function'."
        ),
    )
    weight: float = Field(1.0, description="Weight of this term in the combined score.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the reward.")
    timeout_s: float = Field(
        30.0, gt=0, description="Wall-clock limit per call (per sample, or per group for group rewards)."
    )
    fallback_score: float = Field(0.0, description="Score recorded when the reward raises or times out.")
    group: bool | None = Field(
        None,
        description="Force per-group (true) or per-sample (false) calling; null = as the reward declares.",
    )
    label: str | None = Field(
        None, description="Metrics key for this term; defaults to the name (for a path, the function's name)."
    )
    correct_threshold: float | None = Field(
        1.0,
        description=(
            "Accuracy: this term passes when its verdict is 'correct', or (no 'correct'/'wrong' verdict) when "
            "its score is >= this; an error fails it. null: the term does not count toward accuracy."
        ),
    )

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(
                "reward name must not be empty; use a registry name or 'package.module:function'"
            )
        return v

    @property
    def key(self) -> str:
        # A path's function name keeps metric names readable ('reward/my_score_mean', not the file path).
        return self.label or self.name.rpartition(":")[2]


class RewardsConfig(BaseModel):
    """Which rewards to compute and how the runner executes them."""

    model_config = ConfigDict(extra="forbid")

    terms: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec()], description="Reward terms; the score is their weighted sum."
    )
    max_concurrency: int = Field(
        8, ge=1, description="Reward calls in flight at once inside one runner (threads)."
    )
    max_response_chars: int = Field(
        1_000_000, ge=1, description="Longer responses are not scored; each such sample records an error."
    )
    normalize_weights: bool = Field(False, description="Divide the weighted sum by the sum of |weights|.")
    plugins: list[str] = Field(
        default_factory=list,
        description=(
            "Modules ('my_pkg.rewards') or .py files ('path/to/my_rewards.py') imported before the terms are "
            "looked up, so the names their @reward decorators register can be used as terms[].name."
        ),
    )

    @field_validator("terms")
    @classmethod
    def _unique_keys(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        keys = [s.key for s in v]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"duplicate reward keys {dupes}: give repeated rewards distinct 'label's")
        return v
