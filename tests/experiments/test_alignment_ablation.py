"""The alignment ablation script (experiments/alignment_ablation/run.py): every variant config validates as
`rlplat run` would; a bad variant stops the script before any run starts; the figure and the table come out
of small synthetic metrics.jsonl files (no real runs here)."""

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "alignment_ablation" / "run.py"


@pytest.fixture(scope="module")
def ablation():
    # the script is a file, not a package module; its dataclasses need it in sys.modules while it is loaded
    spec = importlib.util.spec_from_file_location("alignment_ablation_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        yield module


def test_every_variant_validates_and_preflights(ablation, tmp_path):
    variants = ablation.variants_in(ablation.HERE / "variants")
    names = {v.name for v in variants}
    assert {
        "exact",
        "bf16_recompute",
        "bf16_tis",
        "bf16_icepop",
        "bf16_rollout_old",
        "fp8_recompute",
    } <= names
    jobs = ablation.make_jobs(variants, [0, 1, 2], tmp_path, steps=None)
    assert ablation.validate(jobs, ablation.BASE) == []
    assert all(j.steps > 0 for j in jobs) and not list(tmp_path.iterdir())  # validation writes nothing
    from rlplat.config import load_config

    exact = load_config(ablation.BASE, jobs[[j.variant.name for j in jobs].index("exact")].overrides)
    bf16 = load_config(ablation.BASE, jobs[[j.variant.name for j in jobs].index("bf16_tis")].overrides)
    assert (
        exact.rollout_precision() == "fp32"
        and exact.rollout_batch_invariant()
        and exact.rollout.record_routing
    )
    assert bf16.rollout_precision() == "bf16" and not bf16.rollout_batch_invariant()
    assert bf16.algo.correction.method == "token_tis" and bf16.model.precision == "fp32"


def _bad_variant(ablation, tmp_path, monkeypatch, text):
    variants = tmp_path / "variants"
    variants.mkdir()
    (variants / "exact.yaml").write_text((ablation.HERE / "variants" / "exact.yaml").read_text())
    (variants / "bad.yaml").write_text(text)
    monkeypatch.setattr(ablation, "HERE", tmp_path)
    started = []
    monkeypatch.setattr(ablation, "run_job", lambda *a, **k: started.append(a) or 0)
    code = ablation.main(["--seeds", "0", "--out", str(tmp_path / "out"), "--steps", "2"])
    return code, started


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("overrides: {rollout.precison: bf16}\n", "did you mean 'precision'"),
        (  # a trainer bf16 model with a finer fp32 rollout
            "overrides: {model.precision: bf16, rollout.precision: fp32}\n",
            "finer than the trainer",
        ),
        (  # a correction method with the rollout's log-probs as π_old does nothing
            "overrides: {algo.correction.method: token_tis, algo.correction.use_rollout_logp_as_old: true}\n",
            "use_rollout_logp_as_old=false",
        ),
        ("label: x\nrollout: {precision: bf16}\n", "a variant has only label, overrides"),
    ],
)
def test_a_bad_variant_fails_before_any_run_starts(ablation, tmp_path, monkeypatch, capsys, text, message):
    code, started = _bad_variant(ablation, tmp_path, monkeypatch, text)
    err = capsys.readouterr().err
    assert code == 2 and started == [] and message in err, err
    assert not (tmp_path / "out" / "exact").exists()


def _synthetic(directory: Path, steps: int, seed: int, mismatch: float, logged: int | None = None) -> None:
    """A run of ``steps`` RL steps that has logged its first ``logged`` (default all)."""
    run = directory / f"x-s{seed}-20260101-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"run: {{steps: {steps}}}\n")
    rows = []
    for step in range((steps if logged is None else logged) + 1):
        row = {"step": step, "time": 1000.0 + 2 * step, "reward/mean": 0.1 + 0.01 * step + 0.01 * seed}
        if step % 5 == 0:
            row["accuracy/eval"] = 0.1 + 0.02 * step + 0.01 * seed
        if step:
            row.update({"mismatch/kl": mismatch, "mismatch/max_abs_dlogp": 10 * mismatch})
            row["mismatch/routing_disagreement"] = mismatch
        rows.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 3, "cut sh')  # a crash's half line


def test_report_from_synthetic_runs(ablation, tmp_path):
    variants = [
        v for v in ablation.variants_in(ablation.HERE / "variants") if v.name in ("exact", "bf16_tis")
    ]
    for seed in (0, 1):
        _synthetic(tmp_path / "exact" / f"seed{seed}", 20, seed, 0.0)
        _synthetic(tmp_path / "bf16_tis" / f"seed{seed}", 20, seed, 1e-3)
    _synthetic(tmp_path / "exact" / "seed2", 20, 2, 0.0, logged=12)  # still running: named, not averaged
    (tis0,) = ablation.run_dirs(tmp_path / "bf16_tis" / "seed0")  # kept gzipped, as results/ keeps them
    (tis0 / "metrics.jsonl.gz").write_bytes(gzip.compress((tis0 / "metrics.jsonl").read_bytes()))
    (tis0 / "metrics.jsonl").unlink()
    assert ablation.finished(ablation.run_dirs(tmp_path / "exact" / "seed0")[-1], 20)
    assert not ablation.finished(ablation.run_dirs(tmp_path / "exact" / "seed0")[-1], 21)
    body = ablation.report(tmp_path, variants, [0, 1, 2], None, "run.py --report-only")
    png = (tmp_path / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "results.md").read_text()
    assert "Hardware:" in md and body in md and "Left out, unfinished: exact seed 2 (step 12 of 20)." in md
    exact_row = next(line for line in body.splitlines() if line.startswith("| exact"))
    cells = [c.strip() for c in exact_row.strip("|").split("|")]
    # start 0.10 / 0.11, final 0.50 / 0.51, best the same; target halfway from 0.105 to 0.505 = 0.305,
    # reached at steps 15 / 10
    assert cells[1] == "2" and cells[2] == "0.105 ± 0.007"
    assert cells[3] == "0.505 ± 0.007" and cells[4] == "0.400 ± 0.000" and cells[5] == "0.505 ± 0.007"
    assert cells[6] == "12.5 (2/2 seeds)" and cells[7] == "40" and cells[10] == "0.0000"
    tis_row = next(line for line in body.splitlines() if line.startswith("| bf16 + TIS"))
    assert "1.00e-03" in tis_row and "| 0.0010 |" in tis_row
    # a target below seed 1's start (0.11): seed 0 reaches it at its first RL evaluation (step 5), seed 1 is
    # named, not averaged in as 0 steps
    low = ablation.table(
        ablation.collect(tmp_path, variants, [0, 1]), {v.name: v.label for v in variants}, 0.105
    )
    cells = [
        c.strip() for c in next(x for x in low.splitlines() if x.startswith("| exact")).strip("|").split("|")
    ]
    assert cells[6] == "5.0 (1/1 seeds); 1 started at or above it"


def test_the_script_runs_as_a_program(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--seeds" in out.stdout and "--jobs" in out.stdout
