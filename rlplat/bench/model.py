"""``rlplat bench model``: forward throughput and per-token decode cost of the Ring-linear model.

Two measurements, each against a baseline taken in the same run:

- **Forward throughput** (tokens/s, no grad) of each preset in fp32, bf16 and FP8, on the batch-invariant
  kernel path (what RL uses) and on the plain path (chunked linear attention, SDPA, plain GEMMs). The ratio
  is the price of bitwise invariance.
- **Decode cost per token versus context length** for one linear-attention decoder layer against one
  softmax-attention decoder layer of the same preset, on both paths. The linear layer's state is [B,H,D,D]
  whatever the context, so it should stay flat; the softmax layer reads a KV cache that grows with it. The
  caches are filled with random values instead of a long prefill: the cost of a step depends only on their
  shapes. Each layer is timed whole (norms, mixer, FFN) and by its attention mixer alone.

Nothing is timed before the correctness gate passes for exactly the models and layers being timed: on a
short input the invariant path's log-probs must equal (``torch.equal``) those of token-by-token decode, and
in fp32 the plain path must agree with the invariant one within 1e-3. A failure aborts with exit code 1 and
no result file.

Legend: B batch, T tokens, L context length, C hidden, H heads, G kv heads, D head dim.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import kernels
from kernels.softmax_attention.reference import values_with_ones
from rlplat.bench.common import (
    PATHS,
    CorrectnessError,
    csv_names,
    hardware,
    run_reported,
    write_result,
)
from rlplat.models import PRESETS, LayerCache, RingLinearConfig, RingLinearForCausalLM, enable_fp8, preset
from rlplat.models.cache import kv_capacity
from rlplat.models.presets import check_presets
from rlplat.models.ring_linear import DecoderLayer, count_parameters

PRECISIONS = ("fp32", "bf16", "fp8")
PLAIN_TOLERANCE_FP32 = 1e-3
SEED = 0


@dataclass(frozen=True)
class Settings:
    presets: tuple[str, ...] = ("tiny", "mid")
    precisions: tuple[str, ...] = PRECISIONS
    # preset -> (B, T) of the timed forward
    shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: {"tiny": (4, 512), "mid": (2, 256)})
    repeats: int = 3
    decode_preset: str = "mid"
    decode_precisions: tuple[str, ...] = ("fp32", "bf16")
    decode_contexts: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    decode_batch: int = 1
    decode_repeats: int = 10
    check_tokens: int = 8

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            presets=("tiny",),
            shapes={"tiny": (2, 64)},
            repeats=1,
            decode_preset="tiny",
            decode_precisions=("fp32",),
            decode_contexts=(64, 256),
            decode_repeats=3,
        )

    def shape(self, name: str) -> tuple[int, int]:
        return self.shapes.get(name, (2, 256))


def cast(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """fp32 as built; bf16 with the router's selection bias kept in fp32; fp8 = bf16 plus FP8 GEMM inputs."""
    if precision == "fp32":
        return module
    module = module.to(torch.bfloat16)
    for m in module.modules():
        if hasattr(m, "expert_bias"):
            m.expert_bias.data = m.expert_bias.float()
    if precision == "fp8":
        enable_fp8(module)
    return module


def build_model(name: str, precision: str) -> RingLinearForCausalLM:
    model = RingLinearForCausalLM(preset(name))
    model.reset_parameters(seed=SEED)
    return cast(model, precision).eval()


