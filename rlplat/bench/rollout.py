"""``rlplat bench rollout``: generated tokens/s of the rollout backends, and decode cost versus context length.

In one run, on the same random checkpoint of each preset (fp32, batch-invariant reference kernels: what
rollout uses):

- **embedded engine** (``NativeEngine``): tokens/s at several batch sizes (B prompts, one sample each, a fixed
  number of new tokens, EOS ignored; the wall time includes the prefill);
- **vLLM** with rlplat's plugin (``VLLMBackend``), same prompts and settings, in a subprocess (vLLM spawns its
  engine processes); start-up is reported separately, not in tokens/s;
- **transformers** ``generate`` of a dense ``LlamaForCausalLM`` (random weights) whose parameter count is
  about the preset's ACTIVE count (same hidden size, layers, heads and vocabulary; the MLP width absorbs the
  rest), as a familiar reference point;
- **decode time per token versus context length** for the embedded engine and the Llama reference, at batch 1:
  (time to generate 1 + k tokens − time to generate 1 token) / k after a prompt of the given length.

Nothing is timed before the correctness gate passes for each preset: the embedded engine's log-probs of
sampled tokens (mixed prompt lengths, n = 2) must equal the trainer's forward bitwise, and so must vLLM's
(checked inside its subprocess on its own samples). A failure aborts with exit code 1 and no result file.

Legend: B batch, P prompt length, N new tokens, L context length.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import kernels
from rlplat.bench.common import (
    CorrectnessError,
    csv_ints,
    csv_names,
    hardware,
    run_reported,
    write_result,
)
from rlplat.models import RingLinearForCausalLM, count_parameters, preset
from rlplat.models.presets import check_presets

SEED = 0


@dataclass(frozen=True)
class Settings:
    presets: tuple[str, ...] = ("tiny", "mid")
    batches: tuple[int, ...] = (1, 8, 32, 128)
    # preset -> its own batch sizes (mid: no 128, to keep the full run within ~10 minutes on a 2-core CPU)
    preset_batches: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"mid": (1, 8, 32)})
    prompt_len: int = 16
    # preset -> new tokens per sequence in the throughput runs
    new_tokens: dict[str, int] = field(default_factory=lambda: {"tiny": 8, "mid": 4})
    # preset -> prompt lengths of the decode-vs-context measurement
    contexts: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"tiny": (32, 128, 512), "mid": (32, 128, 256)}
    )
    decode_tokens: int = 4
    check_prompts: int = 4
    vllm: bool = True
    transformers: bool = True
    vllm_timeout_s: int = 420

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            presets=("tiny",),
            batches=(1, 4),
            new_tokens={"tiny": 4},
            preset_batches={},
            contexts={"tiny": (16, 64)},
            decode_tokens=2,
            check_prompts=2,
        )

    def batches_for(self, name: str) -> tuple[int, ...]:
        return self.preset_batches.get(name, self.batches)


def build_model(name: str) -> RingLinearForCausalLM:
    model = RingLinearForCausalLM(preset(name))
    model.reset_parameters(seed=SEED)
    return model.eval()


def random_prompts(vocab: int, count: int, length: int | tuple[int, int], seed: int) -> list[list[int]]:
    """Prompts of token ids ≥ 2 (no pad / EOS); ``length`` fixed, or a (min, max) range."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = (
            length
            if isinstance(length, int)
            else int(torch.randint(length[0], length[1] + 1, (), generator=gen))
        )
        out.append(torch.randint(2, vocab, (n,), generator=gen).tolist())
    return out


def check_samples(model: RingLinearForCausalLM, samples, what: str) -> dict[str, Any]:
    """The samples' log-probs against the trainer's forward over prompt + response; raises unless bitwise equal."""
    from rlplat.engine.alignment import compare, trainer_logprobs

    flat = [s for group in samples for s in group]
    report = compare([s.logprobs for s in flat], trainer_logprobs(model, flat, 1.0))
    if not report["exact"]:
        raise CorrectnessError(
            f"{what}: log-probs differ from the trainer's forward "
            f"(max |Δ| = {report['max_abs_logprob_diff']:.3e}); fix it before benchmarking it"
        )
    return report


def check_sampling():
    from rlplat.engine.config import SamplingParams

    return SamplingParams(n=2, max_new_tokens=6, seed=SEED)


