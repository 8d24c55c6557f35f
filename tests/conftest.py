"""Fixtures for every test, and what keeps tests independent of their order (STYLE.md 15).

The suite runs in random order (pytest-randomly: the header prints ``Using --randomly-seed=N``; pass that to
rerun an order, or ``-p no:randomly`` for file order). So that no test depends on what ran before it:

- every test starts in the default kernel mode with torch's global RNG seeded 0 (pytest-randomly reseeds
  ``random`` and numpy with the run's seed before every test), and its RNG states are put back after it;
- fixtures that outlive a test (module and session scope) are built in a forked torch RNG seeded 0, so what
  they hold does not depend on which test happened to create them, and they leave the global RNG alone;
- a test that leaves process-wide state changed (see ``_process_state``) errors at teardown naming the change,
  and the state is put back so that the tests after it run as they would alone;
- a test module that leaves child processes, Ray, threads or files in the checkout behind errors the same way.
"""

import contextlib
import importlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

# Triton reads TRITON_INTERPRET when a @triton.jit function is defined: its own library ones (tl.zeros …) when
# triton is first imported, which importing torch._dynamo below does. So on a CPU machine it is switched on
# here, first; with a GPU the kernels compile for real unless it is set by hand.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch._dynamo


def _interpreted_dot_row_by_row() -> None:
    """The interpreter evaluates ``tl.dot`` with numpy's matmul, and the OpenBLAS under numpy rounds a row by
    its place in the tile on some CPUs: with its Haswell kernels (what it picks on the AMD EPYC machines, AVX2
    or AVX-512) a row moved down by one gives other bits, while a GPU's MMA gives a row the same bits wherever
    it sits. The kernels' invariance tests move rows inside tiles on purpose, so the interpreter's dot is
    modelled here as one matrix-vector product per row: every row the same call, whatever its place. Float8
    inputs keep the interpreter's own path (converted there; their tests do not move rows)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    library_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return library_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        rows = np.matmul(a.data[..., :, None, :], b.data[..., None, :, :], dtype=d.data.dtype)[..., 0, :]
        return interpreter.TensorHandle(rows + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    with contextlib.suppress(ImportError):
        _interpreted_dot_row_by_row()
# Libraries whose first import changes the process for good: megatron.core puts setuptools' vendored packages on
# sys.path, vLLM sets environment variables and wraps torch.cuda.set_stream, OpenCV (via vLLM) sets
# LD_LIBRARY_PATH. Imported here, before any test, so that whichever test happens to import them first is not
# blamed for it (as torch._dynamo above).
for _library in ("megatron.core", "vllm", "cv2"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_library)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Imported above, before any test: importing torch._dynamo wraps torch.manual_seed and sets
# TORCHINDUCTOR_CACHE_DIR, which would otherwise show as a change made by whichever test imported it first (an
# AdamW step does).

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("rlplat", "kernels", "actors", "rewards", "launch")
# Modules whose functions tests or shims have reason to replace, besides first-party ones.
PATCHABLE = ("torch", "torch.cuda", "torch.distributed")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGALRM)
# pytest sets this one itself, to a different value in each phase of a test
PYTEST_ENV = ("PYTEST_CURRENT_TEST",)
# Not part of the checkout's state: caches, environments and build metadata.
CHECKOUT_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
# OpenTelemetry's exporters: started once per process by wandb on first use and never stopped (wandb.teardown
# leaves them), so whichever test first logs to wandb would be blamed for them
PROCESS_LIFETIME_THREADS = ("Otel",)
GRACE_S = 15.0  # for processes and threads that a module's teardown stopped but that are still exiting


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _megatron_initialized() -> bool:
    ps = sys.modules.get("megatron.core.parallel_state")
    return ps is not None and ps.model_parallel_is_initialized()


def _settings() -> dict[str, tuple]:
    """Process-wide settings as name -> (getter, setter); the setter puts a value back (None: cannot)."""
    import kernels
    import kernels._buffers as buffers

    def set_poison(value):
        buffers.POISON_OUTPUTS = value

    def destroy_process_group(was):
        if not was and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def destroy_model_parallel(was):
        if not was and _megatron_initialized():
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()

    return {
        "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
        # torch refuses to set it again once parallel work has run: a change cannot be undone
        "torch.get_num_interop_threads()": (torch.get_num_interop_threads, None),
        "kernels.get_mode()": (kernels.get_mode, kernels.restore_mode),
        "kernels._buffers.POISON_OUTPUTS": (lambda: buffers.POISON_OUTPUTS, set_poison),
        "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
        "torch.get_default_device()": (torch.get_default_device, torch.set_default_device),
        "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
        "torch.is_inference_mode_enabled()": (torch.is_inference_mode_enabled, None),
        "torch.are_deterministic_algorithms_enabled()": (
            torch.are_deterministic_algorithms_enabled,
            torch.use_deterministic_algorithms,
        ),
        "torch.is_anomaly_enabled()": (torch.is_anomaly_enabled, torch.autograd.set_detect_anomaly),
        "torch.get_float32_matmul_precision()": (
            torch.get_float32_matmul_precision,
            torch.set_float32_matmul_precision,
        ),
        "torch.distributed.is_initialized()": (torch.distributed.is_initialized, destroy_process_group),
        "megatron model parallel initialized": (_megatron_initialized, destroy_model_parallel),
        "os.getcwd()": (os.getcwd, os.chdir),
        "sys.path": (
            lambda: [p for p in sys.path if not _ray_setup_path(p)],
            lambda value: sys.path.__setitem__(
                slice(None), value + [p for p in sys.path if _ray_setup_path(p)]
            ),
        ),
        "logging.disable level": (lambda: logging.root.manager.disable, logging.disable),
    }


def _logger_state(logger: logging.Logger) -> tuple:
    # pytest adds its capture handlers to the root logger for each phase of a test: not the test's doing
    handlers = tuple(h for h in logger.handlers if not type(h).__module__.startswith("_pytest"))
    return logger.level, logger.disabled, logger.propagate, handlers


def _set_logger_state(logger: logging.Logger, state: tuple) -> None:
    logger.level, logger.disabled, logger.propagate, handlers = state
    logger.handlers = [h for h in logger.handlers if type(h).__module__.startswith("_pytest")] + list(
        handlers
    )


# ray.init sets up the driver process once and for good (its bundled packages on sys.path, RAY_* variables,
# PYTHONBREAKPOINT, a SIGTERM handler), and keeps that after ray.shutdown: Ray's doing, not the test's, and
# whether Ray is still running is checked per module.
def _ray_setup_path(entry: str) -> bool:
    return entry.endswith(os.path.join("ray", "thirdparty_files"))


def _ray_setup_env(name: str, value: str) -> bool:
    return name.startswith("RAY_") or (name == "PYTHONBREAKPOINT" and value.startswith("ray."))


def _process_state() -> dict[tuple, object]:
    """Everything a test could leave changed for the tests after it, as (kind, name) -> value."""
    state: dict[tuple, object] = {("setting", k): get() for k, (get, _) in _settings().items()}
    for k, v in os.environ.items():
        if k not in PYTEST_ENV and not _ray_setup_env(k, v):
            state["env", k] = v
    loggers = {"": logging.root} | {
        name: lg for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    for name, lg in loggers.items():
        state["logger", name] = _logger_state(lg)
    for sig in SIGNALS:
        handler = signal.getsignal(sig)
        # pytest-timeout installs a new SIGALRM handler for each test
        owner = getattr(handler, "__module__", None) or ""
        if owner == "pytest_timeout" or (sig == signal.SIGALRM and handler == signal.SIG_DFL):
            # pytest-timeout installs its SIGALRM handler for each test and takes it off again, in an order
            # relative to this fixture that varies: its handler and the default are the same state here
            handler = "default or pytest-timeout's handler"
        elif owner.startswith("ray."):
            handler = "Ray's handler"
        state["signal", sig] = handler
    with warnings.catch_warnings():  # looking at a deprecated attribute (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            # A library replacing its own lazy modules (transformers does) is not a test's doing; replacing a
            # first-party or patchable module is.
            if name.split(".")[0] in FIRST_PARTY or name in PATCHABLE:
                state["module", name] = module
            if module is not None and (name.split(".")[0] in FIRST_PARTY or name in PATCHABLE):
                for attr, value in list(vars(module).items()):
                    if callable(value) or isinstance(value, types.ModuleType):
                        state["attribute", (name, attr)] = value
    return state


def _describe(key: tuple) -> str:
    kind, name = key
    if kind == "env":
        return f"os.environ[{name!r}]"
    if kind == "logger":
        return f"logger {name or 'root'!r} (level, disabled, propagate, handlers)"
    if kind == "signal":
        return f"handler of {signal.Signals(name).name}"
    if kind == "module":
        return f"sys.modules[{name!r}]"
    if kind == "attribute":
        return ".".join(name)
    return name


def _restore(key: tuple, before: object) -> None:
    kind, name = key
    missing = before is _MISSING
    if kind == "setting":
        setter = _settings()[name][1]
        if setter is not None:
            setter(before)
    elif kind == "env":
        if missing:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    elif kind == "logger":
        _set_logger_state(logging.getLogger(name or None), before)
    elif kind == "signal" and before is not None and not isinstance(before, str):
        signal.signal(name, before)
    elif kind == "module":
        sys.modules[name] = before
    elif kind == "attribute" and sys.modules.get(name[0]) is not None:
        setattr(sys.modules[name[0]], name[1], before)


_MISSING = object()


def _changes(before: dict, after: dict) -> list[tuple[tuple, object, object]]:
    """(key, value before, value after) for every key a test changed; new loggers, modules and module
    attributes are lazy imports and caches, not changes (new environment variables are)."""
    out = []
    for key, old in before.items():
        new = after.get(key, _MISSING)
        if not _same(old, new) and new != "Ray's handler":  # kept by the Ray driver after shutdown
            out.append((key, old, new))
    for key, new in after.items():
        if key[0] == "env" and key not in before:
            out.append((key, _MISSING, new))
    return out


def _show(value: object) -> str:
    text = "unset" if value is _MISSING else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@pytest.fixture(autouse=True)
def _isolated_test():
    """The test starts in the default kernel mode with torch seeded 0 and must leave the process as it found
    it; the kernel mode and the RNG states are put back whatever it did."""
    import kernels

    before = _process_state()
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    previous_mode = kernels.set_mode("reference", True, 64)
    torch.manual_seed(0)
    yield
    kernels.restore_mode(previous_mode)
    torch.set_rng_state(rng[0])
    random.setstate(rng[1])
    np.random.set_state(rng[2])
    changes = _put_back(before)
    if changes:
        pytest.fail(
            "the test left process-wide state changed (put back now, for the tests after it):\n"
            + "\n".join(changes),
            pytrace=False,
        )


def _put_back(before: dict) -> list[str]:
    """Restore what changed since ``before``; returns a line for each change."""
    changes = _changes(before, _process_state())
    for key, old, _ in changes:
        _restore(key, old)
    return [f"  {_describe(key)}: {_show(old)} -> {_show(new)}" for key, old, new in changes]


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Module- and session-scoped fixtures are built from torch seed 0 in a forked RNG: whichever test first
    needs one, it holds the same values, and the global RNG is left as it was."""
    if fixturedef.scope == "function":
        return (yield)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return (yield)


