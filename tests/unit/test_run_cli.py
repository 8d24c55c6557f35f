"""`rlplat run` refuses bad input and impossible resumes before any worker or run directory exists: one clear
message, exit status 2 (no Ray needed; the Ray-backed cases are in tests/e2e/test_run.py)."""

import json
from pathlib import Path

import pytest

from rlplat.cli import main
from rlplat.config import load_config, to_yaml
from rlplat.run import check_wandb, prepare_resume
from rlplat.runlog import WandbConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny_math.yaml")


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("model:\n  preset: tiny\n run:\n  steps: 2\n", ":3:2: invalid YAML: did not find expected key"),
        ("model:\n  preset: [tiny\nrun: {}\n", ":3:4: invalid YAML: did not find expected ',' or ']'"),
    ],
)
def test_invalid_yaml_is_one_line_naming_file_and_line(tmp_path, capsys, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["run", str(bad), f"run.output_dir={tmp_path}/runs"]) == 2
    err = error_of(capsys)
    assert f"{bad}{where}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_wandb_online_without_credentials_fails_before_the_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert main(["run", TINY, f"run.output_dir={tmp_path}/runs", "wandb.mode=online"]) == 2
    err = error_of(capsys)
    assert "wandb login" in err and "WANDB_API_KEY" in err and "wandb.mode=offline" in err
    assert not (tmp_path / "runs").exists()
    # the places wandb takes its key from pass
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    check_wandb(WandbConfig(mode="online"))
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    check_wandb(WandbConfig(mode="online"))


def test_hub_id_as_model_path_says_how_to_use_a_local_directory(tmp_path, capsys):
    hub = "inclusionAI/Ring-mini-linear-2.0"
    args = ["run", TINY, f"run.output_dir={tmp_path}/runs", "model.preset=null", f"model.path={hub}"]
    assert main(args) == 2
    err = error_of(capsys)
    assert "does not download" in err and f"huggingface-cli download {hub}" in err and "model.path=DIR" in err
    assert not (tmp_path / "runs").exists()


def make_run_dir(tmp_path: Path, next_step: int | None, overrides=("run.steps=4",)) -> Path:
    """A run directory as `rlplat run` leaves it, with a checkpoint's metadata (resume checks read only that)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config(TINY, list(overrides))))
    if next_step is not None:
        ckpt = run_dir / "checkpoints" / f"step-{next_step:08d}"
        ckpt.mkdir(parents=True)
        meta = {"step": next_step, "version": next_step, "data_position": {"next_step": next_step}}
        (ckpt / "meta.json").write_text(json.dumps(meta))
        (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return run_dir


def test_resume_without_a_checkpoint(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path, next_step=None)
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "has no checkpoint to resume from" in error_of(capsys)
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in error_of(capsys)


def test_resuming_a_finished_run_says_so_at_once(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path, next_step=4)
    assert main(["run", "--resume", str(run_dir)]) == 2  # before Ray: no worker starts
    err = error_of(capsys)
    assert "is finished: 4 of run.steps=4 steps are done" in err and "run.steps=8" in err


def test_resume_overrides_are_recorded_and_fixed_settings_refused(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path, next_step=2)
    before = (run_dir / "config.yaml").read_text()
    for override, key in [
        ("model.overrides={hidden_size: 64}", "model.overrides.hidden_size"),
        ("run.seed=3", "run.seed"),
    ]:
        assert main(["run", "--resume", str(run_dir), "run.steps=6", override]) == 2
        err = error_of(capsys)
        assert f"{key} cannot change on --resume" in err and "run.steps" in err
        assert (run_dir / "config.yaml").read_text() == before

    cfg = prepare_resume(
        run_dir, ["run.steps=6", "run.eval_every=2", "model.preset=tiny"]
    )  # same value: fine
    saved = load_config(run_dir / "config.yaml")
    assert (saved.run.steps, saved.run.eval_every) == (6, 2) == (cfg.run.steps, cfg.run.eval_every)


def test_a_changed_lr_schedule_is_announced(tmp_path, capsys):
    run_dir = make_run_dir(
        tmp_path, next_step=2
    )  # tiny_math: linear decay over lr_decay_steps=null=run.steps
    prepare_resume(run_dir, ["run.eval_every=2"])
    assert "learning-rate" not in capsys.readouterr().err and not (run_dir / "run.log").exists()
    prepare_resume(run_dir, ["run.steps=6"])
    err = capsys.readouterr().err
    # the next step is the 3rd: of 4 linear-decay steps its lr is lr × (1 - 3/4), of 6, lr × (1 - 3/6)
    lr = load_config(run_dir / "config.yaml").trainer.lr
    expected = (
        f"trainer.lr_decay_steps 4 → 6 (null: run.steps); lr of the next step {lr / 4:.3g} → {lr / 2:.3g}"
    )
    assert expected in " ".join(err.split())
    assert expected in (run_dir / "run.log").read_text()


def test_overrides_after_a_flag_reach_the_config(capsys):
    """`rlplat check-alignment CONFIG --require-exact key=value`: the override is read (and here refused by the
    config's validation), not rejected by argparse as an unrecognised argument."""
    assert main(["check-alignment", TINY, "--require-exact", "model.precision=fp64"]) == 2
    assert "precision" in error_of(capsys)
    with pytest.raises(SystemExit):  # an unknown option is still argparse's error
        main(["check-alignment", TINY, "--exact-please", "model.precision=fp32"])
    assert "unrecognized arguments: --exact-please" in capsys.readouterr().err
