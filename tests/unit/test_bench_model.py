"""``rlplat bench model --quick``: it checks, times and writes a result file naming the hardware.

No timing is asserted (the machine is shared); only that the figures exist, are positive and finite, and that a
failed correctness check reports nothing.
"""

import json
import math

import rlplat.bench.model as bench_model
from rlplat.cli import main


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_benchmark_writes_result_naming_hardware(tmp_path):
    assert main(["bench", "model", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("model-*.json")
    doc = json.loads(path.read_text())

    assert doc["benchmark"] == "model" and doc["date_utc"] in path.name
    assert doc["hardware"]["cpu"] and doc["hardware"]["torch"]

    checks = doc["correctness"]
    assert {(c["preset"], c["precision"]) for c in checks["forward"]} == {
        ("tiny", p) for p in bench_model.PRECISIONS
    }
    assert all(c["invariant_equals_decode"] for c in checks["forward"])
    assert {c["layer"] for c in checks["decode"]} == {"linear", "softmax"}

    forward = doc["forward"]
    assert {(r["precision"], r["path"]) for r in forward} == {
        (p, path) for p in bench_model.PRECISIONS for path in bench_model.PATHS
    }
    assert all(_positive_finite(r["tokens_per_s"]) for r in forward)
    assert len(doc["invariant_cost"]) == len(bench_model.PRECISIONS)
    assert all(_positive_finite(c["plain_over_invariant"]) for c in doc["invariant_cost"])

    decode = doc["decode"]
    contexts = set(bench_model.Settings.quick().decode_contexts)
    assert {r["context"] for r in decode} == contexts
    # every (path, layer, part) at every context
    assert len(decode) == len(contexts) * len(bench_model.PATHS) * 2 * 2
    assert all(_positive_finite(r["ms_per_token"]) for r in decode)


def test_failed_correctness_check_reports_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise bench_model.CorrectnessError("invariant log-probs differ from token-by-token decode")

    monkeypatch.setattr(bench_model, "check_model", broken)
    assert main(["bench", "model", "--quick", "--out", str(tmp_path)]) == 1
    assert not list(tmp_path.glob("*.json"))


def test_unknown_preset_is_rejected_before_work(tmp_path):
    assert main(["bench", "model", "--presets", "huge", "--out", str(tmp_path)]) == 2
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