def throughput_sampling(new_tokens: int):
    from rlplat.engine.config import SamplingParams

    return SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=SEED)


def time_generate(backend, prompts, sampling) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = backend.generate(prompts, sampling)
    return time.perf_counter() - t0, sum(len(s.tokens) for g in out for s in g)


@torch.no_grad()
def bench_native(name: str, model, settings: Settings, log) -> tuple[dict, list[dict], list[dict]]:
    from rlplat.engine.engine import NativeEngine

    vocab = model.config.vocab_size
    check_prompts = random_prompts(vocab, settings.check_prompts, (1, 24), SEED + 1)
    engine = NativeEngine(model, max_batch_size=settings.check_prompts)
    check = check_samples(model, engine.generate(check_prompts, check_sampling()), f"native {name}")
    N = settings.new_tokens.get(name, 8)
    rows = []
    engine = NativeEngine(model, max_batch_size=1)
    time_generate(
        engine, random_prompts(vocab, 1, settings.prompt_len, SEED), throughput_sampling(2)
    )  # warm-up
    for B in settings.batches_for(name):
        engine = NativeEngine(model, max_batch_size=B)
        prompts = random_prompts(vocab, B, settings.prompt_len, SEED + B)
        sec, tokens = time_generate(engine, prompts, throughput_sampling(N))
        rows.append(_row(name, "native", B, settings.prompt_len, N, sec, tokens))
        log(f"native {name} B={B}: {tokens / sec:,.1f} tok/s")
    engine = NativeEngine(model, max_batch_size=1)
    decode = [
        _decode_row(
            name, "native", L, settings.decode_tokens, *_decode_seconds(engine.generate, vocab, L, settings)
        )
        for L in settings.contexts.get(name, ())
    ]
    return check, rows, decode


def _decode_seconds(generate, vocab: int, L: int, settings: Settings) -> tuple[float, float]:
    prompt = random_prompts(vocab, 1, L, SEED + L)
    one, _ = time_generate(_Callable(generate), prompt, throughput_sampling(1))
    more, _ = time_generate(_Callable(generate), prompt, throughput_sampling(1 + settings.decode_tokens))
    return one, more


class _Callable:
    def __init__(self, fn):
        self.generate = fn


def _row(name, backend, B, P, N, sec, tokens, **extra) -> dict[str, Any]:
    return {
        "preset": name,
        "backend": backend,
        "batch": B,
        "prompt_len": P,
        "new_tokens": N,
        "generated_tokens": tokens,
        "seconds": sec,
        "tokens_per_s": tokens / sec,
        **extra,
    }


def _decode_row(name, backend, L, k, one, more) -> dict[str, Any]:
    return {
        "preset": name,
        "backend": backend,
        "context": L,
        "decode_tokens": k,
        "ms_per_token": 1e3 * max(more - one, 0.0) / k,
    }


# Transformers reference
def llama_config(name: str):
    """A dense Llama with the preset's vocabulary, width, depth and heads, MLP sized to its active count."""
    from transformers import LlamaConfig

    cfg = preset(name)
    _, active = count_parameters(cfg)
    base = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    fixed = _llama_params(LlamaConfig(**base, intermediate_size=0))
    per_unit = 3 * cfg.hidden_size * cfg.num_hidden_layers
    width = max(1, round((active - fixed) / per_unit))
    return LlamaConfig(**base, intermediate_size=width), active


def _llama_params(config) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


@torch.no_grad()
def bench_transformers(name: str, settings: Settings, log) -> tuple[dict, list[dict], list[dict]]:
    from transformers import LlamaForCausalLM

    config, active = llama_config(name)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    info = {
        "preset": name,
        "ring_linear_active_params": active,
        "llama_params": params,
        **config.to_diff_dict(),
    }

    def generate(prompts, sampling):
        ids = torch.tensor(prompts)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=0,
        )
        return [[_Tokens(out[i, ids.shape[1] :].tolist())] for i in range(len(prompts))]

    N = settings.new_tokens.get(name, 8)
    time_generate(
        _Callable(generate),
        random_prompts(config.vocab_size, 1, settings.prompt_len, SEED),
        throughput_sampling(2),
    )
    rows = []
    for B in settings.batches_for(name):
        prompts = random_prompts(config.vocab_size, B, settings.prompt_len, SEED + B)
        sec, tokens = time_generate(_Callable(generate), prompts, throughput_sampling(N))
        rows.append(_row(name, "transformers-llama", B, settings.prompt_len, N, sec, tokens, params=params))
        log(f"transformers llama ({params / 1e6:.1f}M) for {name} B={B}: {tokens / sec:,.1f} tok/s")
    decode = [
        _decode_row(
            name,
            "transformers-llama",
            L,
            settings.decode_tokens,
            *_decode_seconds(generate, config.vocab_size, L, settings),
        )
        for L in settings.contexts.get(name, ())
    ]
    return info, rows, decode


