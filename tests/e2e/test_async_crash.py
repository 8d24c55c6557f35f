"""`rlplat run` in async mode, killed with SIGKILL (driver, Ray, embedded Redis: the whole process group), then
`rlplat run --resume`: the run completes, every step is trained on a full batch, and the stream holds each
step's samples exactly once, all acked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlplat.buffer import ExperienceStream, RedisConfig

ROOT = Path(__file__).resolve().parents[2]
STEPS, PROMPTS, N = 8, 4, 4
pytestmark = pytest.mark.ray

ARGS = [
    f"run.steps={STEPS}",
    "run.warm_start_steps=2",
    "run.eval_every=0",
    "run.checkpoint_every=2",
    "run.mode=async",
    f"data.prompts_per_step={PROMPTS}",
    f"rollout.sampling.n={N}",
    "rollout.sampling.max_new_tokens=8",
    "wandb.mode=disabled",
]


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]


def _rlplat(*args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlplat.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_killed_async_run_resumes_without_losing_or_repeating_samples(tmp_path):
    process = _rlplat(
        "run", "configs/tiny_math.yaml", f"run.output_dir={tmp_path}", *ARGS, start_new_session=True
    )
    deadline = time.monotonic() + 300
    try:
        while True:  # kill after step 5's line: the checkpoint after step 4 (line 4) committed, steps 5+ not
            runs = list(tmp_path.iterdir())
            if runs and any(m["step"] >= 5 for m in _lines(runs[0] / "metrics.jsonl")):
                break
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the run did not reach step 5 in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "checkpoints" / f"step-{STEPS:08d}").exists()  # RL steps count from 0 again

    resumed = _rlplat("run", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out

    metrics = _lines(run_dir / "metrics.jsonl")
    last = {m["step"]: m for m in metrics}  # a step trained again after the crash: its last line counts
    assert sorted(last) == list(range(STEPS + 1))
    for k in range(1, STEPS + 1):
        assert last[k]["samples/scored"] == PROMPTS * N and last[k]["prompts/scored"] == PROMPTS
        assert last[k]["samples/staleness_max"] <= 1
    assert last[STEPS]["stream/pending"] == 0 and last[STEPS]["stream/undelivered"] == 0

    # The stream (the embedded server's append-only file in the run directory) after the run.
    with ExperienceStream.connect(RedisConfig(), run_dir) as stream:
        entries = stream.client.xrange(stream.cfg.stream)
        steps = [json.loads(fields[b"sample"])["step"] for _, fields in entries]
        assert all(steps.count(k) == PROMPTS * N for k in range(STEPS)) and len(steps) == STEPS * PROMPTS * N
        assert stream.client.xpending(stream.cfg.stream, stream.cfg.group)["pending"] == 0