def _process_helper(proc_dir: str) -> bool:
    """multiprocessing's resource tracker and fork server: started once (by the first spawn) and kept for the
    life of the process, not by the test that happened to start them."""
    try:
        cmdline = Path(proc_dir, "cmdline").read_bytes()
    except OSError:
        return False
    return b"multiprocessing.resource_tracker" in cmdline or b"multiprocessing.forkserver" in cmdline


def _descendants() -> dict[int, str]:
    """Live processes below this one, pid -> command name (from /proc; zombies excluded)."""
    parent_of, names = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name_end = stat.rindex(")")
        state, ppid = stat[name_end + 2 :].split()[:2]
        if state != "Z" and not _process_helper(entry.path):
            pid = int(entry.name)
            parent_of[pid], names[pid] = int(ppid), stat[stat.index("(") + 1 : name_end]
    found, frontier = {}, {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier and pid not in found}
        found.update({pid: names[pid] for pid in frontier})
    return found


def _checkout_files() -> dict[str, int]:
    """Files of the checkout (not caches or the virtual environment), path -> mtime."""
    out = {}
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in CHECKOUT_SKIP and not d.endswith(".egg-info")]
        for f in files:
            path = os.path.join(top, f)
            with contextlib.suppress(OSError):
                out[os.path.relpath(path, ROOT)] = os.stat(path).st_mtime_ns
    return out


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _module_leftovers(processes, threads, files, ray_was) -> list[str]:
    deadline = time.monotonic() + GRACE_S
    while True:
        new_processes = {p: n for p, n in _descendants().items() if p not in processes}
        new_threads = [
            t
            for t in threading.enumerate()
            if t.ident not in threads and t.is_alive() and not t.name.startswith(PROCESS_LIFETIME_THREADS)
        ]
        if not (new_processes or new_threads) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = [f"  child process {pid} ({name}) still running" for pid, name in sorted(new_processes.items())]
    out += [f"  thread {t.name!r} still running" for t in new_threads]
    if _ray_initialized() and not ray_was:
        out.append("  Ray is still initialized (ray.shutdown() missing)")
    now = _checkout_files()
    out += [f"  file {p} created in the checkout" for p in sorted(now.keys() - files.keys())]
    out += [
        f"  file {p} of the checkout changed" for p in sorted(p for p in files if now.get(p, -1) != files[p])
    ]
    return out


