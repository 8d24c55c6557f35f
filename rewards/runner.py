"""Combine several rewards into one score, with timeouts and fallbacks, never stopping the run.

Each sync reward call runs on a daemon thread (reused from call to call, ``_Threads``) and each async one as a
task on the runner's event loop; both are bounded by ``asyncio.wait_for``. A sync call that times out cannot
be killed (Python has no thread cancellation): it is abandoned with its thread, counted in
``abandoned_threads``, and its slot is released so later calls are not starved. Rewards that can hang on
hostile input (code execution, heavy sympy) should bound themselves — the code sandbox kills its process
tree, the math verifier runs under the same abandon rule.

Group rewards receive all samples of one group; a group is ``metadata["group_id"]`` when present, else the
prompt text.

Nothing a reward does stops the run, so nothing may hide either: every failure is a ``RewardResult`` with
``error`` set (``ScoredSample.errors``), a batch with failures logs one warning with the first error's text,
and ``rewards.summary.reward_metrics`` turns a step's scored samples into per-term means and error counts.

Accuracy (``ScoredSample.correct``, see ``term_passes``): a sample is correct when it passes every term
whose ``correct_threshold`` is not null. A term passes when it has no error and its verdict is "correct",
or, when its verdict is neither "correct" nor "wrong" (plain-float rewards have none), when its score is
at least ``correct_threshold`` (default 1.0, the top score of the built-in verifiers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.registry import RewardDef, import_plugin, resolve
from rlplat.reward_config import RewardsConfig, RewardSpec

log = logging.getLogger(__name__)


@dataclass
class ScoredSample:
    """The combined score of one sample and every component that went into it.

    ``components`` maps each term's key to its result, in config order. ``correct`` is the accuracy verdict
    (module docstring); None when no term counts toward accuracy.
    """

    score: float
    components: dict[str, RewardResult] = field(default_factory=dict)
    correct: bool | None = None

    @property
    def errors(self) -> dict[str, str]:
        return {k: r.error for k, r in self.components.items() if r.error}

    @property
    def first_error(self) -> str | None:
        """``"<term>: <error>"`` for the first failed term, or None."""
        return next((f"{k}: {e}" for k, e in self.errors.items()), None)


def term_passes(result: RewardResult, threshold: float) -> bool:
    """Whether one term's result counts as correct (the accuracy rule in the module docstring)."""
    if result.error is not None:
        return False
    # An explicit verdict beats the score: evo_cot_length says "correct" with a length score of at most 0.5,
    # and math's scores are whatever its `correct=` and `wrong=` args say.
    if result.verdict in ("correct", "wrong"):
        return result.verdict == "correct"
    return result.score >= threshold


def is_correct(components: dict[str, RewardResult], specs: Sequence[RewardSpec]) -> bool | None:
    """A sample's accuracy verdict from its term results; None when no spec counts toward accuracy."""
    counted = [(s.key, s.correct_threshold) for s in specs if s.correct_threshold is not None]
    if not counted:
        return None
    return all(term_passes(components[key], threshold) for key, threshold in counted)


def _resolve_terms(config: RewardsConfig) -> list[RewardDef]:
    for plugin in config.plugins:
        import_plugin(plugin)
    defs = []
    for i, spec in enumerate(config.terms):
        try:
            defs.append(resolve(spec.name, group=spec.group))
        except (ValueError, TypeError) as e:
            # rebuilt as the plain type: a subclass (JSONDecodeError, ...) may not take a message alone
            kind = TypeError if isinstance(e, TypeError) else ValueError
            raise kind(f"rewards.terms.{i} ({spec.name!r}): {e}") from e
    return defs


def check_rewards(config: RewardsConfig) -> None:
    """Import ``config.plugins`` and look up every term, without building or calling a reward: the driver's
    fail-fast check before any worker starts (each worker's ``RewardRunner`` then does the same for itself).
    Raises ValueError/TypeError naming the term."""
    if not isinstance(config, RewardsConfig):
        raise TypeError(f"check_rewards takes a RewardsConfig (cfg.rewards), got {type(config).__name__}")
    _resolve_terms(config)


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
        for spec, d in zip(config.terms, _resolve_terms(config), strict=True):
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
        specs = [spec for spec, _, _ in self._defs]
        wsum = sum(abs(spec.weight) for spec in specs) or 1.0
        for i in range(len(samples)):
            comps = {spec.key: per_key[spec.key][i] for spec in specs}
            total = sum(spec.weight * comps[spec.key].score for spec in specs)
            if self.config.normalize_weights:
                total /= wsum
            results.append(ScoredSample(score=total, components=comps, correct=is_correct(comps, specs)))
        failed = [r for r in results if r.errors]
        if failed:
            # The one place the error text reaches a console before anyone reads metrics: a run whose every
            # reward fails must not look like a run whose policy is merely bad.
            log.warning(
                "reward errors in %d of %d samples; first: %s",
                len(failed),
                len(results),
                failed[0].first_error,
            )
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

            _THREADS.run(work)
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


class _Threads:
    """Daemon threads that run sync reward calls, reused from call to call: starting a thread costs more than a
    math verdict (256 samples: ~30 ms of thread starts against ~2 ms of scoring). A call that times out keeps
    its thread, as before (Python cannot stop it); the next call finds no idle thread and starts another, so
    nothing waits behind a stuck call. A thread idle for ``IDLE_EXIT_S`` exits, so none outlives its use long.
    Not ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one hung reward would hang the
    process's exit. A reward must not rely on a fresh thread: thread-local state one call sets (a ``decimal``
    context, a context variable) is seen by later calls on the same thread."""

    IDLE_EXIT_S = 1.0

    def __init__(self, name: str = "reward-call") -> None:
        self.name = name  # of its threads
        self._reset()
        # a forked child has none of these threads: it must start its own
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # threads waiting for a job, less the jobs queued for them; below 0 only after a failed thread start
        self._idle = 0

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` (which must not raise) on an idle thread, or a new one when none is idle."""
        with self._lock:
            # the promise and the put are one step, so an idle thread that finds the queue empty under the
            # lock may exit without stranding a job
            start = self._idle <= 0
            if not start:
                self._idle -= 1
            self._jobs.put(job)
        if start:
            try:
                threading.Thread(target=self._serve, name=self.name, daemon=True).start()
            except BaseException:
                # the job stays queued with no thread for it: count it, so the next call starts one (its
                # thread serves this job first) rather than promising it to a thread that does not exist
                with self._lock:
                    self._idle -= 1
                raise

    def _serve(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._idle -= 1
                        return
                continue
            job()
            with self._lock:
                self._idle += 1


_THREADS = _Threads()


def _set(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():  # already timed out and abandoned
        return
    if exc is not None:
        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"reward raised {exc!r}"))
    else:
        fut.set_result(value)
