"""Combine several rewards into one score, with timeouts and fallbacks, never stopping the run.

Each sync reward call runs in its own daemon thread and each async one as a task on the runner's event
loop; both are bounded by ``asyncio.wait_for``. A sync call that times out cannot be killed (Python has no
thread cancellation): it is abandoned, counted in ``abandoned_threads``, and its slot is released so later
calls are not starved. Rewards that can hang on hostile input (code execution, heavy sympy) should bound
themselves — the code sandbox kills its process tree, the math verifier runs under the same abandon rule.

Group rewards receive all samples of one group; a group is ``metadata["group_id"]`` when present, else the
prompt text.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.registry import RewardDef, resolve
from rlplat.reward_config import RewardsConfig, RewardSpec


@dataclass
class ScoredSample:
    """The combined score of one sample and every component that went into it."""

    score: float
    components: dict[str, RewardResult] = field(default_factory=dict)

    @property
    def errors(self) -> dict[str, str]:
        return {k: r.error for k, r in self.components.items() if r.error}


@dataclass
class _Stats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    latency_s: float = 0.0
    max_latency_s: float = 0.0
    score_sum: float = 0.0

    def as_dict(self, key: str) -> dict[str, float]:
        n = max(self.calls, 1)
        return {
            f"reward/{key}/calls": self.calls,
            f"reward/{key}/errors": self.errors,
            f"reward/{key}/timeouts": self.timeouts,
            f"reward/{key}/latency_mean_s": self.latency_s / n,
            f"reward/{key}/latency_max_s": self.max_latency_s,
            f"reward/{key}/score_mean": self.score_sum / n,
        }


def group_key(sample: Sample) -> Any:
    gid = sample.metadata.get("group_id") if isinstance(sample.metadata, dict) else None
    return ("group_id", gid) if gid is not None else ("prompt", sample.prompt)


def validate_sample(sample: Any, max_chars: int) -> str | None:
    """Why a sample cannot be scored, or None. Bad input becomes a per-sample error, never an exception."""
    if not isinstance(sample, Sample):
        return f"expected a Sample, got {type(sample).__name__}"
    for name in ("prompt", "response"):
        value = getattr(sample, name)
        if not isinstance(value, str):
            return f"sample.{name} must be str, got {type(value).__name__}; decode bytes first"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"sample.{name} is not valid UTF-8 text (lone surrogate at {e.start})"
    if len(sample.response) > max_chars:
        return f"response has {len(sample.response)} chars, over max_response_chars={max_chars}"
    return None


class RewardRunner:
    """Scores batches of samples with the configured weighted rewards."""

    def __init__(self, config: RewardsConfig | dict[str, Any] | None = None):
        if config is None:
            config = RewardsConfig()
        elif isinstance(config, dict):
            config = RewardsConfig.model_validate(config)
        elif not isinstance(config, RewardsConfig):
            raise TypeError(f"config must be a RewardsConfig or dict, got {type(config).__name__}")
        self.config = config
        self._defs: list[tuple[RewardSpec, RewardDef, Any]] = []
        for spec in config.terms:
            d = resolve(spec.name, group=spec.group)
            # A class reward is built once with its args; a function gets its args on every call.
            instance = d.fn(**spec.args) if d.is_class else None
            self._defs.append((spec, d, instance))
        self._stats: dict[str, _Stats] = defaultdict(_Stats)
        self._lock = threading.Lock()
        self.abandoned_threads = 0
        self.invalid_samples = 0

    def score(self, samples: Sequence[Sample]) -> list[ScoredSample]:
        """Blocking entry point. Inside a running event loop use ``await ascore(...)`` instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ascore(samples))
        raise RuntimeError(
            "RewardRunner.score() called inside a running event loop; use 'await runner.ascore(...)'"
        )

    async def ascore(self, samples: Sequence[Sample]) -> list[ScoredSample]:
        samples = list(samples)
        sem = asyncio.Semaphore(self.config.max_concurrency)
        invalid = {
            i: why
            for i, s in enumerate(samples)
            if (why := validate_sample(s, self.config.max_response_chars))
        }
        self.invalid_samples += len(invalid)
        valid = [i for i in range(len(samples)) if i not in invalid]
        per_key: dict[str, list[RewardResult | None]] = {}
        jobs = []
        for spec, d, inst in self._defs:
            out: list[RewardResult | None] = [None] * len(samples)
            per_key[spec.key] = out
            for i, why in invalid.items():
                out[i] = RewardResult(score=spec.fallback_score, verdict="invalid_input", error=why)
            if d.group:
                groups: dict[Any, list[int]] = defaultdict(list)
                for i in valid:
                    groups[group_key(samples[i])].append(i)
                for idx in groups.values():
                    jobs.append(self._run_group(spec, d, inst, [samples[i] for i in idx], idx, out, sem))
            else:
                for i in valid:
                    jobs.append(self._run_one(spec, d, inst, samples[i], i, out, sem))
        await asyncio.gather(*jobs)
        results = []
        wsum = sum(abs(spec.weight) for spec, _, _ in self._defs) or 1.0
        for i in range(len(samples)):
            comps = {spec.key: per_key[spec.key][i] for spec, _, _ in self._defs}
            total = sum(spec.weight * comps[spec.key].score for spec, _, _ in self._defs)
            if self.config.normalize_weights:
                total /= wsum
            results.append(ScoredSample(score=total, components=comps))
        return results

    async def _call(self, spec: RewardSpec, d: RewardDef, inst: Any, arg: Any, sem: asyncio.Semaphore) -> Any:
        target = inst if d.is_class else d.fn
        kwargs = {} if d.is_class else spec.args
        async with sem:
            if d.is_async:
                return await asyncio.wait_for(target(arg, **kwargs), spec.timeout_s)
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Any] = loop.create_future()

            def work() -> None:
                value, exc = None, None
                try:
                    value = target(arg, **kwargs)
                except BaseException as e:  # the reward's failure is data for the caller, not a crash
                    exc = e
                # An abandoned (timed-out) call may finish after its event loop has closed; drop the result.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set, fut, value, exc)

            t = threading.Thread(target=work, name=f"reward-{spec.key}", daemon=True)
            t.start()
            try:
                return await asyncio.wait_for(fut, spec.timeout_s)
            except TimeoutError:
                with self._lock:
                    self.abandoned_threads += 1
                raise

    def _record(
        self, key: str, latency: float, results: list[RewardResult], timed_out: bool, errored: bool
    ) -> None:
        with self._lock:
            st = self._stats[key]
            st.calls += 1
            st.latency_s += latency
            st.max_latency_s = max(st.max_latency_s, latency)
            st.timeouts += int(timed_out)
            st.errors += int(errored and not timed_out)
            st.score_sum += sum(r.score for r in results) / max(len(results), 1)

    def _failure(self, spec: RewardSpec, e: BaseException) -> RewardResult:
        if isinstance(e, TimeoutError):
            return RewardResult(
                score=spec.fallback_score, verdict="timeout", error=f"timed out after {spec.timeout_s}s"
            )
        return RewardResult(
            score=spec.fallback_score, verdict="error", error=f"{type(e).__name__}: {e}"[:2000]
        )

    async def _run_one(self, spec, d, inst, sample, i, out, sem) -> None:
        t0 = time.perf_counter()
        timed_out = errored = False
        try:
            res = RewardResult.coerce(await self._call(spec, d, inst, sample, sem))
            errored = res.error is not None
        except Exception as e:
            res = self._failure(spec, e)
            timed_out, errored = isinstance(e, TimeoutError), True
        out[i] = res
        self._record(spec.key, time.perf_counter() - t0, [res], timed_out, errored)

    async def _run_group(self, spec, d, inst, group, idx, out, sem) -> None:
        t0 = time.perf_counter()
        timed_out = errored = False
        try:
            values = await self._call(spec, d, inst, group, sem)
            if not isinstance(values, list | tuple) or len(values) != len(group):
                raise TypeError(
                    f"group reward {spec.name!r} must return a list of {len(group)} results, "
                    f"got {type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}"
                )
            results = [RewardResult.coerce(v) for v in values]
            errored = any(r.error is not None for r in results)
        except Exception as e:
            results = [self._failure(spec, e) for _ in group]
            timed_out, errored = isinstance(e, TimeoutError), True
        for i, r in zip(idx, results):
            out[i] = r
        self._record(spec.key, time.perf_counter() - t0, results, timed_out, errored)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            m: dict[str, float] = {}
            for key, st in self._stats.items():
                m.update(st.as_dict(key))
            m["reward/abandoned_threads"] = self.abandoned_threads
            m["reward/invalid_samples"] = self.invalid_samples
            return m

    def reset_metrics(self) -> None:
        with self._lock:
            self._stats.clear()
            self.invalid_samples = 0


def _set(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():  # already timed out and abandoned
        return
    if exc is not None:
        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"reward raised {exc!r}"))
    else:
        fut.set_result(value)
