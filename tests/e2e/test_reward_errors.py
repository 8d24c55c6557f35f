"""Issue 14: reward errors are visible (per-term metrics, the first error's text in run.log and on the console),
a run whose every reward fails stops with that error, and a run without a terminal prints plain lines."""

import json
from pathlib import Path

import pytest

from rlplat.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

BROKEN = """
def always_raises(sample):
    raise ValueError("the reward server is down")
"""
SMALL = [
    "run.steps=5",
    "run.stop_after_failed_reward_steps=2",
    "run.warm_start_steps=0",
    "run.eval_every=0",
    "data.prompts_per_step=2",
    "rollout.sampling.n=2",
    "wandb.mode=disabled",  # its service process and threads would outlive the module
]
ERROR = "broken: ValueError: the reward server is down"


def _run_with_broken_reward(tmp_path, capsys, extra):
    plugin = tmp_path / "broken_reward.py"
    plugin.write_text(BROKEN)
    terms = f"rewards.terms=[{{name: '{plugin}:always_raises', label: broken}}, {{name: math}}]"
    config = str(ROOT / "configs/tiny_math.yaml")
    code = main(["run", config, f"run.output_dir={tmp_path / 'runs'}", terms, *SMALL, *extra])
    (run_dir,) = (tmp_path / "runs").iterdir()
    return code, run_dir, capsys.readouterr().err


def _check(code, run_dir, err):
    # Every sample fails the broken term: the run stops after 2 of its 5 steps, non-zero, quoting the error.
    assert code == 1
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["reward/errors"] == m["reward/broken_errors"] == m["samples/scored"] == 4
        assert m["reward/math_errors"] == 0 and m["reward/broken_mean"] == 0.0 and "reward/math_mean" in m
        assert "reward/broken/errors" in m  # the workers' call counts (since the last line) are still there
    assert any((run_dir / "checkpoints").iterdir()), "the steps trained were not checkpointed"

    # pytest's capture is not a terminal: plain lines, the run directory and dashboard command first.
    log = (run_dir / "run.log").read_text()
    lines = err.splitlines()
    assert lines[0] == f"run directory: {run_dir}  (dashboard: rlplat dashboard {run_dir})"
    for text in (err, log):
        assert f"step 1: 4 of 4 samples' rewards failed; first error: {ERROR}" in text
        step_lines = [x for x in text.splitlines() if "step 2/5  reward" in x]
        assert len(step_lines) == 1 and "reward_errors 4/4" in step_lines[0] and "mismatch 0" in step_lines[0]
        assert "every sample's reward failed in the last 2 steps" in text and ERROR in text
        assert f"rlplat run --resume {run_dir}" in text
    assert f"dashboard: rlplat dashboard {run_dir}" in log.splitlines()[0]
    # the stop is reported as one error line; Ray may still forward a worker's late log line after it (async:
    # the producer scored ahead), so not necessarily the last line
    assert any(line.startswith("error: every sample's reward failed") for line in lines)


def test_all_failing_rewards_stop_the_run_with_the_error(local_ray, tmp_path, capsys):
    _check(*_run_with_broken_reward(tmp_path, capsys, []))


@pytest.mark.redis
def test_all_failing_rewards_stop_an_async_run(local_ray, tmp_path, capsys, redis_server_url):
    """The per-term summary survives the Redis stream (it rides on each step's first record)."""
    _check(*_run_with_broken_reward(tmp_path, capsys, ["run.mode=async", f"redis.url={redis_server_url}"]))
