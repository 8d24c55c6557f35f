"""Parent side of the code sandbox: starts the fork server (``_zygote.py``) and submits runs to it.

Isolation is described in ``_zygote.py``. Which mode a host gets:
- ``root``: we are root and ``unshare --net --mount`` works (containers, CI): no network (a network namespace
  with no interfaces), per-run unprivileged uid, per-run tmpfs, world-writable dirs masked, RLIMIT_NPROC.
- ``user``: anything else: rlimits, process-group + subreaper cleanup and a Python audit hook that blocks
  sockets, writes outside the run dir, fork/exec and signals. Best effort; C/C++ are refused in this mode.

``Sandbox`` is thread-safe: each run has its own pipes, so a pool of threads calling ``run_*`` gets as many
concurrent runs (the fork server itself only forks). Sandboxes in different processes on one machine (reward
workers, Ray actors) do not share per-run uids: root mode leases them machine-wide (see ``_zygote.py``).
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_ZYGOTE = Path(__file__).with_name("_zygote.py")
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_RESULT_MAX = 64 << 20


@dataclass
class Limits:
    """Per-run resource limits (per test case for stdin/stdout runs)."""

    timeout_s: float = 5.0
    cpu_s: int | None = None  # default: ceil(timeout_s) + 1
    memory_mb: int = 1024
    fsize_mb: int = 16
    disk_mb: int = 64
    nproc: int = 32
    nofile: int = 64
    output_bytes: int = 1 << 20

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        if self.timeout_s <= 0 or not math.isfinite(self.timeout_s):
            raise ValueError(f"timeout_s must be a positive number, got {self.timeout_s}")
        d["cpu_s"] = self.cpu_s or math.ceil(self.timeout_s) + 1
        return d


def _root_mode_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class Sandbox:
    """A handle on one fork server. Start is lazy; ``close()`` (or garbage collection of the process) ends it."""

    def __init__(self, *, mode: str = "auto", hide_paths: list[str] | str = "auto"):
        if mode not in ("auto", "root", "user"):
            raise ValueError(f"sandbox mode must be 'auto', 'root' or 'user', got {mode!r}")
        self.requested_mode = mode
        # Root mode only. "auto": every top-level directory except the system ones (/usr, /lib, /etc, ...), so
        # training data, home directories and /run secrets are out of sight; the interpreter stays visible.
        if hide_paths != "auto" and not (
            isinstance(hide_paths, list) and all(isinstance(p, str) for p in hide_paths)
        ):
            raise TypeError("hide_paths must be 'auto' or a list of directory paths")
        self.hide_paths = hide_paths
        self.mode: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None and self._pid == os.getpid():
            return
        self._stop_locked()
        root = self.requested_mode == "root" or (self.requested_mode == "auto" and _root_mode_available())
        if self.requested_mode == "root" and not _root_mode_available():
            raise ValueError(
                "sandbox mode 'root' needs root and a working 'unshare --net --mount'; use mode='auto'"
            )
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-I", str(_ZYGOTE), str(child.fileno()), json.dumps(self.hide_paths)]
        if root:
            cmd = ["unshare", "--net", "--mount", "--propagation", "private", "--", *cmd, "--root"]
        self._proc = subprocess.Popen(
            cmd,
            pass_fds=(child.fileno(),),
            env={"PATH": _SAFE_PATH, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
        child.close()
        parent.settimeout(30)
        hello = b""
        try:
            while not hello.endswith(b"\n"):
                chunk = parent.recv(64)
                if not chunk:
                    break
                hello += chunk
        except TimeoutError:
            pass
        if not hello.startswith(b"ready "):
            self._proc.kill()
            raise RuntimeError(
                f"sandbox fork server failed to start (got {hello!r}); run {cmd} by hand to see why"
            )
        parent.settimeout(None)
        self._ctl = parent
        self.mode = hello.split()[1].decode()
        self._pid = os.getpid()

    def _stop_locked(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(
        self, header: dict[str, Any], program: str, trusted: dict[str, Any] | None, wait_s: float
    ) -> dict[str, Any]:
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            for attempt in range(2):
                with self._lock:
                    self._start_locked()
                    assert self._ctl is not None
                    try:
                        socket.send_fds(self._ctl, [b"R"], [req_r, res_w])
                        break
                    except OSError:
                        # The fork server died (e.g. killed by a non-root candidate); start a new one once.
                        self._stop_locked()
                        if attempt:
                            raise
        finally:
            os.close(req_r)
            os.close(res_w)
        try:
            payload = _frame(json.dumps(header).encode()) + _frame(program.encode("utf-8"))
            if trusted is not None:
                payload += _frame(json.dumps(trusted).encode())
            with os.fdopen(req_w, "wb") as f:
                f.write(payload)
        except BrokenPipeError:
            pass  # the supervisor gave up early; its result says why
        return _read_result(res_r, time.monotonic() + wait_s)

    def run_stdio(
        self, code: str, inputs: list[str], *, language: str = "python", limits: Limits | None = None
    ) -> dict[str, Any]:
        """Run ``code`` once per input on stdin. Returns raw per-case outputs; the caller compares them."""
        limits = limits or Limits()
        if not isinstance(code, str) or not all(isinstance(i, str) for i in inputs):
            raise TypeError("run_stdio takes a code string and a list of input strings")
        header = {"mode": "stdio", "language": language, "inputs": inputs, "limits": limits.to_wire()}
        wait = (limits.timeout_s + 1.0) * max(len(inputs), 1) + 40.0
        return self._submit(header, code, None, wait)

    def run_assert(
        self,
        program: str,
        tests: str,
        *,
        entry_point: str | None = None,
        prompt: str = "",
        limits: Limits | None = None,
    ) -> dict[str, Any]:
        """Judge ``program`` with assert-style ``tests`` (HumanEval: ``check(candidate)`` + ``entry_point``).

        ``prompt`` and ``tests`` are trusted (from the dataset) and run in the judge process; ``program`` is
        untrusted and runs in the candidate process. ``result["passed"]`` is the verdict.
        """
        limits = limits or Limits()
        if not all(isinstance(x, str) for x in (program, tests, prompt)):
            raise TypeError("run_assert takes strings for program, tests and prompt")
        header = {"mode": "assert", "limits": limits.to_wire()}
        trusted = {"tests": tests, "entry_point": entry_point, "prompt": prompt}
        return self._submit(header, program, trusted, limits.timeout_s + 10.0)


def _read_result(fd: int, deadline: float) -> dict[str, Any]:
    buf = bytearray()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {
                    "status": "sandbox_error",
                    "passed": False,
                    "error": "no result from the sandbox in time",
                }
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            b = os.read(fd, 1 << 20)
            if not b:
                break
            buf += b
            if len(buf) > _RESULT_MAX:
                return {"status": "sandbox_error", "passed": False, "error": "sandbox result too large"}
    finally:
        os.close(fd)
    if not buf:
        return {
            "status": "sandbox_error",
            "passed": False,
            "error": "the run's supervisor died without a result",
        }
    try:
        return json.loads(buf)
    except ValueError:
        return {"status": "sandbox_error", "passed": False, "error": "unreadable sandbox result"}


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """One shared fork server per process (recreated after a fork)."""
    global _default
    with _default_lock:
        if _default is None or _default._pid != os.getpid():
            _default = Sandbox()
        return _default


def close_default_sandbox() -> None:
    """Stop this process's shared fork server (the next ``default_sandbox()`` starts a new one), e.g. when a
    long-lived process is done judging code."""
    global _default
    with _default_lock:
        if _default is not None and _default._pid == os.getpid():
            _default.close()
        _default = None


def outputs_match(actual: str, expected: str, compare: str = "lines") -> bool:
    """Compare program output with the expected output.

    ``exact``: byte for byte. ``lines`` (default): trailing whitespace per line and trailing blank lines are
    ignored, as most judges do. ``tokens``: whitespace-separated tokens equal.
    """
    if compare == "exact":
        return actual == expected
    if compare == "lines":
        a = [line.rstrip() for line in actual.rstrip().splitlines()]
        e = [line.rstrip() for line in expected.rstrip().splitlines()]
        return a == e
    if compare == "tokens":
        return actual.split() == expected.split()
    raise ValueError(f"compare must be 'exact', 'lines' or 'tokens', got {compare!r}")
