import json
import math
import os

import pytest

from rlplat.dashboard import metrics_schema as M
from rlplat.runlog import RunLog, WandbConfig, mismatch_summary


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_one_fsynced_line_per_step(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with RunLog(tmp_path / "run", wandb={"mode": "disabled"}) as log:
        log.log_metrics(0, {M.REWARD_MEAN: 0.25, M.TIME_TRAIN: 1})
        log.log_metrics(1, {M.REWARD_MEAN: float("nan"), "custom/x": 3})
        # Readable before close: nothing sits in a buffer.
        records = _lines(tmp_path / "run" / M.METRICS_FILE)
    assert len(synced) == 2
    assert [r["step"] for r in records] == [0, 1]
    assert records[0][M.REWARD_MEAN] == 0.25 and records[0][M.TIME_TRAIN] == 1
    assert records[1][M.REWARD_MEAN] is None and records[1]["custom/x"] == 3
    assert all(isinstance(r["time"], float) for r in records)
    assert not (tmp_path / "run" / M.WANDB_DIR).exists()


def test_metric_validation(tmp_path):
    with RunLog(tmp_path, wandb={"mode": "disabled"}) as log:
        with pytest.raises(TypeError, match="metric 'reward/mean' must be a number, got str"):
            log.log_metrics(0, {M.REWARD_MEAN: "0.5"})
        with pytest.raises(ValueError, match="step must be an integer >= 0"):
            log.log_metrics(-1, {})
        with pytest.raises(ValueError, match="'time' is written by RunLog"):
            log.log_metrics(0, {"time": 1.0})
    with pytest.raises(ValueError, match="mode"):
        WandbConfig(mode="offlin")


def test_tensor_scalars_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    with RunLog(tmp_path, wandb={"mode": "disabled"}) as log:
        log.log_metrics(0, {M.KL_REF: torch.tensor(0.5)})
    assert _lines(tmp_path / M.METRICS_FILE)[0][M.KL_REF] == 0.5


def test_rollouts(tmp_path):
    with RunLog(tmp_path, wandb={"mode": "disabled"}) as log:
        summary = mismatch_summary([-1.0, -0.5], [-1.0, -0.7], keep=[True, False])
        log.log_rollouts(
            3, [{"prompt": "p", "response": "r", "reward": 1.0, "mismatch": summary, "step": 99}]
        )
        log.log_rollouts(4, [])
        with pytest.raises(ValueError, match="rollout 0 of step 5 has no response, reward"):
            log.log_rollouts(5, [{"prompt": "p"}])
    (record,) = _lines(tmp_path / M.ROLLOUTS_FILE)
    assert record["step"] == 3
    assert record["mismatch"]["num_tokens"] == 2
    assert record["mismatch"]["max_abs_dlogp"] == pytest.approx(0.2)
    assert record["mismatch"]["mean_abs_dlogp"] == pytest.approx(0.1)
    assert record["mismatch"]["kl"] == pytest.approx((math.expm1(0.2) - 0.2) / 2)
    assert record["mismatch"]["masked_fraction"] == 0.5
    assert set(record["mismatch"]) == set(M.ROLLOUT_MISMATCH_KEYS)


def test_mismatch_summary_edge_cases():
    assert mismatch_summary([], []) == {
        "num_tokens": 0,
        "max_abs_dlogp": 0.0,
        "mean_abs_dlogp": 0.0,
        "kl": 0.0,
        "masked_fraction": 0.0,
    }
    with pytest.raises(ValueError, match="same response tokens"):
        mismatch_summary([0.0], [])


def test_mismatch_summary_survives_a_huge_log_ratio():
    # train - rollout = 799.5: math.expm1 raises OverflowError past 709; the k3 term is bounded at 20, as the
    # trainer's mismatch/kl is, and the record stays strict JSON.
    summary = mismatch_summary([-0.5, -1.0], [-800.0, -1.0])
    assert summary["max_abs_dlogp"] == 799.5
    assert summary["kl"] == pytest.approx((math.expm1(20.0) - 20.0) / 2)
    json.dumps(summary, allow_nan=False)


def test_resume_after_crash_mid_line(tmp_path):
    with RunLog(tmp_path, wandb={"mode": "disabled"}) as log:
        log.log_metrics(0, {M.KL_REF: 0.1})
    with (tmp_path / M.METRICS_FILE).open("a") as f:
        f.write('{"step": 1, "kl/r')  # the process died here
    with RunLog(tmp_path, wandb={"mode": "disabled"}) as log:
        log.log_metrics(1, {M.KL_REF: 0.2})
        path = log.write_dashboard()
    lines = (tmp_path / M.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["step"] == 1
    html = path.read_text()
    assert "skipped 1 malformed line (line 2: not JSON" in html


def test_dashboard_rewritten_at_most_every_s_unless_forced(tmp_path):
    from rlplat.dashboard.render import render_html

    with RunLog(tmp_path, wandb={"mode": "disabled"}) as log:
        log.log_metrics(1, {M.KL_REF: 0.1})
        assert log.write_dashboard(every_s=3600) is not None  # the first is always written
        log.log_metrics(2, {M.KL_REF: 0.2})
        assert log.write_dashboard(every_s=3600) is None  # too soon: the page still shows step 1
        assert (tmp_path / M.DASHBOARD_FILE).read_text() != render_html(tmp_path)
        assert log.write_dashboard() is not None  # unthrottled (the end of a run)
        assert (tmp_path / M.DASHBOARD_FILE).read_text() == render_html(tmp_path)


def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # No key, and an unroutable server: offline mode must not need either.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc or wandb settings from the machine
    run_dir = tmp_path / "run"
    with RunLog(run_dir, config={"algo": {"lr": 1e-6}}) as log:
        assert log.wandb_run is not None and log.wandb_run.settings.mode == "offline"
        for step in range(3):
            log.log_rollouts(step, [{"prompt": "p", "response": "r", "reward": 1.0}])
            log.log_metrics(step, {M.REWARD_MEAN: 0.1 * step, M.ACCURACY_TRAIN: float("nan")})
    runs = list((run_dir / M.WANDB_DIR).glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("run-*.wandb")
    assert data.stat().st_size > 0
    assert len(_lines(run_dir / M.METRICS_FILE)) == 3
