"""Sandbox fork server: runs untrusted programs. Standalone (stdlib only), started by rewards/code/sandbox.py.

Process tree per run (R = root mode, N = non-root fallback):

  zygote (this script, started once: scrubbed env; R: inside `unshare --net --mount`, world-writable dirs
     |     replaced by private tmpfs mounts)
     +-- S supervisor (trusted, per run): own session, child subreaper, not dumpable; holds the limits
           +-- G candidate: rlimits, private tmpfs dir, scrubbed env, R: unprivileged per-run uid with
           |     no_new_privs, N: audit hook; executes the untrusted code
           +-- J judge (assert tests only): runs the trusted prompt + tests, calls G's functions over a pipe
                 that only carries plain data (no pickle), reports the verdict + per-run nonce on a pipe G
                 cannot reach

Why this shape: a pass must come from information the candidate cannot forge. Candidate code runs in its own
process, so it can patch builtins, `AssertionError`, `sys.exit`, or return objects whose `__eq__` is always
True — none of that crosses a pipe that decodes only genuine builtin values. Forking from a warm interpreter
instead of exec'ing a fresh one per run is what makes the ~15 programs/s target cheap; the zygote holds no
secrets (empty environment, no data), and the tests are read by S only after G has been forked, so they are
never in the candidate's memory.

R (root, e.g. containers) is kernel-enforced: network namespace without interfaces, per-run uid (so
RLIMIT_NPROC works and `kill(-1)` run as that uid removes every process the candidate left, including
daemons that called setsid), per-run tmpfs with size and inode limits. N (not root) is best effort: rlimits,
an audit hook that blocks sockets, writes outside the run dir, fork/exec, kill and ctypes; Python audit
hooks can be bypassed by a determined attacker, so production runs should use R.

Per-run uids (R) are leased machine-wide, not per fork server: several sandboxes share one machine (threads
share a fork server; reward workers, Ray actors and CLI runs each start their own), and a uid shared by two live
runs would let either run's clean-up, or its candidate, kill the other's processes. A lease is an exclusive
`flock` on LEASE_DIR/<uid>, taken by the zygote before it forks the run's supervisor, which inherits the same
open file (so the same lock). The lock lives while either still holds it: the supervisor until it has killed and
reaped the uid's processes, removed its System V IPC objects and exits, the zygote until it has reaped the
supervisor (and, if that died before its clean-up, cleared the uid itself). The kernel drops a lock when its
last holder dies, however it dies, so a crash cannot leak a uid; the next lessee of a uid first clears whatever
a crashed holder left behind, which is safe because the lock proves that no live run owns it. The uid range must
not be used by anything else on the machine. Other per-run resources need no lease: run directories are created
with mkdir (which fails rather than share) under names holding the supervisor's pid and random bytes, inside the
zygote's private /tmp in R, and mounts live in the zygote's own mount namespace.

Wire format: control socket (AF_UNIX SOCK_STREAM) carries one byte plus two fds per run (request read end,
result write end). Request pipe: frames of 4-byte big-endian length + bytes: header JSON, program, then
(assert mode) the trusted part JSON. Result pipe: one JSON document.
"""

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MNT_DETACH = 2
IPC_RMID = 0
UID_BASE, UID_COUNT = 61000, 512
# Under /run (root-owned, a tmpfs on most hosts, so stale lock files vanish on reboot); never in a directory
# other users can write, where they could hold or swap the lock files.
LEASE_DIR = "/run/rlplat-sandbox"
RPC_MAX = 16 << 20
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
ROOT = os.geteuid() == 0 and "--root" in sys.argv
BASE = "/tmp/rlplat-sbx" if ROOT else f"/tmp/rlplat-sbx-{os.getuid()}"


def prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def mount_tmpfs(path, opts, flags=MS_NOSUID | MS_NODEV):
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(flags), opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount tmpfs on {path}: {os.strerror(e)}")


def umount(path):
    _libc.umount2(path.encode(), MNT_DETACH)


# ---------------------------------------------------------------- plain-data codec (judge <-> candidate)


