"""`rlplat run` end to end on the tiny model: the run directory, exact alignment, resume, Ctrl-C, merging a run's
checkpoints, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlplat.cli import main
from rlplat.dashboard.render import render_html
from rlplat.train.checkpoint import latest_checkpoint, load_data_position

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

TINY = [
    "run.steps=2",
    "run.warm_start_steps=2",
    "run.eval_every=1",
    "run.checkpoint_every=1",
    "data.eval_prompts=4",
    "data.prompts_per_step=4",
    "rollout.sampling.n=4",
    # KL to the reference and IcePop on, so their metrics must reach the dashboard's canonical keys
    "algo.kl.mode=loss",
    "algo.kl.coef=0.01",
    "algo.correction.method=icepop",
    "algo.correction.use_rollout_logp_as_old=false",  # IcePop needs the trainer's own π_old
    "trainer.checkpoint.export_hf=true",  # so that `rlplat merge` can average the run's checkpoints
    "rollout.record_routing=true",  # mismatch/routing_disagreement must reach metrics.jsonl
]


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_a_misaligned_rollout_is_measured(local_ray, tmp_path):
    """A bf16 plain-kernel rollout against the fp32 invariant trainer (issue 15): the mismatch metrics and the
    routing disagreement see it, per step and per token."""
    misaligned = ["rollout.precision=bf16", "rollout.batch_invariant=false", "run.steps=1"]
    assert (
        main(["run", str(ROOT / "configs/tiny_math.yaml"), f"run.output_dir={tmp_path}", *TINY, *misaligned])
        == 0
    )
    (run_dir,) = tmp_path.iterdir()
    (m,) = lines(run_dir / "metrics.jsonl")[1:]
    assert m["mismatch/max_abs_dlogp"] > 0 and m["mismatch/kl"] > 0
    assert 0.0 <= m["mismatch/routing_disagreement"] < 0.5
    rollouts = lines(run_dir / "rollouts.jsonl")
    assert any(r["mismatch"]["max_abs_dlogp"] > 0 for r in rollouts)


def test_run_writes_everything_and_resumes(local_ray, tmp_path):
    assert main(["run", str(ROOT / "configs/tiny_math.yaml"), f"run.output_dir={tmp_path}", *TINY]) == 0
    (run_dir,) = tmp_path.iterdir()
    for name in (
        "config.yaml",
        "run.log",
        "metrics.jsonl",
        "rollouts.jsonl",
        "dashboard.html",
        "checkpoints",
        "wandb",
        "tokenizer",
    ):
        assert (run_dir / name).exists(), name
    metrics = lines(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]  # 0: the warm-started model's held-out eval
    for m in metrics[1:]:
        assert m["prompts/scored"] == 4 and m["samples/scored"] == 16
        assert m["mismatch/max_abs_dlogp"] == 0.0  # rollout log-probs are the trainer's, bitwise
        assert "accuracy/eval" in m and "time/train_s" in m
        assert m["kl/ref"] >= 0.0 and "entropy/mean" in m
        assert m["icepop/masked_fraction"] == 0.0  # exact backend: IcePop masks nothing
        assert m["mismatch/routing_disagreement"] == 0.0  # same experts for every token, bitwise
    rollouts = lines(run_dir / "rollouts.jsonl")
    assert rollouts and all(r["mismatch"]["max_abs_dlogp"] == 0.0 for r in rollouts)
    # re-rendered at most every DASHBOARD_EVERY_S during the run (step 2 came sooner) and at its end: current
    assert (run_dir / "dashboard.html").read_text() == render_html(run_dir)

    assert main(["run", "--resume", str(run_dir), "run.steps=3"]) == 0
    assert [m["step"] for m in lines(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    assert "steps: 3" in (run_dir / "config.yaml").read_text()  # the resume's override is recorded
    log = (run_dir / "run.log").read_text()  # appended to on resume
    assert (
        log.count(f"(dashboard: rlplat dashboard {run_dir})") == 2
        and "resumed from" in log
        and "step 3/3  reward" in log
    )

    steps = sorted((run_dir / "checkpoints").glob("step-*"))[-2:]
    assert main(["merge", *map(str, steps), "--out", str(tmp_path / "merged")]) == 0
    from rlplat.models import load_pretrained

    load_pretrained(tmp_path / "merged")
    # the run's tokenizer goes with the merged weights, so they can be served or trained on as they are
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (
        run_dir / "tokenizer" / "tokenizer.json"
    ).read_bytes()


def start_run(tmp_path, *overrides):
    """`rlplat run` as a user starts it, on this module's Ray cluster (no second cluster to start)."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [sys.executable, "-m", "rlplat.cli", "run", str(ROOT / "configs/tiny_math.yaml")]
    args += [f"run.output_dir={tmp_path}", *WARM, *overrides]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for_workers(tmp_path, proc) -> Path:
    """The run directory once the controller's workers exist (it opens metrics.jsonl last): the warm start's
    first step is then waiting on the trainer actor."""
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    return next(tmp_path.glob("*/metrics.jsonl")).parent


