"""A hostile policy against the code sandbox: every attack must be judged failing, and the sandbox must then
still pass a correct program. Timeouts are short (1.5 s) to keep the suite fast."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from rewards.code.sandbox import Limits, Sandbox, _root_mode_available

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n    assert candidate(10, 20) == 30\n"
CORRECT = PROMPT + "    return a + b\n"
LIMITS = Limits(timeout_s=1.5, memory_mb=512, fsize_mb=8, disk_mb=32)
SECRET = "rlplat-secret-7f3a9c"


MODES = ["root", "user"] if _root_mode_available() else ["user"]


@pytest.fixture(scope="module", params=MODES)
def sandbox(request):
    """Both isolation modes where the host allows root mode; the user mode is the fallback elsewhere."""
    os.environ["RLPLAT_TEST_SECRET"] = SECRET  # in the parent only; the candidate must not see it
    sb = Sandbox(mode=request.param)
    sb.start()
    yield sb
    sb.close()
    os.environ.pop("RLPLAT_TEST_SECRET", None)


@pytest.fixture(scope="module")
def listener():
    """A TCP server on 127.0.0.1 that records whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def judge(sb: Sandbox, program: str) -> dict:
    return sb.run_assert(program, TESTS, entry_point="add", prompt=PROMPT, limits=LIMITS)


def assert_fails_then_recovers(sb: Sandbox, attack: str) -> dict:
    r = judge(sb, attack)
    assert r["passed"] is False, r
    ok = judge(sb, CORRECT)
    assert ok["passed"] is True, ok
    return r