def enc(x, depth=0):
    """Encode genuine builtin values only; anything else (incl. subclasses) is refused."""
    if depth > 200:
        raise ValueError("value nested deeper than 200")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return {"i": str(x)}  # str keeps ints exact and distinct from floats/bools through JSON
    if t is float:
        return {"f": repr(x)}
    if t is list or t is tuple or t is set or t is frozenset:
        return {t.__name__: [enc(v, depth + 1) for v in x]}
    if t is dict:
        return {"dict": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t is complex:
        return {"complex": [repr(x.real), repr(x.imag)]}
    raise TypeError(
        f"cannot pass a {t.__module__}.{t.__qualname__} between candidate and tests (plain data only)"
    )


def dec(x, depth=0):
    if depth > 200:
        raise ValueError("value nested deeper than 200")
    if x is None or type(x) is bool or type(x) is str:
        return x
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed value")
    ((k, v),) = x.items()
    if k == "i" and type(v) is str:
        return int(v)
    if k == "f" and type(v) is str:
        return float(v)
    if k in ("list", "tuple", "set", "frozenset") and type(v) is list:
        items = [dec(i, depth + 1) for i in v]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[k](items)
    if k == "dict" and type(v) is list:
        return {dec(p[0], depth + 1): dec(p[1], depth + 1) for p in v}
    if k == "bytes" and type(v) is str:
        return bytes.fromhex(v)
    if k == "complex" and type(v) is list and len(v) == 2:
        return complex(float(v[0]), float(v[1]))
    raise ValueError(f"malformed value tag {k!r}")


def send_msg(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        n = os.write(fd, data)
        data = data[n:]


def read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 20))
        if not b:
            raise EOFError("peer closed the pipe")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def recv_frame(fd, limit):
    (n,) = struct.unpack(">I", read_exact(fd, 4))
    if n > limit:
        raise ValueError(f"message of {n} bytes is over the {limit}-byte limit")
    return read_exact(fd, n)


# ---------------------------------------------------------------- candidate / judge process setup


def _audit_hook_factory(run_dir):
    """Defense in depth (and the main barrier in non-root mode): refuse escapes at the Python level."""
    allowed = os.path.realpath(run_dir) + os.sep
    blocked = frozenset(
        (
            "socket.__new__",
            "socket.connect",
            "socket.bind",
            "socket.getaddrinfo",
            "os.fork",
            "os.forkpty",
            "os.posix_spawn",
            "os.exec",
            "os.system",
            "subprocess.Popen",
            "pty.spawn",
            "ctypes.dlopen",
            "ctypes.dlsym",
            "ctypes.cdata",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "sys.addaudithook",
            "os.kill",
            "os.killpg",
            "signal.pthread_kill",
            "os.chdir",
            "os.setuid",
        )
    )
    realpath, sep, getpid = os.path.realpath, os.sep, os.getpid

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, str | bytes):
                parts = realpath(os.fsdecode(path)).split(sep)
                # /proc/<other pid>/environ etc.: same-uid processes (the trainer, in non-root mode) hold secrets.
                if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != getpid():
                    raise PermissionError("sandbox: reading other processes' /proc entries is not allowed")
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            )
            if writing and isinstance(path, str | bytes):
                p = realpath(os.fsdecode(path))
                if not (p + sep).startswith(allowed):
                    raise PermissionError(f"sandbox: writing outside the run directory is not allowed: {p}")
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (0, getpid()):
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "subprocess.Popen"):
            if not ROOT:  # root mode bounds processes in the kernel (per-run uid + RLIMIT_NPROC)
                raise PermissionError(f"sandbox: {event} is not allowed")
        elif event.startswith("ctypes."):
            # Native calls would step around this hook; in root mode the kernel enforces the limits, and numpy
            # needs ctypes at import, so only the non-root mode refuses them.
            if not ROOT:
                raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")

    return hook


