import os
import shutil
import socket
import subprocess
import time

import pytest
import redis
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _reset_kernel_mode():
    """Every test starts in the default kernel mode, whatever the previous one set."""
    import kernels

    previous = kernels.set_mode("reference", True, 64)
    yield
    kernels.restore_mode(previous)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, so a test's random inputs do not depend on test order."""
    torch.manual_seed(0)


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
