"""Killing the trainer with SIGKILL loses no sample and trains none twice (the async-mode contract)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlplat.buffer import ExperienceStream, RedisConfig

CONSUMER = Path(__file__).with_name("crash_consumer.py")
N, BATCH, FIRST = 64, 8, 40


def _samples(lo: int, hi: int) -> list[dict]:
    return [
        {
            "uid": i,
            "prompt_id": f"p{i // 4}",
            "token_ids": [1, 5 + i, 7, 2],
            "rollout_logprobs": [-0.25, -1.5 - i / 100, -0.125],
            "reward": float(i % 2),
            "metadata": {"task": "math", "group": i // 4},
        }
        for i in range(lo, hi)
    ]


def _committed(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "committed.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kill", ["mid_batch", "between_commit_and_ack"])
def test_sigkilled_consumer_resumes_without_loss_or_duplicates(backend_url, tmp_path, kill):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    producer = ExperienceStream.connect(RedisConfig(url=backend_url), run_dir)
    try:
        ids = []
        for lo in range(0, FIRST, 10):
            ids += producer.publish(_samples(lo, lo + 10), policy_version=lo // 10)
        cmd = [sys.executable, str(CONSUMER), "--url", producer.url, "--run-dir", str(run_dir)]
        cmd += ["--total", str(N), "--batch", str(BATCH)]

        if kill == "mid_batch":
            first = subprocess.Popen([*cmd, "--train-s", "0.3"], stdout=subprocess.PIPE, text=True)
            for line in first.stdout:
                if line.startswith("READ 3"):  # step 3's batch is delivered and training
                    os.kill(first.pid, signal.SIGKILL)
                    break
            first.wait(timeout=30)
            expected_recovered = ids[3 * BATCH : 4 * BATCH]
        else:
            first = subprocess.Popen([*cmd, "--crash-after-commit", "3"], stdout=subprocess.PIPE, text=True)
            first.wait(timeout=30)
            expected_recovered = []
        assert first.returncode == -signal.SIGKILL, first.stdout.read()
        first.stdout.close()

        steps_before = len(_committed(run_dir))
        assert steps_before == (3 if kill == "mid_batch" else 4)
        # 3 acked steps either way; the 4th batch is pending (read, or committed but not acked).
        assert producer.lag() == FIRST - 3 * BATCH

        for lo in range(FIRST, N, 12):
            ids += producer.publish(_samples(lo, min(lo + 12, N)), policy_version=4)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stdout + second.stderr
        recovered = second.stdout.splitlines()[0].split()[2:]
        assert recovered == expected_recovered

        steps = _committed(run_dir)
        assert [s["step"] for s in steps] == list(range(N // BATCH))
        sample_ids = [u for s in steps for u in s["sample_ids"]]
        entry_ids = [e for s in steps for e in s["entry_ids"]]
        assert sorted(sample_ids) == list(range(N)), "a sample was lost or trained twice"
        assert sorted(entry_ids) == sorted(ids)
        assert producer.lag() == 0
        assert producer.client.xpending(producer.cfg.stream, producer.cfg.group)["pending"] == 0
    finally:
        producer.close()