def init_layer(layer: torch.nn.Module, cfg: RingLinearConfig, gen: torch.Generator) -> None:
    """The model's initialisation (norm weights 1, the rest N(0, initializer_range)) for a layer built alone."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.initializer_range)


def decode_layers(cfg: RingLinearConfig) -> dict[str, int]:
    """Indices of the first linear- and the first softmax-attention layer that have the MoE FFN."""
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return {
        "linear": next(i for i in moe if not cfg.is_softmax_layer(i)),
        "softmax": next(i for i in moe if cfg.is_softmax_layer(i)),
    }


@torch.no_grad()
def check_model(model: RingLinearForCausalLM, precision: str, n: int) -> dict[str, Any]:
    """Invariant full-sequence log-probs == token-by-token decode (bitwise); fp32 plain ≈ invariant."""
    gen = torch.Generator().manual_seed(SEED + 1)
    seq = torch.randint(2, model.config.vocab_size, (1, n + 1), generator=gen)
    with kernels.kernel_mode(batch_invariant=True):
        full, _ = model.token_logprobs(seq[:, :-1], seq[:, 1:])
        cache = model.new_cache(1)
        steps = [
            model.token_logprobs(seq[:, t : t + 1], seq[:, t + 1 : t + 2], cache=cache)[0] for t in range(n)
        ]
    stepped = torch.cat(steps, dim=1)
    if not torch.equal(full, stepped):
        raise CorrectnessError(
            f"{precision}: invariant log-probs differ from token-by-token decode "
            f"(max |Δ| = {(full - stepped).abs().max().item():.3e}); fix the model before benchmarking it"
        )
    with kernels.kernel_mode(batch_invariant=False):
        plain, _ = model.token_logprobs(seq[:, :-1], seq[:, 1:])
    diff = (plain - full).abs().max().item()
    if precision == "fp32" and not diff <= PLAIN_TOLERANCE_FP32:
        raise CorrectnessError(
            f"fp32: plain-path log-probs differ from the invariant path by {diff:.3e} > {PLAIN_TOLERANCE_FP32}"
        )
    return {"tokens": n, "invariant_equals_decode": True, "plain_max_abs_diff": diff}


@torch.no_grad()
def check_layer(layer: DecoderLayer, rope, precision: str, n: int) -> dict[str, Any]:
    """A decode step after a cached prefill == the last token of a full prefill (bitwise); fp32 plain ≈."""
    C = layer.input_layernorm.weight.shape[0]
    dtype = layer.input_layernorm.weight.dtype
    x = torch.randn(1, n, C, generator=torch.Generator().manual_seed(SEED + 2)).to(dtype)
    pos = torch.arange(n)[None, :]

    def step_after_prefill() -> torch.Tensor:
        cache = LayerCache()
        layer(x[:, :-1], pos[:, :-1], rope, cache, None)
        return layer(x[:, -1:], pos[:, -1:], rope, cache, None)[:, 0]

    with kernels.kernel_mode(batch_invariant=True):
        full = layer(x, pos, rope, None, None)[:, -1]
        step = step_after_prefill()
    if not torch.equal(full, step):
        raise CorrectnessError(
            f"{precision} {type(layer.attention).__name__}: decode step differs from prefill "
            f"(max |Δ| = {(full - step).float().abs().max().item():.3e})"
        )
    with kernels.kernel_mode(batch_invariant=False):
        plain = step_after_prefill()
    diff = (plain.float() - full.float()).abs().max().item()
    if precision == "fp32" and not diff <= PLAIN_TOLERANCE_FP32:
        raise CorrectnessError(
            f"fp32 {type(layer.attention).__name__}: plain decode differs from invariant by {diff:.3e}"
        )
    return {"tokens": n, "decode_equals_prefill": True, "plain_max_abs_diff": diff}


def in_mode(invariant: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with kernels.kernel_mode(batch_invariant=invariant):
            return fn()

    return call


def interleaved_seconds(
    fns: dict[Any, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[Any, list[float]]:
    """Wall times of each function, the functions taking turns within every repeat.

    Taking turns means a change in machine load (a shared CPU) hits the measurement and its baseline alike, so
    their ratio stays meaningful even when the absolute figures move.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def bench_forward(settings: Settings, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    rows, checks = [], []
    for name in settings.presets:
        total, active = count_parameters(preset(name))
        B, T = settings.shape(name)
        gen = torch.Generator().manual_seed(SEED)
        ids = torch.randint(2, PRESETS[name]["vocab_size"], (B, T), generator=gen)
        for precision in settings.precisions:
            model = build_model(name, precision)
            check = check_model(model, precision, settings.check_tokens)
            checks.append({"preset": name, "precision": precision, **check})
            fns = {path: in_mode(invariant, partial(model, ids)) for path, invariant in PATHS.items()}
            for path, times in interleaved_seconds(fns, settings.repeats).items():
                sec = statistics.median(times)
                rows.append(
                    {
                        "preset": name,
                        "params_total": total,
                        "params_active": active,
                        "precision": precision,
                        "path": path,
                        "batch": B,
                        "seq_len": T,
                        "seconds_median": sec,
                        "seconds_all": times,
                        "tokens_per_s": B * T / sec,
                        # the least disturbed repeat, for a machine shared with other work
                        "tokens_per_s_best": B * T / min(times),
                    }
                )
                log(f"forward {name} {precision} {path}: {B * T / sec:,.0f} tok/s")
            del model
    return rows, checks


def decode_steps(layer: DecoderLayer, x_B1C, pos_B1, rope, new_cache) -> dict[str, Callable[[], Any]]:
    """One decode step of the whole layer and of its attention mixer alone, each from a fresh cache."""
    h = layer.input_layernorm(x_B1C)
    return {
        "layer": lambda: layer(x_B1C, pos_B1, rope, new_cache(), None),
        "mixer": lambda: layer.attention(h, pos_B1, rope, new_cache(), None),
    }


@torch.no_grad()
def bench_decode(settings: Settings, log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    from kernels.rope import rope_table

    cfg = preset(settings.decode_preset)
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B = settings.decode_batch
    rows, checks = [], []
    for precision in settings.decode_precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        # The model's rope buffers are cast with it, so a bf16 layer sees a bf16 table.
        cos, sin = rope_table(max(settings.decode_contexts) + 1, cfg.rotary_dim, cfg.rope_theta)
        rope = (cos.to(dtype), sin.to(dtype))
        gen = torch.Generator().manual_seed(SEED)
        layers = {}
        for kind, idx in decode_layers(cfg).items():
            layer = DecoderLayer(cfg, idx)
            init_layer(layer, cfg, gen)
            layers[kind] = cast(layer, precision).eval()
            check = check_layer(layers[kind], rope, precision, settings.check_tokens)
            checks.append({"layer": kind, "layer_index": idx, "precision": precision, **check})
        x = torch.randn(B, 1, cfg.hidden_size, generator=gen).to(dtype)
        state0 = torch.randn(B, H, D, D, generator=gen) * 0.02
        C = kernels.get_mode().chunk_size
        chunk0 = [torch.randn(B, H, C, D, generator=gen).to(dtype) for _ in range(2)]
        for L in settings.decode_contexts:
            pos = torch.full((B, 1), L)
            # The caches in each mode's layout (rlplat.models.cache), random rather than prefilled: a step's cost
            # depends only on their shapes. The softmax cache holds position L and has the engine's capacity (the
            # whole key blocks L + 1 tokens fill), so it never grows; the step writes the same key there every
            # repeat, and the linear layers replace their state tensors.
            spare = (0, 0, 0, kv_capacity(L + 1) - (L + 1))  # zero past the cached tokens, as the engine's
            k0 = F.pad(torch.randn(B, G, L + 1, D, generator=gen), spare)
            v0 = F.pad(values_with_ones(torch.randn(B, G, L + 1, D, generator=gen)), spare)
            chunk = [torch.where(torch.arange(C)[:, None] < L % C, t, 0) for t in chunk0]
            new_cache = {
                ("linear", True): partial(LayerCache, state0, *chunk),
                ("linear", False): partial(LayerCache, state0),
                ("softmax", True): partial(LayerCache, k_BGLD=k0, v_BGLD=v0),
                ("softmax", False): partial(LayerCache, k_BGLD=k0, v_BGLD=v0),
            }
            fns = {
                (path, kind, part): in_mode(invariant, fn)
                for path, invariant in PATHS.items()
                for kind, layer in layers.items()
                for part, fn in decode_steps(layer, x, pos, rope, new_cache[kind, invariant]).items()
            }
            for (path, kind, part), times in interleaved_seconds(fns, settings.decode_repeats, 2).items():
                rows.append(
                    {
                        "layer": kind,
                        "part": part,
                        "precision": precision,
                        "path": path,
                        "batch": B,
                        "context": L,
                        "ms_per_token": 1e3 * statistics.median(times),
                        "ms_per_token_best": 1e3 * min(times),
                        "seconds_all": times,
                    }
                )
            log(f"decode {precision} L={L} done")
    return rows, checks


def invariant_cost(forward: list[dict]) -> list[dict]:
    by_key = {(r["preset"], r["precision"], r["path"]): r["tokens_per_s"] for r in forward}
    out = []
    for (name, precision, path), tps in by_key.items():
        if path == "invariant" and (name, precision, "plain") in by_key:
            plain = by_key[(name, precision, "plain")]
            out.append(
                {
                    "preset": name,
                    "precision": precision,
                    "invariant_tokens_per_s": tps,
                    "plain_tokens_per_s": plain,
                    "plain_over_invariant": plain / tps,
                }
            )
    return out


def forward_table(forward: list[dict], costs: list[dict]) -> Table:
    table = Table(title="Forward throughput (tokens/s, no grad; median)")
    for col in ("preset", "B×T", "precision", "invariant", "plain", "plain ÷ invariant"):
        table.add_column(col, justify="left" if col in ("preset", "precision") else "right")
    shapes = {r["preset"]: f"{r['batch']}×{r['seq_len']}" for r in forward}
    for c in costs:
        table.add_row(
            c["preset"],
            shapes[c["preset"]],
            c["precision"],
            f"{c['invariant_tokens_per_s']:,.0f}",
            f"{c['plain_tokens_per_s']:,.0f}",
            f"{c['plain_over_invariant']:.2f}×",
        )
    return table


def decode_table(decode: list[dict], precision: str, batch: int) -> Table:
    ms = {
        (r["path"], r["layer"], r["part"], r["context"]): r["ms_per_token"]
        for r in decode
        if r["precision"] == precision
    }
    table = Table(title=f"Decode step, one layer, {precision}, B={batch} (ms/token; median)")
    cols = [
        "context",
        "path",
        "linear layer",
        "softmax layer",
        "softmax ÷ linear",
        "linear mixer",
        "softmax mixer",
    ]
    for col in cols:
        table.add_column(col, justify="left" if col == "path" else "right")
    contexts = sorted({k[3] for k in ms})
    for L in contexts:
        for path in PATHS:
            lin, soft = ms[(path, "linear", "layer", L)], ms[(path, "softmax", "layer", L)]
            table.add_row(
                str(L),
                path,
                f"{lin:.3f}",
                f"{soft:.3f}",
                f"{soft / lin:.2f}",
                f"{ms[(path, 'linear', 'mixer', L)]:.3f}",
                f"{ms[(path, 'softmax', 'mixer', L)]:.3f}",
            )
    return table


def run(settings: Settings, out_dir: str | Path, console: Console | None = None) -> Path:
    """Check, time, write the result file and print the tables; raises CorrectnessError before timing."""
    console = console or Console()
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    check_presets(*settings.presets, settings.decode_preset)
    for p in (*settings.precisions, *settings.decode_precisions):
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if not settings.decode_precisions or not set(settings.decode_precisions) <= {"fp32", "bf16"}:
        raise ValueError("decode precisions must be fp32 and/or bf16")
    started, load_before = time.perf_counter(), os.getloadavg()
    forward, forward_checks = bench_forward(settings, log)
    decode, decode_checks = bench_decode(settings, log)
    costs = invariant_cost(forward)
    payload = {
        "settings": asdict(settings),
        "correctness": {"forward": forward_checks, "decode": decode_checks},
        "forward": forward,
        "invariant_cost": costs,
        "decode": decode,
        "wall_seconds": time.perf_counter() - started,
        # 1/5/15-minute load averages: on a shared machine, other work inflates absolute times
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    path = write_result("model", payload, out_dir)
    hw = hardware()
    console.print(f"hardware: {hw['cpu']} ({hw['torch_threads']} torch threads), torch {hw['torch']}")
    console.print(forward_table(forward, costs))
    for precision in settings.decode_precisions:
        console.print(decode_table(decode, precision, settings.decode_batch))
    console.print(f"correctness checks passed; results written to {path}")
    return path


def run_from_args(args: argparse.Namespace) -> int:
    settings = Settings.quick() if args.quick else Settings()
    if args.presets:
        settings = replace(settings, presets=csv_names(args.presets))
    if args.precisions:
        settings = replace(settings, precisions=csv_names(args.precisions))
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        # On a shared machine one thread per process avoids OpenMP threads waiting on descheduled peers.
        torch.set_num_threads(args.threads)
    try:
        return run_reported(lambda console: run(settings, args.out, console))
    finally:
        torch.set_num_threads(previous_threads)


def register(sub) -> None:
    p = sub.add_parser("model", help="forward throughput and decode cost vs context of the Ring-linear model")
    p.add_argument(
        "--presets", default=None, help="comma-separated model presets (default tiny,mid; quick: tiny)"
    )
    p.add_argument("--precisions", default=None, help="comma-separated subset of fp32,bf16,fp8 (default all)")
    p.add_argument(
        "--quick", action="store_true", help="tiny preset, short inputs and contexts (under a minute)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench_results", help="directory for the dated result file")
    p.set_defaults(func=run_from_args)
