"""What a step's rewards did: per-term means, error and timeout counts, the first error's text, accuracy.

The RL loop gathers a step's ``ScoredSample``s from every reward worker (a batch is sharded over workers,
so only the gathered list describes the step) and calls ``reward_metrics(scored)`` for its metrics line,
or ``summarize(scored)`` for the typed form, which also carries the first error's text to print.

Metric names, for term keys ``<term>`` (``RewardSpec.key``: the label, else the name):

- ``reward/mean``: mean combined score; ``reward/errors``: samples with at least one failed term;
- ``reward/accuracy``: fraction of samples that are correct (``rewards.runner.term_passes``), present
  only when some term counts toward accuracy;
- ``reward/<term>_mean``, ``reward/<term>_errors``, ``reward/<term>_timeouts``: per term, over all samples
  (a failed term contributes its fallback score to the mean, as it does to the combined score).

A batch sharded over reward workers is summarised per shard and joined with ``RewardSummary.merge`` (means
weighted by their sample counts, the first error of the first shard that has one), so only the summary, not
every sample's error text, travels back; ``as_dict`` / ``from_dict`` carry it through JSON (the async
experience stream).

Pure functions of their input; the runner's own counters (``RewardRunner.metrics``: calls, latencies) are
cumulative per worker and are not these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rewards.runner import ScoredSample


@dataclass(frozen=True)
class TermSummary:
    """One reward term over a batch."""

    mean: float
    errors: int
    timeouts: int
    first_error: str | None
    samples: int = 0  # samples with a result for this term (the weight of ``mean`` in a merge)


@dataclass(frozen=True)
class RewardSummary:
    """A batch of scored samples; ``metrics()`` gives the numbers, ``first_error`` the text to show."""

    samples: int
    mean: float
    errors: int
    first_error: str | None
    correct: int
    judged: int
    terms: dict[str, TermSummary]

    @property
    def accuracy(self) -> float | None:
        """Correct samples over samples with an accuracy verdict; None when no term counts toward it."""
        return self.correct / self.judged if self.judged else None

    @property
    def all_failed(self) -> bool:
        """Every sample's reward erred (and there was at least one sample)."""
        return self.samples > 0 and self.errors == self.samples

    @staticmethod
    def merge(parts: Sequence[RewardSummary]) -> RewardSummary:
        """One summary of the concatenated batches of ``parts`` (in order), as ``summarize`` would give."""
        n = sum(p.samples for p in parts)
        keys = list(dict.fromkeys(k for p in parts for k in p.terms))
        terms = {}
        for key in keys:
            ts = [p.terms[key] for p in parts if key in p.terms]
            count = sum(t.samples for t in ts)
            terms[key] = TermSummary(
                mean=sum(t.mean * t.samples for t in ts) / count if count else 0.0,
                errors=sum(t.errors for t in ts),
                timeouts=sum(t.timeouts for t in ts),
                first_error=next((t.first_error for t in ts if t.first_error is not None), None),
                samples=count,
            )
        return RewardSummary(
            samples=n,
            mean=sum(p.mean * p.samples for p in parts) / n if n else 0.0,
            errors=sum(p.errors for p in parts),
            first_error=next((p.first_error for p in parts if p.first_error is not None), None),
            correct=sum(p.correct for p in parts),
            judged=sum(p.judged for p in parts),
            terms=terms,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RewardSummary:
        terms = {k: TermSummary(**t) for k, t in data["terms"].items()}
        return RewardSummary(**{**data, "terms": terms})

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        m: dict[str, float] = {f"{prefix}/mean": self.mean, f"{prefix}/errors": float(self.errors)}
        if self.accuracy is not None:
            m[f"{prefix}/accuracy"] = self.accuracy
        for key, t in self.terms.items():
            m[f"{prefix}/{key}_mean"] = t.mean
            m[f"{prefix}/{key}_errors"] = float(t.errors)
            m[f"{prefix}/{key}_timeouts"] = float(t.timeouts)
        return m


def summarize(scored: Sequence[ScoredSample]) -> RewardSummary:
    """Summarise a batch (an empty one has mean 0 and no accuracy)."""
    for i, s in enumerate(scored):
        if not isinstance(s, ScoredSample):
            raise TypeError(
                f"summarize takes the ScoredSamples a reward runner returns; item {i} is {type(s).__name__}"
            )
    n = len(scored)
    keys = list(dict.fromkeys(k for s in scored for k in s.components))
    terms = {}
    for key in keys:
        results = [s.components[key] for s in scored if key in s.components]
        failed = [r for r in results if r.error is not None]
        terms[key] = TermSummary(
            mean=sum(r.score for r in results) / len(results),
            errors=len(failed),
            timeouts=sum(r.verdict == "timeout" for r in failed),
            first_error=failed[0].error if failed else None,
            samples=len(results),
        )
    failed_samples = [s for s in scored if s.errors]
    judged = [s.correct for s in scored if s.correct is not None]
    return RewardSummary(
        samples=n,
        mean=sum(s.score for s in scored) / n if n else 0.0,
        errors=len(failed_samples),
        first_error=failed_samples[0].first_error if failed_samples else None,
        correct=sum(judged),
        judged=len(judged),
        terms=terms,
    )


def reward_metrics(scored: Sequence[ScoredSample], prefix: str = "reward") -> dict[str, float]:
    """``summarize(scored).metrics(prefix)``: the metric names in the module docstring."""
    return summarize(scored).metrics(prefix)
