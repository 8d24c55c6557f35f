"""Several sandboxes in separate OS processes judge at once (issue 14): slow-but-correct, quick-wrong and hostile
programs side by side. No run may disturb another's: every correct program passes, no wrong or hostile one
does, and no sandbox process outlives the runs.

Each worker is its own Python process with its own ``Sandbox`` (so its own fork server), as two reward workers
or two ``rlplat reward`` commands on one machine are; all its runs are submitted at once from threads.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.code import _zygote
from rewards.code.sandbox import Limits, Sandbox, _root_mode_available

REPO = Path(__file__).resolve().parents[2]
MODES = ["root", "user"] if _root_mode_available() else ["user"]
UID_RANGE = range(_zygote.UID_BASE, _zygote.UID_BASE + _zygote.UID_COUNT)
MARKER = "424242.4242"  # argv of the sleeps hostile programs leave behind, to find survivors in user mode

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n"
STDIO_IN, STDIO_OUT = ["1 2\n", "20 22\n"], ["3", "42"]

# The sleep keeps each correct run alive while the other workers' runs start and finish around it.
SLOW_ASSERT = PROMPT + "    import time\n    time.sleep(1.0)\n    return a + b\n"
SLOW_STDIO = "import time\ntime.sleep(1.0)\nprint(sum(map(int, input().split())))\n"
WRONG_ASSERT = PROMPT + "    return a - b\n"
WRONG_STDIO = "print(sum(map(int, input().split())) + 1)\n"
HOSTILE = {
    # Signals every process it can see for a while, through libc so that the audit hook does not see it, but
    # spares its own uid (its judge) so that its run stays alive and keeps trying; with a uid shared across
    # sandboxes it kills their candidates.
    "kill_other_pids": "import ctypes, os, time\n"
    "libc = ctypes.CDLL(None)\n"
    "end = time.monotonic() + 1.5\n"
    "while time.monotonic() < end:\n"
    "    for d in os.listdir('/proc'):\n"
    "        try:\n"
    "            if d.isdigit() and os.stat(f'/proc/{d}').st_uid != os.getuid():\n"
    "                libc.kill(int(d), 9)\n"
    "        except OSError:\n"
    "            pass\n"
    "    time.sleep(0.05)\n" + WRONG_ASSERT,
    "kill_minus_one": "import ctypes\nctypes.CDLL(None).kill(-1, 9)\n" + WRONG_ASSERT,
    "shell_kill_minus_one": "import subprocess\nsubprocess.run(['kill', '-9', '-1'])\n" + WRONG_ASSERT,
    # Holds as many processes as RLIMIT_NPROC allows; with a shared uid, other runs could not fork at all.
    "fork_bomb": "import os\n"
    "try:\n"
    "    for _ in range(256):\n"
    "        if os.fork() == 0:\n"
    f"            os.execv('/bin/sleep', ['sleep', '{MARKER}'])\n"
    "except OSError:\n"
    "    pass\n" + PROMPT + "    import time\n    time.sleep(1.5)\n    return a - b\n",
    "spin": "while True:\n    pass\n" + WRONG_ASSERT,
    "daemon": "import subprocess\n"
    f"subprocess.Popen(['sleep', '{MARKER}'], start_new_session=True)\n" + WRONG_ASSERT,
}
HOSTILE_STDIO = {
    "stdio_shell_kill_minus_one": "import os\nos.system('kill -9 -1')\nprint(3)\n",
    "stdio_spin": "while True:\n    pass\n",
}

# Workers run a script, not a multiprocessing target: the test module is imported by file path
# (--import-mode=importlib), so a spawned child could not import a function from it.
WORKER = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from rewards.code.sandbox import Limits, Sandbox

spec = json.loads(sys.argv[1])
limits = Limits(timeout_s=spec["timeout_s"], memory_mb=256)

def judge(job):
    if job["kind"] == "assert":
        r = sb.run_assert(job["program"], spec["tests"], entry_point="add", prompt=spec["prompt"], limits=limits)
        return {"passed": r.get("passed") is True, "raw": r}
    r = sb.run_stdio(job["program"], spec["inputs"], limits=limits)
    cases = r.get("cases", [])
    ok = len(cases) == len(spec["outputs"]) and all(
        c["status"] == "ok" and c["stdout"].strip() == want for c, want in zip(cases, spec["outputs"])
    )
    return {"passed": ok, "raw": r}

with Sandbox(mode=spec["mode"]) as sb:
    with ThreadPoolExecutor(len(spec["jobs"])) as pool:
        out = list(pool.map(judge, spec["jobs"]))
print(json.dumps(out))
"""