def _count_user_procs(uid):
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def enter_jail(req, run_dir, uid, keep_fds, stdin_fd, stdout_fd, stderr_fd, dumpable):
    """Irreversibly restrict this (forked) process. Runs before any untrusted or test code."""
    os.setpgid(0, 0)
    for sig in (
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGPIPE,
        signal.SIGCHLD,
        signal.SIGXFSZ,
        signal.SIGXCPU,
    ):
        signal.signal(sig, signal.SIG_DFL)
    for target, src in ((0, stdin_fd), (1, stdout_fd), (2, stderr_fd)):
        os.dup2(src, target)
    prev = 3
    for fd in sorted(k for k in keep_fds if k >= 3):
        os.closerange(prev, fd)
        prev = fd + 1
    os.closerange(prev, 65536)
    for fd in keep_fds:
        os.set_inheritable(fd, False)
    os.chdir(run_dir)
    os.environ.clear()
    os.environ.update(
        {
            "PATH": SAFE_PATH,
            "HOME": run_dir,
            "TMPDIR": run_dir,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
        }
    )
    lim = req["limits"]
    mem = int(lim["memory_mb"]) << 20
    rl = [
        (resource.RLIMIT_CPU, int(lim["cpu_s"])),
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_DATA, mem),
        (resource.RLIMIT_FSIZE, int(lim["fsize_mb"]) << 20),
        (resource.RLIMIT_NOFILE, int(lim["nofile"])),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ]
    if ROOT:
        rl.append((resource.RLIMIT_NPROC, int(lim["nproc"])))
    for what, value in rl:
        resource.setrlimit(what, (value, value))
    if ROOT:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    prctl(PR_SET_DUMPABLE, 1 if dumpable else 0)
    # Hide the fork server's own state (the libc handle, this module) from the code about to run.
    for name in [m for m in sys.modules if m == "__main__" or m.startswith(("ctypes", "_ctypes"))]:
        del sys.modules[name]
    sys.addaudithook(_audit_hook_factory(run_dir))
    sys.setrecursionlimit(3000)


def run_python_main(code):
    """Execute a script like `python script.py` would; never returns."""
    import builtins

    status = 0
    try:
        ns = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
        sys.argv = ["solution.py"]
        exec(compile(code, "solution.py", "exec"), ns)
    except SystemExit as e:
        status = e.code if type(e.code) is int else (0 if e.code is None else 1)
        if e.code is not None and type(e.code) is not int:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 1
    os._exit(status & 0xFF)


def serve_candidate(program, rpc_in, rpc_out):
    """Candidate side of assert tests: define the program, then answer calls with plain data."""
    import builtins

    ns = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(program, "solution.py", "exec"), ns)
        names = [k for k, v in list(ns.items()) if type(k) is str and callable(v) and not k.startswith("__")]
        send_msg(rpc_out, {"ready": names})
    except BaseException as e:
        send_msg(rpc_out, {"load_error": f"{type(e).__name__}: {e}"[:2000]})
        os._exit(1)
    while True:
        try:
            req = json.loads(recv_frame(rpc_in, RPC_MAX))
        except EOFError:
            os._exit(0)
        try:
            fn = ns[req["name"]]
            args = [dec(a) for a in req["args"]]
            kwargs = {k: dec(v) for k, v in req["kwargs"]}
            out = {"ok": enc(fn(*args, **kwargs))}
        except BaseException as e:
            out = {"exc": type(e).__name__, "msg": str(e)[:500]}
        try:
            send_msg(rpc_out, out)
        except (TypeError, ValueError) as e:
            send_msg(rpc_out, {"exc": "TypeError", "msg": f"unencodable result: {e}"[:500]})


def _names_used(code_obj):
    names = set(code_obj.co_names)
    for c in code_obj.co_consts:
        if hasattr(c, "co_names"):
            names |= _names_used(c)
    return names


