"""Registry lookups (decorator, dotted path, entry point), the runner's weights, timeouts and fallbacks."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import textwrap
import threading
import time

import pytest

from rewards import RewardResult, RewardRunner, Sample, reward
from rewards.registry import resolve


@reward("test_const")
def const_reward(sample, value: float = 1.0):
    return value


@reward("test_async_len")
async def async_len(sample, scale: float = 1.0):
    await asyncio.sleep(0)
    return RewardResult(score=len(sample.response) * scale, verdict="ok")


@reward("test_group_rank", group=True)
def group_rank(samples):
    order = sorted(range(len(samples)), key=lambda i: samples[i].response)
    return [float(order.index(i)) for i in range(len(samples))]


@reward("test_class")
class Counter:
    def __init__(self, start: int = 0):
        self.n = start

    def __call__(self, sample):
        self.n += 1
        return float(self.n)


def sleepy(sample, seconds: float = 5.0):
    time.sleep(seconds)
    return 1.0


async def async_sleepy(sample):
    await asyncio.sleep(5)
    return 1.0


def boom(sample):
    raise RuntimeError("reward bug")


def wrong_type(sample):
    return "1.0"


def test_decorator_dotted_and_class():
    assert resolve("test_const").fn is const_reward
    assert resolve("tests.rewards.test_runner:sleepy").fn is sleepy
    with pytest.raises(ValueError, match="unknown reward"):
        resolve("no_such_reward")
    with pytest.raises(ValueError, match="cannot import"):
        resolve("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="already registered"):
        reward("test_const")(lambda s: 0.0)
    runner = RewardRunner({"terms": [{"name": "test_class", "args": {"start": 10}}]})
    assert [r.score for r in runner.score([Sample(), Sample()])] == [11.0, 12.0]


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A real distribution on sys.path that ships a reward through the rlplat.rewards entry-point group."""
    (tmp_path / "rlplat_tiny_plugin").mkdir()
    (tmp_path / "rlplat_tiny_plugin" / "__init__.py").write_text("def tiny(sample):\n    return 0.25\n")
    dist = tmp_path / "rlplat_tiny_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rlplat-tiny-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("[rlplat.rewards]\ntiny_plugin = rlplat_tiny_plugin:tiny\n")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    d = resolve("tiny_plugin")
    assert d.fn(Sample()) == 0.25
    assert RewardRunner({"terms": [{"name": "tiny_plugin"}]}).score([Sample()])[0].score == 0.25
    sys.modules.pop("rlplat_tiny_plugin", None)


def test_weights_components_and_groups():
    runner = RewardRunner(
        {
            "terms": [
                {"name": "test_const", "weight": 0.5, "args": {"value": 2.0}},
                {"name": "test_async_len", "weight": 2.0, "args": {"scale": 0.1}},
                {"name": "test_group_rank", "weight": 1.0},
            ]
        }
    )
    samples = [
        Sample(prompt="p", response="bb"),
        Sample(prompt="p", response="a"),
        Sample(prompt="q", response="zzz"),
    ]
    out = runner.score(samples)
    assert out[0].components["test_const"].score == 2.0
    assert out[0].components["test_async_len"].score == pytest.approx(0.2)
    assert [o.components["test_group_rank"].score for o in out] == [1.0, 0.0, 0.0]
    assert out[0].score == pytest.approx(0.5 * 2.0 + 2.0 * 0.2 + 1.0)
    m = runner.metrics()
    assert m["reward/test_const/calls"] == 3 and m["reward/test_group_rank/calls"] == 2


def test_timeouts_errors_and_fallbacks_never_stop_the_run():
    runner = RewardRunner(
        {
            "terms": [
                {
                    "name": "tests.rewards.test_runner:sleepy",
                    "timeout_s": 0.2,
                    "fallback_score": -1.0,
                    "label": "slow",
                },
                {
                    "name": "tests.rewards.test_runner:async_sleepy",
                    "timeout_s": 0.2,
                    "fallback_score": -2.0,
                    "label": "aslow",
                },
                {"name": "tests.rewards.test_runner:boom", "fallback_score": -3.0, "label": "boom"},
                {"name": "tests.rewards.test_runner:wrong_type", "label": "wrong"},
                {"name": "test_const", "label": "ok"},
            ]
        }
    )
    t0 = time.perf_counter()
    out = runner.score([Sample(response="x")] * 4)
    # the 4 sleepy calls are abandoned at 0.2 s: the whole call ends well before one of them (5 s) would
    assert time.perf_counter() - t0 < 4.0
    c = out[0].components
    assert (c["slow"].score, c["slow"].verdict) == (-1.0, "timeout")
    assert (c["aslow"].score, c["aslow"].verdict) == (-2.0, "timeout")
    assert c["boom"].score == -3.0 and "RuntimeError: reward bug" in c["boom"].error
    assert "must return a float or RewardResult" in c["wrong"].error
    assert c["ok"].score == 1.0 and c["ok"].error is None
    m = runner.metrics()
    assert m["reward/slow/timeouts"] == 4 and m["reward/boom/errors"] == 4 and m["reward/ok/errors"] == 0
    assert m["reward/abandoned_threads"] == 4