def _job(name: str, kind: str, program: str, correct: bool) -> dict:
    return {"name": name, "kind": kind, "program": program, "correct": correct}


def _worker_jobs(i: int) -> list[dict]:
    """Each worker judges slow-correct programs next to its own and the other workers' wrong/hostile ones."""
    jobs = [_job(f"slow_assert_{i}_{k}", "assert", SLOW_ASSERT, True) for k in range(3)] + [
        _job(f"slow_stdio_{i}", "stdio", SLOW_STDIO, True),
        _job(f"wrong_assert_{i}", "assert", WRONG_ASSERT, False),
        _job(f"wrong_stdio_{i}", "stdio", WRONG_STDIO, False),
    ]
    hostile = sorted(HOSTILE.items()) + sorted(HOSTILE_STDIO.items())
    for name, program in hostile[i::3]:
        jobs.append(_job(name, "assert" if name in HOSTILE else "stdio", program, False))
    return jobs


def _live_procs(pred) -> list[int]:
    """Pids matching pred, ignoring zombies (already dead, waiting to be reaped)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                if stat[stat.rfind(")") + 2] != "Z" and pred(d):
                    pids.append(int(d))
            except OSError:
                continue
    return pids


def _survivors(wait_s: float = 3.0) -> list[int]:
    def leftover(d: str) -> bool:
        return (
            os.stat(f"/proc/{d}").st_uid in UID_RANGE
            or MARKER.encode() in Path(f"/proc/{d}/cmdline").read_bytes()
        )

    end = time.monotonic() + wait_s
    while (pids := _live_procs(leftover)) and time.monotonic() < end:
        time.sleep(0.05)
    return pids


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_sandboxes_in_separate_processes_do_not_interfere(mode):
    n_workers = 3
    specs = [
        {
            "mode": mode,
            "timeout_s": 4.0,
            "prompt": PROMPT,
            "tests": TESTS,
            "inputs": STDIO_IN,
            "outputs": STDIO_OUT,
            "jobs": _worker_jobs(i),
        }
        for i in range(n_workers)
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
            text=True,
        )
        for spec in specs
    ]
    wrong: list[str] = []
    for w, spec in zip(workers, specs):
        stdout, stderr = w.communicate(timeout=120)
        assert w.returncode == 0, stderr[-3000:]
        for job, res in zip(spec["jobs"], json.loads(stdout)):
            if res["passed"] is not job["correct"]:
                raw = {k: v for k, v in res["raw"].items() if k != "judge_output_tail"}
                wrong.append(f"{job['name']}: passed={res['passed']} {json.dumps(raw)[:400]}")
    assert wrong == [], "\n".join(wrong)
    assert _survivors() == []


HOLDER = """
import os, sys, time
from rewards.code._zygote import lease_uid
uid, _ = lease_uid(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY), 0)
print(uid, flush=True)
time.sleep(60)
"""


def test_uid_leases_are_exclusive_across_processes_and_freed_when_the_holder_dies(tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    held: list[int] = []
    try:
        assert holder.stdout is not None
        assert int(holder.stdout.readline()) == _zygote.UID_BASE
        first = _zygote.lease_uid(dir_fd, 0)
        assert first is not None and first[0] == _zygote.UID_BASE + 1
        held.append(first[1])
        # Locks belong to open files, not processes: a second lease in this process skips our own uid too.
        second = _zygote.lease_uid(dir_fd, 1)
        assert second is not None and second[0] == _zygote.UID_BASE + 2
        held.append(second[1])
        holder.kill()
        holder.wait()
        # The kernel dropped the dead holder's lock, so its uid is free again.
        again = _zygote.lease_uid(dir_fd, 0)
        assert again is not None and again[0] == _zygote.UID_BASE
        held.append(again[1])
        while (lease := _zygote.lease_uid(dir_fd, 0)) is not None:
            held.append(lease[1])
        assert len(held) == _zygote.UID_COUNT
    finally:
        holder.kill()
        holder.wait()
        for fd in held:
            os.close(fd)
        os.close(dir_fd)


def _children(pid: int) -> list[int]:
    return _live_procs(lambda d: Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid))


def _wait_for(pred, wait_s: float = 10.0) -> list[int]:
    end = time.monotonic() + wait_s
    while not (pids := _live_procs(pred)) and time.monotonic() < end:
        time.sleep(0.05)
    return pids


@pytest.mark.skipif(not _root_mode_available(), reason="uid leases are a root-mode feature")
def test_a_crashed_supervisors_processes_are_killed_and_its_uid_released():
    marker = "424242.4243"
    program = f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\ntime.sleep(30)\n"
    with Sandbox(mode="root") as sb:
        assert sb._proc is not None
        zygote = sb._proc.pid
        result: list[dict] = []
        t = threading.Thread(
            target=lambda: result.append(sb.run_stdio(program, [""], limits=Limits(timeout_s=20)))
        )
        t.start()
        try:
            (daemon,) = _wait_for(lambda d: marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes())
            uid = os.stat(f"/proc/{daemon}").st_uid
            assert uid in UID_RANGE
            (supervisor,) = _children(zygote)
            os.kill(supervisor, signal.SIGKILL)
            t.join(timeout=10)
            assert result and result[0]["status"] == "sandbox_error", result
            # The zygote sees that the supervisor died before its clean-up and kills the run's processes itself.
            assert _survivors() == []
            lock = os.open(f"{_zygote.LEASE_DIR}/{uid}", os.O_RDWR)
            try:
                end = time.monotonic() + 3
                while True:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        assert time.monotonic() < end, f"uid {uid} is still leased after its run died"
                        time.sleep(0.05)
            finally:
                os.close(lock)
        finally:
            t.join(timeout=30)


@pytest.mark.skipif(not _root_mode_available(), reason="uid leases are a root-mode feature")
def test_next_lessee_kills_a_crashed_holders_leftovers_and_a_full_range_is_refused():
    # Prints how many other processes share the candidate's uid: none may, or they could signal it. Zombies
    # count too (the audit hook keeps the candidate from reading /proc/<pid>/stat), so it looks again for up
    # to 2 s, while the test reaps the killed leftover.
    count_uid_mates = (
        "import os, time\n"
        "end = time.monotonic() + 2\n"
        "while True:\n"
        "    n = 0\n"
        "    for d in os.listdir('/proc'):\n"
        "        try:\n"
        "            n += d.isdigit() and int(d) != os.getpid() and os.stat(f'/proc/{d}').st_uid == os.getuid()\n"
        "        except OSError:\n"
        "            pass\n"
        "    if n == 0 or time.monotonic() > end:\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "print(n)\n"
    )
    with Sandbox(mode="root") as sb:
        dir_fd = os.open(_zygote.LEASE_DIR, os.O_RDONLY | os.O_DIRECTORY)
        held: dict[int, int] = {}
        leftover = None
        try:
            # For about a second every sandbox on this machine is refused a uid; nothing else runs them in CI.
            while (lease := _zygote.lease_uid(dir_fd, 0)) is not None:
                held[lease[0]] = lease[1]
            full = sb.run_stdio(count_uid_mates, [""])
            assert full["status"] == "sandbox_error" and "too many concurrent runs" in full["error"], full
            # A process left behind under a uid whose holder is gone: the one uid we now give back.
            uid, fd = held.popitem()
            leftover = subprocess.Popen(["sleep", MARKER], user=uid, group=uid, start_new_session=True)
            reaper = threading.Thread(target=leftover.wait)
            reaper.start()
            os.close(fd)
            r = sb.run_stdio(count_uid_mates, [""], limits=Limits(timeout_s=4))
            assert r["status"] == "done" and r["cases"][0]["stdout"] == "0\n", r
            reaper.join(timeout=5)
            assert leftover.returncode == -signal.SIGKILL
        finally:
            if leftover is not None and leftover.poll() is None:
                leftover.kill()
                leftover.wait()
            for fd in held.values():
                os.close(fd)
            os.close(dir_fd)
