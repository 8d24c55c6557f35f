"""ExperienceStream behaviour: bad URLs, serialisation, malformed entries, staleness, lag, trimming, restart."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from rlplat.buffer import ExperienceStream, RedisConfig


@pytest.fixture
def stream(backend_url, tmp_path):
    s = ExperienceStream.connect(RedisConfig(url=backend_url), tmp_path)
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_is_closed_and_documented():
    with pytest.raises(ValidationError, match="extra_forbidden"):
        RedisConfig(ur="redis://localhost")
    for name, f in RedisConfig.model_fields.items():
        assert f.description, name
    assert RedisConfig().url is None


def test_unreachable_url_fails_fast_with_what_to_do(tmp_path):
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot reach Redis at") as err:
        ExperienceStream.connect(RedisConfig(url=url, connect_timeout_s=0.5), tmp_path)
    assert time.monotonic() - start < 2
    assert url in str(err.value) and "redis.url" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_url_password_is_not_shown_and_bad_scheme_is_named(tmp_path):
    with pytest.raises(ValueError) as err:
        ExperienceStream.connect(RedisConfig(url=f"redis://u:secret@127.0.0.1:{_closed_port()}"), tmp_path)
    assert "secret" not in str(err.value) and "u:***@" in str(err.value)
    with pytest.raises(ValueError, match="not a valid Redis URL"):
        ExperienceStream.connect(RedisConfig(url="http://localhost:6379"), tmp_path)


def test_embedded_needs_a_run_dir():
    with pytest.raises(ValueError, match="run directory"):
        ExperienceStream.connect(RedisConfig(), None)


class _Array:
    """Quacks like a numpy array / torch tensor."""

    def tolist(self):
        return [3, 4]


def test_publish_read_round_trip(stream):
    sample = {"prompt_id": "p0", "token_ids": _Array(), "rollout_logprobs": [-0.1, -2.5e-7], "reward": 1.0}
    ids = stream.publish([sample, {"prompt_id": "p1"}], policy_version=7)
    entries = stream.read(10, block_ms=50)
    assert [e.id for e in entries] == ids
    assert entries[0].policy_version == 7
    assert entries[0].sample == {**sample, "token_ids": [3, 4]}
    assert stream.read(10) == []


def test_publish_rejects_what_it_cannot_serialise(stream):
    with pytest.raises(TypeError, match="sample 1 is a list"):
        stream.publish([{"a": 1}, [1, 2]], 0)
    with pytest.raises(TypeError, match="sample 0 cannot be serialised: object is not"):
        stream.publish([{"a": object()}], 0)
    with pytest.raises(ValueError, match="policy_version"):
        stream.publish([{"a": 1}], -1)
    assert stream.lag() == 0


def test_malformed_entries_are_recorded_and_acked(stream, tmp_path):
    good = stream.publish([{"uid": 0}], 0)
    raw = stream.client
    bad = [
        raw.xadd(stream.cfg.stream, {"other": "x"}),
        raw.xadd(stream.cfg.stream, {"policy_version": "1", "sample": "{not json"}),
        raw.xadd(stream.cfg.stream, {"policy_version": "one", "sample": "{}"}),
        raw.xadd(stream.cfg.stream, {"policy_version": "1", "sample": "[1, 2]"}),
        raw.xadd(stream.cfg.stream, {"policy_version": "1", "sample": b"\xff\xfe"}),
    ]
    good += stream.publish([{"uid": 1}], 0)
    entries = stream.read(100)
    assert [e.id for e in entries] == good
    assert stream.stats.malformed == len(bad)
    assert [r["id"] for r in stream.errors] == [b.decode() for b in bad]
    logged = [json.loads(line) for line in (tmp_path / "stream_errors.jsonl").read_text().splitlines()]
    assert [r["id"] for r in logged] == [b.decode() for b in bad]
    # The bad ones are acked already; only the good ones wait for the optimizer step.
    assert raw.xpending(stream.cfg.stream, stream.cfg.group)["pending"] == 2


def test_pending_entry_deleted_from_stream_is_recorded_not_fatal(stream):
    ids = stream.publish([{"uid": 0}, {"uid": 1}], 0)
    stream.read(2)
    stream.client.xdel(stream.cfg.stream, ids[0])
    recovered = stream.recover_pending()
    assert [e.id for e in recovered] == ids[1:]
    assert stream.stats.malformed == 1
    assert stream.client.xpending(stream.cfg.stream, stream.cfg.group)["pending"] == 1


def test_lag_counts_undelivered_and_pending(stream):
    stream.publish([{"i": i} for i in range(10)], 0)
    assert stream.lag() == 10
    entries = stream.read(4)
    assert stream.lag() == 10
    stream.ack([e.id for e in entries])
    assert stream.lag() == 6
    assert stream.metrics()["stream/undelivered"] == 6


def test_max_len_never_trims_unacked_entries(backend_url, tmp_path):
    with ExperienceStream.connect(RedisConfig(url=backend_url, max_len=5), tmp_path) as s:
        ids = s.publish([{"i": i} for i in range(12)], 0)
        assert s.client.xlen(s.cfg.stream) == 12
        first = s.read(8)
        s.ack([e.id for e in first[:6]])
        s.publish([{"i": 12}], 0)
        # The 6 acked entries go; the 2 pending and 5 undelivered stay.
        assert s.client.xlen(s.cfg.stream) == 7
        assert [e.id for e in s.recover_pending()] == ids[6:8]
        assert [e.sample["i"] for e in s.read(100)] == [8, 9, 10, 11, 12]


def test_recover_claims_idle_entries_of_another_consumer(backend_url, tmp_path):
    cfg = RedisConfig(url=backend_url, claim_idle_ms=0)
    with ExperienceStream.connect(cfg, tmp_path) as dead:
        ids = dead.publish([{"i": i} for i in range(3)], 0)
        dead.read(3)
        other = ExperienceStream.connect(cfg.model_copy(update={"url": dead.url, "consumer": "trainer-1"}))
        try:
            assert [e.id for e in other.recover_pending()] == ids
            pending = other.client.xpending(other.cfg.stream, other.cfg.group)
            assert pending["consumers"] == [{"name": b"trainer-1", "pending": 3}]
        finally:
            other.close()


def test_embedded_server_keeps_pending_entries_across_restart(tmp_path):
    with ExperienceStream.connect(RedisConfig(), tmp_path) as s:
        ids = s.publish([{"i": i} for i in range(4)], 3)
        s.ack([e.id for e in s.read(3)[:1]])
        socket_path = s.url.removeprefix("unix://")
    assert not (tmp_path / "redis" / "server.json").exists()
    with pytest.raises(FileNotFoundError):
        open(socket_path).close()
    with ExperienceStream.connect(RedisConfig(), tmp_path) as s:
        assert [e.id for e in s.recover_pending()] == ids[1:3]
        assert [e.id for e in s.read(10)] == ids[3:]


def test_embedded_socket_moves_to_tmp_when_run_dir_path_is_too_long(tmp_path):
    run_dir = tmp_path / ("d" * 60) / ("e" * 60)
    run_dir.mkdir(parents=True)
    with ExperienceStream.connect(RedisConfig(), run_dir) as s:
        assert len(s.url) < 110
        s.publish([{"i": 0}], 0)
        assert s.lag() == 1


def test_embedded_server_of_a_killed_driver_is_adopted_not_doubled(tmp_path):
    script = (
        "import sys, time\n"
        "from rlplat.buffer import ExperienceStream, RedisConfig\n"
        "s = ExperienceStream.connect(RedisConfig(), sys.argv[1])\n"
        "s.publish([{'i': 0}, {'i': 1}], 0)\n"
        "print(s.url, flush=True)\n"
        "time.sleep(60)\n"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    url = driver.stdout.readline().strip()
    driver.kill()
    driver.wait()
    driver.stdout.close()
    with ExperienceStream.connect(RedisConfig(), tmp_path) as s:
        assert s.url == url
        assert [e.sample["i"] for e in s.read(10)] == [0, 1]
    assert not os.path.exists(url.removeprefix("unix://"))