@pytest.fixture(scope="module", autouse=True)
def _isolated_module():
    """A test module (with its fixtures) stops what it started, writes only to temporary directories, and
    leaves the process-wide state as it found it (its module-scoped fixtures included)."""
    processes, files, ray_was = _descendants(), _checkout_files(), _ray_initialized()
    threads = {t.ident for t in threading.enumerate()}
    before = _process_state()
    yield
    # judge_code's fork server lives as long as its process (default_sandbox); stopped after every module, so
    # that the leftovers below show only what a module left by mistake (the next module starts a new one)
    sandbox = sys.modules.get("rewards.code.sandbox")
    if sandbox is not None:
        sandbox.close_default_sandbox()
    leftovers = _module_leftovers(processes, threads, files, ray_was) + _put_back(before)
    if leftovers:
        pytest.fail("the test module left behind:\n" + "\n".join(leftovers), pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_fp32():
    from rlplat.models import RingLinearForCausalLM, preset

    torch.manual_seed(0)
    model = RingLinearForCausalLM(preset("tiny"))
    model.reset_parameters(seed=0)
    return model.eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server_url(tmp_path):
    """A real `redis-server` on a free port with its files in a tmp dir, stopped after the test."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (scripts/install_redis.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    data = tmp_path / "redis-server"
    data.mkdir()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    args += ["--appendonly", "no", "--daemonize", "no", "--logfile", str(data / "redis.log")]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, (data / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not start in 10 s"
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


SMALL_STEPS = [
    "run.warm_start_steps=0",
    "run.eval_every=0",
    "data.prompts_per_step=4",
    "rollout.sampling.n=4",
    "rollout.sampling.max_new_tokens=8",
    "wandb.mode=disabled",
]


@pytest.fixture
def run_controller():
    """Runs configs/tiny_math.yaml (4 prompts × 4 samples, no warm start or eval, ``overrides`` on top) through
    the Controller in ``run_dir``; returns (controller, [(step, metrics)]). ``on_step(controller, step)`` runs
    after each step (e.g. to kill a worker). Needs a Ray instance (the ``local_ray`` fixtures)."""
    from rlplat.config import load_config
    from rlplat.controller import Controller, ProgressHooks
    from rlplat.run import tokenizer_dir

    def run(run_dir, overrides, on_step=lambda controller, step: None):
        cfg = load_config("configs/tiny_math.yaml", [*SMALL_STEPS, *overrides])
        controller = Controller(cfg, run_dir, tokenizer_dir(cfg, run_dir))
        lines = []

        def record(step, metrics):
            lines.append((step, metrics))
            on_step(controller, step)

        try:
            assert controller.run(False, lambda: False, ProgressHooks(step=record)) == cfg.run.steps
        finally:
            controller.trainer.kill()
            controller.close()
        return controller, lines

    return run