RENDEZVOUS: list[threading.Barrier] = []


def rendezvous(sample):
    """Returns only once every call of the batch has started: calls run one after another break the barrier."""
    RENDEZVOUS[0].wait()
    return 1.0


def test_slow_reward_does_not_hold_up_others():
    RENDEZVOUS[:] = [threading.Barrier(8, timeout=10.0)]
    runner = RewardRunner(
        {"terms": [{"name": "tests.rewards.test_runner:rendezvous", "timeout_s": 30.0}], "max_concurrency": 8}
    )
    out = runner.score([Sample()] * 8)
    assert [o.components["rendezvous"].error for o in out] == [None] * 8  # all 8 ran at once


CALLING_THREADS: list[threading.Thread] = []


def calling_thread(sample):
    # the list keeps each thread alive, so distinct threads stay distinct objects (their idents are reused)
    CALLING_THREADS.append(threading.current_thread())
    return 1.0


def test_reward_threads_are_reused():
    pool = lambda: sum(t.name == "reward-call" for t in threading.enumerate())
    before = pool()
    CALLING_THREADS.clear()
    runner = RewardRunner(
        {"terms": [{"name": "tests.rewards.test_runner:calling_thread"}], "max_concurrency": 2}
    )
    runner.score([Sample()] * 40)
    runner.score([Sample()] * 40)
    # 2 calls at a time; a thread between finishing a call and counting itself idle may make the runner start
    # one more, so the bound is loose (one thread per call would be 80)
    assert len(CALLING_THREADS) == 80 and len({id(t) for t in CALLING_THREADS}) <= before + 16
    assert pool() <= before + 16
    CALLING_THREADS.clear()


def test_a_failed_thread_start_strands_no_later_call(monkeypatch):
    from rewards.runner import _Threads

    pool = _Threads(name="test-pool")
    pool.IDLE_EXIT_S = 0.05
    release, ran = threading.Event(), []
    pool.run(lambda: release.wait(10))  # its thread is busy: the next call must start a thread

    def refuse(thread):
        raise RuntimeError("no threads")

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="no threads"):
            pool.run(lambda: ran.append("queued when the start failed"))
    release.set()  # the busy thread serves the stranded call, then exits idle
    deadline = time.monotonic() + 10
    while (
        ran == [] or any(t.name == "test-pool" for t in threading.enumerate())
    ) and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.run(lambda: ran.append("later"))  # no thread is left: this call must start one, not wait for a ghost
    while len(ran) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == ["queued when the start failed", "later"]


def test_a_forked_child_starts_its_own_reward_threads():
    runner = RewardRunner({"terms": [{"name": "test_const", "timeout_s": 5.0}]})
    runner.score([Sample()] * 4)  # the parent's threads, idle now
    pid = os.fork()
    if pid == 0:  # the child: the parent's idle threads do not exist here
        ok = all(o.errors == {} for o in runner.score([Sample()] * 4))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_bad_input_is_a_per_sample_error():
    runner = RewardRunner({"terms": [{"name": "math"}, {"name": "test_const"}], "max_response_chars": 1000})
    samples = [
        Sample(response="\\boxed{4}", label="4"),
        Sample(response="bad \udcff surrogate", label="4"),
        Sample(response="9" * 5000, label="4"),
        Sample(response="no label here"),
        "not a sample",
        Sample(response=b"bytes"),  # type: ignore[arg-type]
        Sample(response="\\boxed{4}", label={"weird": "label"}),
    ]
    out = runner.score(samples)  # type: ignore[arg-type]
    assert out[0].score == 2.0 and not out[0].errors
    assert "UTF-8" in out[1].errors["math"]
    assert "max_response_chars" in out[2].errors["math"]
    assert out[3].components["math"].verdict == "no_label" and out[3].components["math"].error
    assert "expected a Sample" in out[4].errors["math"]
    assert "must be str" in out[5].errors["math"]
    assert "TypeError" in out[6].errors["math"]
    assert runner.metrics()["reward/invalid_samples"] == 4


def test_score_inside_event_loop_says_what_to_do():
    runner = RewardRunner({"terms": [{"name": "test_const"}]})

    async def inner():
        with pytest.raises(RuntimeError, match="ascore"):
            runner.score([Sample()])
        return await runner.ascore([Sample()])

    assert asyncio.run(inner())[0].score == 1.0


def test_sample_from_dict_validation():
    s = Sample.from_dict(
        {"prompt": "p", "response": "r", "label": "1", "id": 7, "system": "detailed thinking on"}
    )
    assert s.metadata == {"id": 7, "system": "detailed thinking on"}
    with pytest.raises(TypeError, match="response"):
        Sample.from_dict({"response": 5})
    with pytest.raises(TypeError, match="JSON object"):
        Sample.from_dict([1, 2])