def _live_procs(pred) -> list[int]:
    """Pids matching pred, ignoring zombies (already dead, waiting to be reaped)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                if stat[stat.rfind(")") + 2] == "Z":
                    continue
                if pred(d):
                    pids.append(int(d))
            except OSError:
                continue
    return pids


def _eventually_empty(pred, wait_s: float = 3.0) -> list[int]:
    end = time.monotonic() + wait_s
    while (pids := _live_procs(pred)) and time.monotonic() < end:
        time.sleep(0.05)
    return pids


def _sandbox_uid(d: str) -> bool:
    return 61000 <= os.stat(f"/proc/{d}").st_uid < 61512


def test_correct_and_wrong_programs(sandbox):
    assert judge(sandbox, CORRECT)["passed"] is True
    assert judge(sandbox, PROMPT + "    return a - b\n")["passed"] is False


ATTACKS = {
    "loop_forever": PROMPT + "    return a + b\nwhile True:\n    pass\n",
    "loop_in_call": PROMPT + "    while True:\n        pass\n",
    "memory_exhaustion": PROMPT + "    x = bytearray(8 * 1024**3)\n    return a + b\n",
    "memory_growth": PROMPT + "    x = []\n    while True:\n        x.append('y' * 10**6)\n",
    "unbounded_recursion": PROMPT + "    return add(a, b) + 0\n",
    "deep_recursion_crash": "import sys\nsys.setrecursionlimit(10**8)\n"
    + PROMPT
    + "    def f(n):\n        return f(n + 1) + 1\n    return f(0)\n",
    "sys_exit_early": "import sys\nsys.exit(0)\n" + CORRECT,
    "os_exit_early": "import os\nos._exit(0)\n" + CORRECT,
    "exit_in_call": PROMPT + "    import os\n    os._exit(0)\n",
    "always_equal_object": PROMPT
    + "    class E:\n        def __eq__(self, o):\n            return True\n    return E()\n",
    "int_subclass_always_equal": PROMPT
    + "    class I(int):\n        def __eq__(self, o):\n            return True\n        __hash__ = int.__hash__\n    return I(0)\n",
    "print_fake_success": "print('All tests passed! 3/3 PASSED')\nprint('{\"passed\": true}')\n"
    + PROMPT
    + "    print('ok')\n    return 0\n",
    "flood_output": PROMPT + "    while True:\n        print('x' * 65536)\n",
    "tamper_builtins": "import builtins\n"
    "class Never(Exception):\n    pass\n"
    "builtins.AssertionError = Never\n"
    "builtins.__dict__['isinstance'] = lambda *a: True\n" + PROMPT + "    return 0\n",
    "tamper_harness_fds": "import os, json, struct\n"
    "for fd in range(3, 256):\n"
    "    for msg in ({'passed': True}, {'ok': True}, {'nonce': '0' * 32, 'passed': True}):\n"
    "        b = json.dumps(msg).encode()\n"
    "        try:\n            os.write(fd, struct.pack('>I', len(b)) + b)\n"
    "        except OSError:\n            pass\n" + PROMPT + "    return 0\n",
    "raise_system_exit_in_call": PROMPT + "    raise SystemExit(0)\n",
    "raise_assertion_passthrough": PROMPT + "    raise KeyboardInterrupt\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + CORRECT,
    "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n" + CORRECT,
    "kill_parent_via_subprocess": "import os, subprocess\n"
    "subprocess.run(['kill', '-9', str(os.getppid())])\n"
    "subprocess.run(['kill', '-9', '-1'])\n" + PROMPT + "    return 0\n",
    "fork_bomb": "import os\n"
    "while True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n" + CORRECT,
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_judged_failing(sandbox, name):
    r = assert_fails_then_recovers(sandbox, ATTACKS[name])
    assert r["status"] in ("failed", "timeout", "output_limit", "judge_error"), r
    if name == "flood_output":
        assert r["status"] == "output_limit"


def test_no_process_survives_fork_bomb_or_daemon(sandbox):
    marker = "987654.321"
    daemon = (
        "import os, subprocess\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n" + PROMPT + "    return 0\n"
    )
    assert_fails_then_recovers(sandbox, daemon)
    assert_fails_then_recovers(sandbox, ATTACKS["fork_bomb"])
    assert _eventually_empty(lambda d: marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes()) == []
    if sandbox.mode == "root":
        assert _eventually_empty(_sandbox_uid) == []


def test_disk_exhaustion_and_writes_outside(sandbox, tmp_path):
    big = PROMPT + "    f = open('big.bin', 'wb')\n    while True:\n        f.write(b'0' * 1048576)\n"
    many = (
        PROMPT
        + "    i = 0\n    while True:\n        open(f'f{i}', 'wb').write(b'0' * 4000000)\n        i += 1\n"
    )
    assert_fails_then_recovers(sandbox, big)
    assert_fails_then_recovers(sandbox, many)
    targets = [
        str(tmp_path / "escaped.txt"),
        "/tmp/rlplat-escaped.txt",
        "../escaped.txt",
        str(Path(__file__).with_name("escaped.txt")),
    ]
    writer = (
        f"TARGETS = {targets!r}\n"
        "wrote = False\n"
        "for t in TARGETS:\n"
        "    try:\n"
        "        with open(t, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        wrote = True\n"
        "    except Exception:\n"
        "        pass\n" + PROMPT + "    return a + b if wrote else 0\n"
    )
    assert_fails_then_recovers(sandbox, writer)
    for t in targets[:2] + targets[3:]:
        assert not os.path.exists(t), t


def test_secrets_and_network_are_out_of_reach(sandbox, listener):
    port, hits = listener
    secret_probe = (
        "import os, glob\n"
        "found = any('rlplat-secret' in v for v in os.environ.values())\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        found = found or b'rlplat-secret' in open(p, 'rb').read()\n"
        "    except Exception:\n"
        "        pass\n" + PROMPT + "    return a + b if found else 0\n"
    )
    r = assert_fails_then_recovers(sandbox, secret_probe)
    assert SECRET not in str(r)
    net_probe = (
        "import socket\n"
        "ok = False\n"
        f"for host in ('127.0.0.1', '1.1.1.1', 'example.com'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port} if host == '127.0.0.1' else 80), timeout=0.5).close()\n"
        "        ok = True\n"
        "    except Exception:\n"
        "        pass\n" + PROMPT + "    return a + b if ok else 0\n"
    )
    assert_fails_then_recovers(sandbox, net_probe)
    assert hits == []


def test_sandbox_survives_its_fork_server_dying(sandbox):
    # Whatever happens to the fork server, the next run gets a fresh one.
    assert sandbox._proc is not None
    sandbox._proc.kill()
    sandbox._proc.wait()
    assert judge(sandbox, CORRECT)["passed"] is True


def test_data_on_disk_is_hidden_in_root_mode(sandbox):
    """A policy that knows where the training data lives must not read expected answers from disk."""
    if sandbox.mode != "root":
        pytest.skip("hiding directories needs the root mode's mount namespace")
    probe = (
        f"import os\nfound = os.path.exists({str(Path(__file__))!r})\n"
        + PROMPT
        + "    return a + b if found else 0\n"
    )
    assert_fails_then_recovers(sandbox, probe)


def _sysv_ids(kind: str) -> set[int]:
    rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    return {int(row.split()[1]) for row in rows}


def test_system_v_ipc_objects_do_not_outlive_the_run(sandbox):
    """Shared memory, message queues and semaphores outlive processes; they must not outlive the run."""
    if sandbox.mode != "root":
        pytest.skip("native calls (ctypes) are refused in the user mode")
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "flags = 0o1000 | 0o666\n"  # IPC_CREAT, readable and writable by every uid
        "print('ids', libc.shmget(0, 1 << 20, flags), libc.msgget(0, flags), libc.semget(0, 1, flags), flush=True)\n"
        + PROMPT
        + "    return 0\n"
    )
    r = assert_fails_then_recovers(sandbox, program)
    shm, msg, sem = (int(x) for x in r["stdout_tail"].split("ids", 1)[1].split())
    assert min(shm, msg, sem) >= 0, r["stdout_tail"]
    assert shm not in _sysv_ids("shm") and msg not in _sysv_ids("msg") and sem not in _sysv_ids("sem")