@dataclass
class _Tokens:
    tokens: list[int]


# VLLM (in a subprocess)
def bench_vllm(name: str, model, settings: Settings, log) -> dict[str, Any]:
    from rlplat.engine.vllm_backend import save_policy_dir

    with tempfile.TemporaryDirectory(prefix="rlplat-bench-vllm-") as tmp:
        model_dir = save_policy_dir(model, Path(tmp) / "model")
        spec = {
            "preset": name,
            "model_dir": str(model_dir),
            "batches": list(settings.batches_for(name)),
            "prompt_len": settings.prompt_len,
            "new_tokens": settings.new_tokens.get(name, 8),
            "check_prompts": settings.check_prompts,
            "max_model_len": max(256, settings.prompt_len + settings.new_tokens.get(name, 8) + 8),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        out = Path(tmp) / "out.json"
        proc = subprocess.run(
            [sys.executable, "-m", "rlplat.bench.rollout", str(Path(tmp) / "spec.json"), str(out)],
            capture_output=True,
            text=True,
            timeout=settings.vllm_timeout_s,
        )
        if proc.returncode:
            raise RuntimeError(
                f"the vLLM benchmark process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        result = json.loads(out.read_text())
    if not result["check"]["exact"]:
        raise CorrectnessError(
            f"vllm {name}: log-probs differ from the trainer's forward "
            f"(max |Δ| = {result['check']['max_abs_logprob_diff']:.3e})"
        )
    for r in result["rows"]:
        log(f"vllm {name} B={r['batch']}: {r['tokens_per_s']:,.1f} tok/s")
    return result


def _vllm_worker(spec_path: str, out_path: str) -> None:
    """Runs in the subprocess: check vLLM's log-probs against the trainer's, then time generate."""
    from rlplat.engine.config import VLLMSettings
    from rlplat.engine.vllm_backend import VLLMBackend
    from rlplat.models import load_pretrained

    spec = json.loads(Path(spec_path).read_text())
    kernels.set_mode("reference", True)
    t0 = time.perf_counter()
    backend = VLLMBackend(
        spec["model_dir"],
        max_batch_size=max(spec["batches"]),
        settings=VLLMSettings(kv_cache_memory_bytes=256 << 20, max_model_len=spec["max_model_len"]),
        kernel_backend="reference",
        batch_invariant=True,
    )
    startup = time.perf_counter() - t0
    trainer = load_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    vocab = trainer.config.vocab_size
    samples = backend.generate(
        random_prompts(vocab, spec["check_prompts"], (1, 24), SEED + 1), check_sampling()
    )
    from rlplat.engine.alignment import compare, trainer_logprobs

    flat = [s for g in samples for s in g]
    check = compare([s.logprobs for s in flat], trainer_logprobs(trainer, flat, 1.0))
    rows = []
    if check["exact"]:
        N, P = spec["new_tokens"], spec["prompt_len"]
        time_generate(backend, random_prompts(vocab, 1, P, SEED), throughput_sampling(2))
        for B in spec["batches"]:
            sec, tokens = time_generate(
                backend, random_prompts(vocab, B, P, SEED + B), throughput_sampling(N)
            )
            rows.append(_row(spec["preset"], "vllm", B, P, N, sec, tokens))
    Path(out_path).write_text(json.dumps({"startup_s": startup, "check": check, "rows": rows}))
    backend.close()


# The run
def run(settings: Settings, out_dir: str | Path, console: Console | None = None) -> Path:
    """Check, time, write the result file and print the table; raises CorrectnessError before reporting."""
    console = console or Console()
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    check_presets(*settings.presets)
    if not settings.batches or min(settings.batches) < 1:
        raise ValueError(f"batch sizes must be ≥ 1, got {settings.batches}")
    use_vllm = settings.vllm and importlib.util.find_spec("vllm") is not None
    use_hf = settings.transformers and importlib.util.find_spec("transformers") is not None
    started, load_before = time.perf_counter(), os.getloadavg()
    previous = kernels.get_mode()
    kernels.set_mode("reference", True)
    throughput, decode, checks, references, vllm_info = [], [], [], [], []
    try:
        for name in settings.presets:
            model = build_model(name)
            total, active = count_parameters(model.config)
            check, rows, dec = bench_native(name, model, settings, log)
            checks.append({"preset": name, "backend": "native", **check})
            throughput += [{**r, "params_total": total, "params_active": active} for r in rows]
            decode += dec
            if use_vllm:
                result = bench_vllm(name, model, settings, log)
                checks.append({"preset": name, "backend": "vllm", **result["check"]})
                throughput += [{**r, "params_total": total, "params_active": active} for r in result["rows"]]
                vllm_info.append({"preset": name, "startup_s": result["startup_s"]})
            if use_hf:
                info, rows, dec = bench_transformers(name, settings, log)
                references.append(info)
                throughput += rows
                decode += dec
    finally:
        kernels.restore_mode(previous)
    payload = {
        "settings": asdict(settings),
        "kernels": {"backend": "reference", "batch_invariant": True, "precision": "fp32"},
        "correctness": checks,
        "throughput": throughput,
        "decode": decode,
        "vllm": vllm_info if use_vllm else "not run (vllm not installed or --no-vllm)",
        "transformers_reference": references if use_hf else "not run",
        "wall_seconds": time.perf_counter() - started,
        # 1/5/15-minute load averages: the machine is shared, other work inflates absolute times
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    path = write_result("rollout", payload, out_dir)
    hw = hardware()
    console.print(f"hardware: {hw['cpu']} ({hw['torch_threads']} torch threads), torch {hw['torch']}")
    console.print(throughput_table(throughput))
    console.print(decode_table(decode))
    console.print(f"load average before/after: {load_before} / {payload['load_average']['after']}")
    console.print(f"correctness checks passed; results written to {path}")
    return path


def pivot_table(title: str, rows: list[dict], key: str, value: str, fmt: str) -> Table:
    """One row per (preset, ``key``), one column per backend, cells ``value`` formatted with ``fmt``."""
    table = Table(title=title)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for col in ("preset", key, *backends):
        table.add_column(col, justify="left" if col == "preset" else "right")
    cells = {(r["preset"], r[key], r["backend"]): r[value] for r in rows}
    for name, k in dict.fromkeys((r["preset"], r[key]) for r in rows):
        values = [format(cells[(name, k, b)], fmt) if (name, k, b) in cells else "—" for b in backends]
        table.add_row(name, str(k), *values)
    return table


def throughput_table(rows: list[dict]) -> Table:
    title = "Generated tokens/s (fp32; B prompts × N new tokens, prefill included)"
    return pivot_table(title, rows, "batch", "tokens_per_s", ",.1f")


def decode_table(rows: list[dict]) -> Table:
    return pivot_table(
        "Decode time per token vs context (ms, batch 1)", rows, "context", "ms_per_token", ".2f"
    )


def run_from_args(args: argparse.Namespace) -> int:
    settings = Settings.quick() if args.quick else Settings()
    if args.presets:
        settings = replace(settings, presets=csv_names(args.presets))
    if args.batches:
        settings = replace(settings, batches=csv_ints(args.batches), preset_batches={})
    if args.no_vllm:
        settings = replace(settings, vllm=False)
    return run_reported(lambda console: run(settings, args.out, console))


def register(sub) -> None:
    p = sub.add_parser(
        "rollout", help="generated tokens/s of the embedded engine, vLLM and a transformers Llama reference"
    )
    p.add_argument("--presets", default=None, help="comma-separated model presets (default tiny,mid)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,128)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM part")
    p.add_argument("--quick", action="store_true", help="tiny preset, batches 1 and 4, a few tokens")
    p.add_argument("--out", default="bench_results", help="directory for the dated result file")
    p.set_defaults(func=run_from_args)


if __name__ == "__main__":
    _vllm_worker(sys.argv[1], sys.argv[2])