WARM = [  # a warm start long enough to be interrupted, then one quick RL step
    "run.warm_start_steps=30",
    "run.warm_start_batch_size=2",
    "run.steps=1",
    "run.eval_every=0",
    "data.eval_prompts=4",
    "data.prompts_per_step=4",
    "rollout.sampling.n=2",
    "wandb.mode=disabled",
]


def test_ctrl_c_in_the_warm_start_checkpoints_it_and_resume_finishes_it(local_ray, tmp_path, capsys):
    proc = start_run(tmp_path)
    run_dir = wait_for_workers(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"rlplat run --resume {run_dir}" in " ".join(err.split())
    position = load_data_position(latest_checkpoint(run_dir / "checkpoints"))
    done = position["warm_start_done"]
    assert 1 <= done < 30 and position["next_step"] == 0

    # no hf/ export in these checkpoints: merge names the setting
    assert (
        main(["merge", str(run_dir / "checkpoints" / f"step-{done:08d}"), "--out", str(tmp_path / "m")]) == 2
    )

    assert main(["run", "--resume", str(run_dir)]) == 0  # the warm start's remaining steps, then RL
    assert f"in the warm start, after {done}/30 of its steps" in (run_dir / "run.log").read_text()
    assert [m["step"] for m in lines(run_dir / "metrics.jsonl")] == [0, 1]
    # the stopped warm start's checkpoint (step-<done>) is gone once the finished one is saved
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        "step-00000000",
        "step-00000001",
    ]


def test_second_ctrl_c_aborts_without_a_traceback(local_ray, tmp_path):
    proc = start_run(tmp_path)
    wait_for_workers(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    # The second Ctrl-C only once the first was handled: two signals that reach Python while the driver waits
    # in ray.get run its handler once. It then lands while the stop's checkpoint is written.
    err = []
    for line in proc.stderr:
        err.append(line)
        if "stopping after this step" in line:
            proc.send_signal(signal.SIGINT)
            break
    err.append(proc.communicate(timeout=120)[1])
    err = "".join(err)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and ("aborted" in err or "interrupted" in err), err[-2000:]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.precison=bf16"], "model.precison: unknown key"),
        (["data.source=jsonl", "data.path=/nonexistent.jsonl"], "does not exist"),
        (["rewards.terms=[{name: no_such_reward}]"], "no_such_reward"),
        (["workers.trainer.num_cpus=4"], "the Ray cluster has"),
        (["run.mode=async", "redis.url=redis://127.0.0.1:9/0"], "cannot reach Redis at"),
        (["run.mode=sync", "run.max_stalenes=2"], "did you mean 'max_staleness'"),
    ],
)
def test_bad_input_fails_before_anything_starts(local_ray, tmp_path, capsys, overrides, message):
    assert main(["run", str(ROOT / "configs/tiny_math.yaml"), f"run.output_dir={tmp_path}", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a failed start left a run directory behind"


def test_unreachable_ray_address(tmp_path):
    env = {"RAY_ADDRESS": "127.0.0.1:9", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlplat.cli",
            "run",
            str(ROOT / "configs/tiny_math.yaml"),
            f"run.output_dir={tmp_path}/runs",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach Ray" in out.stderr
    assert not (tmp_path / "runs").exists()
