"""Typed, closed experiment configs: YAML + overrides, errors with full key paths, `rlplat config show`."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlplat.cli import main
from rlplat.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), ExperimentConfig)


def test_overrides_apply():
    cfg = load_config(
        ROOT / "configs/tiny_math.yaml", ["model.precision=bf16", "kernels.batch_invariant=false"]
    )
    assert cfg.model.precision == "bf16" and cfg.kernels.batch_invariant is False


def test_list_entries_can_be_overridden():
    """`rewards.terms.0.name=x` (or `[0]`) changes entry 0 of the file's list, as a verl user expects."""
    cfg = load_config(
        ROOT / "configs/tiny_math.yaml",
        ["rewards.terms.0.name=think_format", "rewards.terms[0].weight=0.5", "rewards.terms.0.args={}"],
    )
    assert [(t.name, t.weight, t.args) for t in cfg.rewards.terms] == [("think_format", 0.5, {})]
    whole = load_config(
        ROOT / "configs/tiny_math.yaml", ["rewards.terms=[{name: math}, {name: think_format, weight: 0.1}]"]
    )
    assert [(t.name, t.weight) for t in whole.rewards.terms] == [("math", 1.0), ("think_format", 0.1)]


def test_bad_list_overrides_show_the_working_syntax():
    tiny_math = ROOT / "configs/tiny_math.yaml"
    with pytest.raises(
        ValueError,
        match=r"rewards\.terms has 1 entry, so no entry 1.*set the whole list, e\.g\. rewards\.terms=",
    ):
        load_config(tiny_math, ["rewards.terms.1.name=think_format"])
    with pytest.raises(
        ValueError, match=r"rewards\.terms is a list; index it, e\.g\. rewards\.terms\.0\.name="
    ):
        load_config(tiny_math, ["rewards.terms.name=think_format"])
    # Without a config file there is no list to index: the defaults live in the typed config, not in YAML.
    with pytest.raises(ValueError, match=r"rewards\.terms is not a list in the config file.*rewards\.terms="):
        load_config(None, ["rewards.terms.0.name=think_format"])


def test_unknown_key_names_path_and_allowed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n  precison: bf16\n")
    with pytest.raises(ValueError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "model.precison: unknown key" in msg and "did you mean 'precision'" in msg and "allowed:" in msg


def test_bad_values_and_overrides():
    with pytest.raises(ValueError, match=r"model\.precision.*'fp32', 'bf16' or 'fp8'"):
        load_config(None, ["model.precision=fp4"])
    with pytest.raises(ValueError, match=r"trainer\.lrr: unknown key; did you mean 'lr'"):
        load_config(None, ["trainer.lrr=1"])
    with pytest.raises(ValueError, match=r"bogus: unknown key"):
        load_config(None, ["bogus.x=1"])
    with pytest.raises(ValueError, match=r"key\.path=value"):
        load_config(None, ["model.precision"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(ValueError, match=r"exactly one of model\.preset and model\.path"):
        load_config(None, ["model.path=/x"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_every_field_is_described():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(ExperimentConfig)


def test_config_show_cli(capsys):
    assert main(["config", "show", str(ROOT / "configs/tiny_math.yaml"), "model.precision=fp8"]) == 0
    out = capsys.readouterr().out
    assert "precision: fp8" in out and "batch_invariant: true" in out
    assert main(["config", "show", str(ROOT / "configs/tiny_math.yaml"), "model.bogus=1"]) == 2
    assert "model.bogus: unknown key" in capsys.readouterr().err


def test_console_script_installed():
    exe = Path(sys.executable).with_name("rlplat")
    out = subprocess.run(
        [str(exe), "config", "show", str(ROOT / "configs/tiny_math.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "preset: tiny" in out.stdout
