"""``rlplat bench rollout --quick``: it checks, times and writes a result file naming the hardware.

No timing is asserted (the machine is shared). The vLLM part runs only where vLLM is installed (then it adds a
vLLM start-up, about a minute on a 2-core CPU); the transformers reference only where transformers is.
"""

import importlib.util
import json
import math

import pytest

import rlplat.bench.rollout as bench_rollout
from rlplat.cli import main

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize(
    "with_vllm",
    # vLLM start-up dominates this test; its backend has its own tests (tests/vllm), so it is slow-marked here
    [False, pytest.param(True, marks=[pytest.mark.slow, pytest.mark.vllm])],
    ids=["native", "with-vllm"],
)
def test_quick_benchmark_writes_result_naming_hardware(tmp_path, with_vllm):
    if with_vllm and not HAS_VLLM:
        pytest.skip("vllm is not installed")
    args = ["bench", "rollout", "--quick", "--out", str(tmp_path)] + ([] if with_vllm else ["--no-vllm"])
    assert main(args) == 0
    (path,) = tmp_path.glob("rollout-*.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "rollout" and doc["date_utc"] in path.name
    assert doc["hardware"]["cpu"] and len(doc["load_average"]["before"]) == 3

    settings = bench_rollout.Settings.quick()
    checked = {"native", "vllm"} if with_vllm else {"native"}
    backends = checked | ({"transformers-llama"} if HAS_TRANSFORMERS else set())
    assert {c["backend"] for c in doc["correctness"]} == checked
    assert all(c["exact"] and c["max_abs_logprob_diff"] == 0.0 for c in doc["correctness"])
    rows = doc["throughput"]
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, B) for b in backends for B in settings.batches}
    assert all(_positive_finite(r["tokens_per_s"]) for r in rows)
    assert all(r["generated_tokens"] == r["batch"] * r["new_tokens"] for r in rows)
    contexts = set(settings.contexts["tiny"])
    assert {r["context"] for r in doc["decode"]} == contexts
    assert all(r["ms_per_token"] >= 0 for r in doc["decode"])
    if HAS_TRANSFORMERS:
        (ref,) = doc["transformers_reference"]
        assert (
            abs(ref["llama_params"] - ref["ring_linear_active_params"])
            < 0.05 * ref["ring_linear_active_params"]
        )


def test_failed_correctness_check_reports_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise bench_rollout.CorrectnessError("native tiny: log-probs differ from the trainer's forward")

    monkeypatch.setattr(bench_rollout, "check_samples", broken)
    assert main(["bench", "rollout", "--quick", "--no-vllm", "--out", str(tmp_path)]) == 1
    assert not list(tmp_path.glob("*.json"))


def test_unknown_preset_is_rejected_before_work(tmp_path):
    assert main(["bench", "rollout", "--presets", "huge", "--out", str(tmp_path)]) == 2
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