def run_judge(trusted, rpc_in, rpc_out, verdict_fd, nonce):
    """Judge side: trusted prompt + tests; the candidate is reachable only as plain-data proxies."""
    import builtins

    def finish(passed, error=None):
        send_msg(verdict_fd, {"nonce": nonce, "passed": passed, "error": error})
        os._exit(0)

    try:
        hello = json.loads(recv_frame(rpc_in, RPC_MAX))
    except Exception as e:
        finish(False, f"candidate did not start: {type(e).__name__}: {e}")
    if "load_error" in hello:
        finish(False, f"candidate program failed to load: {hello['load_error']}")
    reported = hello.get("ready")
    if type(reported) is not list:
        finish(False, "candidate sent a malformed hello")
    ns = {"__name__": "__tests__", "__builtins__": builtins}
    try:
        if trusted.get("prompt"):
            exec(compile(trusted["prompt"], "prompt.py", "exec"), ns)
        test_code = compile(trusted["tests"], "tests.py", "exec")
    except BaseException as e:
        finish(
            False,
            f"trusted prompt/tests do not run on their own ({type(e).__name__}: {e}); fix the dataset row",
        )
    entry = trusted.get("entry_point")
    builtin_names = set(dir(builtins))
    # Only names the tests actually use, that are not builtins and not defined by the trusted prompt, may be
    # bound to candidate functions; otherwise a candidate defining `abs` or `check` could replace the judge's.
    wanted = {entry} if entry else (_names_used(test_code) - builtin_names - set(ns))
    proxies = {}

    def make_proxy(name):
        def proxy(*args, **kwargs):
            send_msg(
                rpc_out,
                {
                    "name": name,
                    "args": [enc(a) for a in args],
                    "kwargs": [[k, enc(v)] for k, v in kwargs.items()],
                },
            )
            reply = json.loads(recv_frame(rpc_in, RPC_MAX))
            if type(reply) is not dict:
                raise RuntimeError("malformed reply from candidate")
            if "ok" in reply:
                return dec(reply["ok"])
            exc_name = reply.get("exc") if type(reply.get("exc")) is str else "Exception"
            exc_type = getattr(builtins, exc_name, None)
            # Only ordinary exceptions are re-raised by type; AssertionError etc. from the candidate stay
            # failures, and a candidate cannot raise anything that a test would treat as success except a
            # builtin exception the test explicitly expects.
            if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
                exc_type = RuntimeError
            raise exc_type(f"candidate raised {exc_name}: {reply.get('msg')}")

        proxy.__name__ = proxy.__qualname__ = name
        return proxy

    for name in reported:
        if type(name) is str and name.isidentifier() and name in wanted and name not in builtin_names:
            proxies[name] = make_proxy(name)
    if entry and entry not in proxies:
        finish(False, f"the program does not define {entry!r}")
    ns.update(proxies)
    try:
        exec(test_code, ns)
        check = ns.get("check")
        if entry and callable(check):
            check(proxies[entry])
    except BaseException as e:
        finish(False, f"{type(e).__name__}: {e}"[:2000])
    finish(True)


# ---------------------------------------------------------------- machine-wide uid leases (R only)


def open_lease_dir():
    """The directory of uid lock files, opened before the jail's mounts hide /run from this process."""
    os.makedirs(LEASE_DIR, mode=0o700, exist_ok=True)
    fd = os.open(LEASE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise PermissionError(
            f"{LEASE_DIR} must be a directory owned by root and writable only by root; remove it and retry"
        )
    return fd


def lease_uid(dir_fd, start):
    """Lock a free uid of the range for one run. Returns (uid, lock fd), or None when every uid is in use.

    Lock files are never deleted: unlinking one while another process has it open would let two runs lock
    two different files of the same name.
    """
    for i in range(UID_COUNT):
        uid = UID_BASE + (start + i) % UID_COUNT
        fd = os.open(str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    return None


def clear_uid(uid):
    """Remove everything of `uid` that outlives a run. Only call this while holding the uid's lease."""
    kill_uid(uid)
    remove_ipc_of(uid)


def kill_uid(uid):
    """SIGKILL every process of `uid`. Only call this while holding the uid's lease: then all of them are ours."""
    # A second pass is cheap insurance against a child forked while the first kill(-1) walked the process list.
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)  # every process of this uid (but this one), wherever it went
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def remove_ipc_of(uid):
    """Delete the System V IPC objects that `uid` created or owns (call after killing its processes).

    Shared memory, message queues and semaphores outlive their creator: left alone they would hold memory and
    hand data to the uid's next run. The owner can give an object away (IPC_SET), the creator cannot change.
    """
    for kind, id_col, remove in (
        ("shm", "shmid", lambda i: _libc.shmctl(i, IPC_RMID, None)),
        ("msg", "msqid", lambda i: _libc.msgctl(i, IPC_RMID, None)),
        ("sem", "semid", lambda i: _libc.semctl(i, 0, IPC_RMID)),
    ):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = f.read().splitlines()
        except OSError:
            continue  # a kernel without System V IPC
        cols = header.split()
        for row in rows:
            obj = dict(zip(cols, row.split()))
            if uid in (int(obj["uid"]), int(obj["cuid"])):
                remove(int(obj[id_col]))


# ---------------------------------------------------------------- supervisor


class Run:
    def __init__(self, req_fd, res_fd, uid):
        self.req_fd, self.res_fd, self.uid = req_fd, res_fd, uid
        self.dirs = []
        self.statuses = {}  # pid -> wait status, for children reaped while reaping everything

    def make_dir(self, name, size_mb):
        path = os.path.join(BASE, f"{name}-{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(path, 0o700)
        self.dirs.append(path)
        if ROOT:
            mount_tmpfs(path, f"size={int(size_mb)}m,nr_inodes=4096,mode=0700,uid={self.uid},gid={self.uid}")
        return path

    def cleanup(self):
        """Kill and reap everything the run started. Returns whether every child was reaped."""
        self.kill_all()
        for d in self.dirs:
            if ROOT:
                umount(d)
            shutil.rmtree(d, ignore_errors=True)
        # The uid's lease ends when this process exits; a zombie left behind would still count against
        # RLIMIT_NPROC for the uid's next run. Killed processes exit within milliseconds, so this rarely waits.
        return self.reap(2.0)

    def kill_all(self):
        if ROOT:
            clear_uid(self.uid)
        else:
            me = str(os.getpid())
            for _ in range(50):
                kids = []
                for d in os.listdir("/proc"):
                    if d.isdigit():
                        try:
                            with open(f"/proc/{d}/stat") as f:
                                st = f.read()
                        except OSError:
                            continue
                        if st[st.rfind(")") + 2 :].split()[1] == me:
                            kids.append(int(d))
                if not kids:
                    break
                for k in kids:
                    with contextlib.suppress(OSError):
                        os.kill(k, signal.SIGKILL)
                self.reap(0.05)
        self.reap(0)

    def reap(self, wait_s):
        """Reap children for up to `wait_s`. Returns True once none are left."""
        end = time.monotonic() + wait_s
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                if time.monotonic() >= end:
                    return False
                time.sleep(0.005)
            else:
                self.statuses[pid] = st

    def wait_status(self, pid, deadline):
        while True:
            if pid in self.statuses:
                return self.statuses[pid]
            try:
                p, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return self.statuses.get(pid)
            if p == pid:
                self.statuses[pid] = st
                return st
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def spawn(self, req, run_dir, keep, stdin_fd, stdout_fd, stderr_fd, close_in_parent, body, dumpable=True):
        pid = os.fork()
        if pid == 0:
            try:
                enter_jail(req, run_dir, self.uid, keep, stdin_fd, stdout_fd, stderr_fd, dumpable)
                body()
            except BaseException:
                try:
                    traceback.print_exc()
                finally:
                    os._exit(70)
            os._exit(0)
        for fd in close_in_parent:
            os.close(fd)
        return pid


def pump(fds, cap, deadline, stop_pids=(), stop_fd=None):
    """Read pipes until all close, the deadline passes, or output exceeds `cap`. Returns (data, why)."""
    data = {fd: bytearray() for fd in fds}
    open_fds = set(fds) | ({stop_fd} if stop_fd is not None else set())
    stop_data = bytearray()
    why = "eof"
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            why = "timeout"
            break
        r, _, _ = select.select(list(open_fds), [], [], min(left, 0.5))
        for fd in r:
            try:
                b = os.read(fd, 65536)
            except OSError:
                b = b""
            if not b:
                open_fds.discard(fd)
                continue
            if fd == stop_fd:
                stop_data += b
                continue
            data[fd] += b
            if sum(len(v) for v in data.values()) > cap:
                why = "output_limit"
                open_fds.clear()
                break
        if stop_fd is not None and stop_fd not in open_fds and why == "eof":
            break
    return data, why, bytes(stop_data)


def describe_exit(st):
    if st is None:
        return None, None
    if os.WIFSIGNALED(st):
        return None, signal.Signals(os.WTERMSIG(st)).name
    return os.WEXITSTATUS(st), None


def supervise(req_fd, res_fd, uid):
    os.setsid()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    run = Run(req_fd, res_fd, uid)
    clean = False
    try:
        if ROOT:
            # The lease is ours, so any process or IPC object of this uid is left over from a holder that died
            # before its clean-up; it must not share the uid with this run's candidate.
            clear_uid(uid)
        result = _supervise(run)
    except BaseException as e:
        result = {
            "status": "sandbox_error",
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-2000:],
        }
    finally:
        try:
            clean = run.cleanup()
        except BaseException as e:
            result = {"status": "sandbox_error", "error": f"cleanup failed: {e}"}
    data = json.dumps(result).encode()
    try:
        while data:
            n = os.write(res_fd, data)
            data = data[n:]
    finally:
        # The exit status tells the zygote whether the uid still needs clearing before its lease is released.
        os._exit(0 if clean else 1)


def _supervise(run):
    req = json.loads(recv_frame(run.req_fd, 1 << 20))
    program = recv_frame(run.req_fd, 64 << 20).decode("utf-8")
    lim = req["limits"]
    cap = int(lim["output_bytes"])
    run_dir = run.make_dir("run", lim["disk_mb"])
    if req["mode"] == "stdio":
        os.close(run.req_fd)
        return run_stdio(run, req, program, run_dir, cap)
    if req["mode"] != "assert":
        return {"status": "sandbox_error", "error": f"unknown mode {req['mode']!r}"}
    j2g_r, j2g_w = os.pipe()
    g2j_r, g2j_w = os.pipe()
    g_out_r, g_out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    t0 = time.monotonic()
    deadline = t0 + float(lim["timeout_s"])
    # Fork the candidate before reading the tests: they must never be in its memory.
    gpid = run.spawn(
        req,
        run_dir,
        [j2g_r, g2j_w],
        null,
        g_out_w,
        g_out_w,
        [g_out_w],
        lambda: serve_candidate(program, j2g_r, g2j_w),
    )
    trusted = json.loads(recv_frame(run.req_fd, 64 << 20))
    os.close(run.req_fd)
    nonce = os.urandom(16).hex()
    v_r, v_w = os.pipe()
    j_out_r, j_out_w = os.pipe()
    empty = os.path.join(BASE, "empty")
    run.spawn(
        req,
        empty,
        [g2j_r, j2g_w, v_w],
        null,
        j_out_w,
        j_out_w,
        [j2g_r, g2j_w, j2g_w, g2j_r, v_w, j_out_w, null],
        lambda: run_judge(trusted, g2j_r, j2g_w, v_w, nonce),
        dumpable=False,
    )
    data, why, verdict_raw = pump([g_out_r, j_out_r], cap, deadline, stop_fd=v_r)
    elapsed = time.monotonic() - t0
    for fd in (g_out_r, j_out_r, v_r):
        os.close(fd)
    if why == "eof":
        # The judge has finished, so the candidate reads end-of-file and exits by itself; waiting a moment lets
        # its exit status tell how it ended instead of only that the clean-up killed it.
        run.wait_status(gpid, time.monotonic() + 0.2)
    run.kill_all()
    g_code, g_sig = describe_exit(run.wait_status(gpid, time.monotonic() + 0.5))
    out = {
        "mode": "assert",
        "time_s": round(elapsed, 4),
        "stdout_tail": data[g_out_r][-2000:].decode("utf-8", "replace"),
        "judge_output_tail": data[j_out_r][-2000:].decode("utf-8", "replace"),
        "candidate_exit": g_code,
        "candidate_signal": g_sig,
    }
    verdict = None
    try:
        (n,) = struct.unpack(">I", verdict_raw[:4])
        v = json.loads(verdict_raw[4 : 4 + n])
        if type(v) is dict and v.get("nonce") == nonce:
            verdict = v
    except Exception:
        verdict = None
    if why == "output_limit":
        out.update(status="output_limit", passed=False, error=f"output over {cap} bytes")
    elif verdict is None:
        status = "timeout" if why == "timeout" else "judge_error"
        out.update(
            status=status,
            passed=False,
            error="no verdict from the judge" + (" before the deadline" if why == "timeout" else ""),
        )
    else:
        out.update(
            status="passed" if verdict["passed"] is True else "failed",
            passed=verdict["passed"] is True,
            error=verdict.get("error"),
        )
    return out


def run_stdio(run, req, program, run_dir, cap):
    lim = req["limits"]
    lang = req.get("language", "python")
    inputs = req["inputs"]
    argv = None
    if lang in ("cpp", "c++", "c"):
        if not ROOT:
            # A native binary is outside the reach of the Python audit hook that is the non-root barrier.
            return {
                "status": "unsupported_language",
                "error": f"{lang!r} needs the root sandbox mode",
                "cases": [],
            }
        compiler = shutil.which("g++" if lang != "c" else "gcc", path=SAFE_PATH)
        if compiler is None:
            return {
                "status": "unsupported_language",
                "error": f"no compiler for {lang!r} on this host",
                "cases": [],
            }
        src = os.path.join(run_dir, "main.cpp" if lang != "c" else "main.c")
        with open(src, "w", encoding="utf-8") as f:
            f.write(program)
        creq = {
            "limits": {
                **lim,
                "memory_mb": max(int(lim["memory_mb"]), 2048),
                "cpu_s": 30,
                "nproc": 64,
                "nofile": 256,
            }
        }
        out_r, out_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        exe = os.path.join(run_dir, "main")
        cmd = [compiler, "-O2", "-std=c++17" if lang != "c" else "-std=c11", "-o", exe, src]
        pid = run.spawn(
            creq, run_dir, [], null, out_w, out_w, [out_w, null], lambda: os.execve(compiler, cmd, os.environ)
        )
        data, why, _ = pump([out_r], cap, time.monotonic() + 30, ())
        os.close(out_r)
        code, _ = describe_exit(run.wait_status(pid, time.monotonic() + 1))
        run.kill_all()
        if why != "eof" or code != 0:
            return {
                "status": "compile_error",
                "error": data[out_r][-4000:].decode("utf-8", "replace"),
                "cases": [],
            }
        argv = [exe]
    elif lang not in ("python", "python3", "py"):
        return {"status": "unsupported_language", "error": f"language {lang!r} is not supported", "cases": []}
    cases = []
    for i, text in enumerate(inputs):
        in_path = os.path.join(run_dir, f".stdin-{i}")
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(text)
        in_fd = os.open(in_path, os.O_RDONLY)
        os.unlink(in_path)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.monotonic()
        body = (
            (lambda: run_python_main(program))
            if argv is None
            else (lambda: os.execve(argv[0], argv, os.environ))
        )
        pid = run.spawn(req, run_dir, [], in_fd, out_w, err_w, [out_w, err_w, in_fd], body)
        deadline = t0 + float(lim["timeout_s"])
        data, why, _ = pump([out_r, err_r], cap, deadline)
        st = run.wait_status(pid, deadline if why == "eof" else time.monotonic())
        elapsed = time.monotonic() - t0
        run.kill_all()
        if st is None:
            st = run.wait_status(pid, time.monotonic() + 1)
        os.close(out_r)
        os.close(err_r)
        code, sig = describe_exit(st)
        if why == "output_limit":
            status = "output_limit"
        elif (
            why == "timeout"
            or sig in ("SIGXCPU",)
            or (sig == "SIGKILL" and elapsed >= float(lim["timeout_s"]))
        ):
            status = "timeout"
        elif sig is not None or code != 0:
            status = "runtime_error"
        else:
            status = "ok"
        cases.append(
            {
                "status": status,
                "stdout": data[out_r][:cap].decode("utf-8", "replace"),
                "stderr_tail": data[err_r][-2000:].decode("utf-8", "replace"),
                "exit_code": code,
                "signal": sig,
                "time_s": round(elapsed, 4),
            }
        )
        if status != "ok" and req.get("stop_on_failure"):
            break
    return {"status": "done", "cases": cases}


# ---------------------------------------------------------------- zygote main loop


def bind(src, dst, flags=0):
    if _libc.mount(src.encode(), dst.encode(), None, ctypes.c_ulong(MS_BIND | MS_REC | flags), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bind {src} -> {dst}: {os.strerror(e)}")


def remount_ro(path, bind_mount):
    flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_BIND if bind_mount else 0)
    _libc.mount(None, path.encode(), None, ctypes.c_ulong(flags), None)


# Top-level directories a Python program needs; everything else (data, homes, /run secrets, the project
# checkout) is hidden, except the interpreter's own paths, which are bound back read-only.
SYSTEM_DIRS = {"usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin", "etc", "proc", "dev", "sys", "tmp"}


def auto_hide_paths():
    out = []
    for name in sorted(os.listdir("/")):
        path = "/" + name
        real = os.path.realpath(path)
        if name in SYSTEM_DIRS or real.strip("/").split("/")[0] in SYSTEM_DIRS:
            continue
        if os.path.isdir(real) or os.path.isfile(real):
            out.append(path)
    return out


def setup_root_jail(hide_paths):
    """Inside our private mount namespace: hide home directories, keep the interpreter, mask /tmp & co."""
    needed = sorted(
        {os.path.realpath(p) for p in (*sys.path, sys.prefix, sys.base_prefix) if p and os.path.isdir(p)}
    )
    stage = "/dev/shm/.rlplat-stage" if os.path.isdir("/dev/shm") else "/tmp/.rlplat-stage"
    os.makedirs(stage, exist_ok=True)
    mount_tmpfs(stage, "size=1m,mode=0700")
    for d in hide_paths:
        d = os.path.realpath(d)
        if os.path.isfile(d):
            with contextlib.suppress(OSError):
                bind("/dev/null", d)  # top-level files (e.g. container info) read as empty
            continue
        if not os.path.isdir(d) or d == "/":
            continue
        # The interpreter may live under a hidden dir (pyenv in /root): carry those subtrees over, read-only.
        keep = [p for p in needed if (p + os.sep).startswith(d + os.sep)]
        keep = [p for p in keep if not any(p != q and (p + os.sep).startswith(q + os.sep) for q in keep)]
        staged = []
        for i, p in enumerate(keep):
            tmp = os.path.join(stage, str(len(os.listdir(stage))) + f"-{i}")
            os.mkdir(tmp)
            bind(p, tmp)
            staged.append((tmp, p))
        mount_tmpfs(d, "size=1m,mode=0755")
        for tmp, p in staged:
            os.makedirs(p, mode=0o755, exist_ok=True)
            bind(tmp, p)
            remount_ro(p, True)
        remount_ro(d, False)
    # Private tmpfs over every world-writable directory: inside this mount namespace the only writable places
    # are the per-run tmpfs dirs.
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue"):
        if os.path.isdir(d):
            with contextlib.suppress(OSError):
                mount_tmpfs(d, "size=64m,mode=0711")


def main():
    ctl = socket.socket(fileno=int(sys.argv[1]))
    hide = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2][:1] in '["' else []
    if hide == "auto":
        hide = auto_hide_paths()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        lease_dir = open_lease_dir() if ROOT else None
        if ROOT:
            setup_root_jail(hide)
        os.makedirs(BASE, mode=0o711, exist_ok=True)
        os.makedirs(os.path.join(BASE, "empty"), mode=0o555, exist_ok=True)
    except OSError as e:
        ctl.sendall(f"error {e}\n".encode())  # the parent puts this in its start-up error
        sys.exit(1)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    # From a random start, then rotating: fork servers started together try different uids first, and a uid is
    # not leased again by this one right after its release.
    next_uid = int.from_bytes(os.urandom(2), "big") % UID_COUNT
    live = {}  # supervisor pid -> its uid lease (uid, lock fd); None in user mode
    ctl.sendall(b"ready " + (b"root" if ROOT else b"user") + b"\n")
    while True:
        r, _, _ = select.select([ctl], [], [], 0.5)
        while True:  # reap supervisors; kill anything else reparented to us (orphans of a killed run)
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            lease = live.pop(pid, None)
            if lease is not None:
                uid, lock = lease
                if not (os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0):
                    clear_uid(uid)  # the supervisor died before its clean-up finished
                os.close(lock)
        if not ROOT:
            me = str(os.getpid())
            for d in os.listdir("/proc"):
                if d.isdigit() and int(d) not in live:
                    try:
                        with open(f"/proc/{d}/stat") as f:
                            stat = f.read()
                        if stat[stat.rfind(")") + 2 :].split()[1] == me:
                            os.kill(int(d), signal.SIGKILL)
                    except OSError:
                        pass
        if not r:
            continue
        msg, fds, _, _ = socket.recv_fds(ctl, 16, 2)
        if not msg:
            return  # parent went away
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        lease, refusal = None, None
        if ROOT:
            try:
                lease = lease_uid(lease_dir, next_uid)
            except OSError as e:  # e.g. out of file descriptors: refuse this run, keep serving
                refusal = f"cannot lease a sandbox uid: {e}"
            if lease is None and refusal is None:
                refusal = f"too many concurrent runs: all {UID_COUNT} sandbox uids on this machine are in use"
        if refusal is not None:
            os.write(fds[1], json.dumps({"status": "sandbox_error", "error": refusal}).encode())
            os.close(fds[0])
            os.close(fds[1])
            continue
        if lease is not None:
            next_uid = (lease[0] - UID_BASE + 1) % UID_COUNT
        pid = os.fork()
        if pid == 0:
            ctl.close()
            # The supervisor keeps its inherited copy of its own lock fd (the same lock) until it exits. Copies
            # of other runs' locks would keep their uids leased until this run ends.
            if ROOT:
                os.close(lease_dir)
            for other in live.values():
                if other is not None:
                    os.close(other[1])
            supervise(fds[0], fds[1], lease[0] if lease else os.getuid())
        live[pid] = lease
        os.close(fds[0])
        os.close(fds[1])


if __name__ == "__main__":
    main()
