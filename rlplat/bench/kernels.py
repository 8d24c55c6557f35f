"""``rlplat bench kernels``: what batch invariance costs per op, at Ring-mini-linear-2.0 layer shapes.

Three ops, each on the batch-invariant path RL uses and on the plain path it is compared with (same run, same
inputs, the two taking turns so that a change in machine load hits both):

- **gemm**: the fused QKV projection, x [T, 2048] @ W [6144, 2048]ᵀ;
- **linear_attention**: 16 heads × 128, per-head decay (chunk-aligned vs chunked);
- **softmax_attention**: 16 query heads, 4 kv heads × 128, causal (block-aligned vs torch's fused SDPA).

Measured: forward + backward time and peak memory above the inputs (CPU: the process's resident high-water
mark, each measurement in a fresh process; GPU: ``torch.cuda.max_memory_allocated``) for B = 1 and each T; and
the time of one decode step (no grad) of ``--decode-batches`` sequences (default 1), each against a context of L
tokens (gemm: that many rows). On a GPU with
``flash-linear-attention`` installed, FLA's chunked simple-GLA kernel is timed as well in bf16 (a reference for
speed, not an rlplat path). An interrupted run (Ctrl-C, a time limit's SIGINT) writes the rows measured so far,
marked ``"interrupted": true``, and exits 130. ``--layer`` adds one whole decoder layer of Ring-mini-linear-2.0 (hidden 2048, 16 heads,
256 experts of width 512 + shared expert) forward + backward at T = 4096 on each path.

Nothing is timed before the correctness gate passes: for each op, the invariant path's rows must be bitwise the
same computed in one call or one token at a time, and the plain path must agree with it within 1e-4 (fp32).
The result file (``bench_results/kernels-*.json``) names the hardware and records, for T ≥ 2048, whether
invariant ≤ 1.5× plain in time and memory (issue 13's bar).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import kernels
from kernels.batch_invariant import linear
from kernels.linear_attention import ChunkState, linear_attention
from kernels.softmax_attention import softmax_attention
from rlplat.bench.common import PATHS, CorrectnessError, csv_ints, csv_names, run_reported, write_result
from rlplat.models.cache import LayerCache

OPS = ("gemm", "linear_attention", "softmax_attention")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HIDDEN, QKV, H, G, D = 2048, 6144, 16, 4, 128
TARGET = 1.5  # invariant / plain, time and memory, at T >= 2048 (issue 13)
SEED = 0


@dataclass(frozen=True)
class Settings:
    ops: tuple[str, ...] = OPS
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    seq_lens: tuple[int, ...] = (512, 2048, 8192)
    contexts: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    # decode rows at once: 1 is the worst case (every invariant GEMM pads it to 4 rows); a rollout decodes its
    # batch's sequences together
    decode_batches: tuple[int, ...] = (1,)
    phases: tuple[str, ...] = ("fwd_bwd", "decode")
    repeats: int = 3
    # a decode step takes 0.05-25 ms on a CPU: 200 of them (a few seconds per context) for a steadier median;
    # on a shared 2-core machine the ratios still move by 10-40% from run to run (slow spells hit both paths
    # of an interleaved pair, but not evenly)
    decode_repeats: int = 200
    layer: bool = False
    layer_seq_len: int = 4096
    backend: str = "reference"
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            dtypes=("fp32",),
            seq_lens=(128,),
            contexts=(64, 300),
            decode_batches=(1, 3),
            repeats=1,
            decode_repeats=2,
        )


def _gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def op_inputs(op: str, T: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """Leaf tensors (requiring grad) of one op at sequence length T, plus its constants."""
    g = _gen(T)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype).to(device).requires_grad_()
    if op == "gemm":
        return {"x": rand(T, HIDDEN), "w": rand(QKV, HIDDEN, s=HIDDEN**-0.5)}
    if op == "linear_attention":
        decay = -(torch.rand(H, generator=g) * 0.5 + 0.01)
        return {
            "q": rand(1, T, H, D),
            "k": rand(1, T, H, D),
            "v": rand(1, T, H, D),
            "decay": decay.to(device),
        }
    if op == "softmax_attention":
        pos = torch.arange(T, device=device)[None]
        return {"q": rand(1, T, H, D), "k": rand(1, T, G, D), "v": rand(1, T, G, D), "pos": pos}
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def forward(op: str, x: dict[str, Any]) -> torch.Tensor:
    if op == "gemm":
        return linear(x["x"], x["w"])
    if op == "linear_attention":
        return linear_attention(x["q"], x["k"], x["v"], x["decay"], D**-0.5)[0]
    return softmax_attention(x["q"], x["k"], x["v"], x["pos"], D**-0.5)


def fla_forward(x: dict[str, Any]) -> torch.Tensor:
    """FLA's chunked simple-GLA (per-head scalar decay, as Lightning attention) on the same inputs."""
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(x["q"], x["k"], x["v"], g_gamma=x["decay"], scale=D**-0.5)[0]


def fwd_bwd(op: str, x: dict[str, Any], fn: Callable | None = None) -> None:
    out = (fn or (lambda x: forward(op, x)))(x)
    out.backward(torch.ones_like(out))
    for t in x.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[Any, Callable[[], Any]], repeats: int, device: str) -> dict[Any, list[float]]:
    """Seconds of each function, the functions taking turns within every repeat (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return times


def in_mode(settings: Settings, invariant: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with kernels.kernel_mode(backend=settings.backend, batch_invariant=invariant):
            return fn()

    return call


# Peak memory
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _peak_child(args: tuple) -> int:
    """Peak resident memory of one forward + backward above what was resident with its inputs (a fresh process)."""
    op, T, dtype_name, invariant, backend, threads = args
    torch.set_num_threads(threads)
    kernels.set_mode(backend=backend, batch_invariant=invariant)
    x = op_inputs(op, T, DTYPES[dtype_name], "cpu")
    fwd_bwd(op, x)  # first call: lazy initialisation (thread pools, kernels) is not the op's memory
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    fwd_bwd(op, x)
    return _status_bytes("VmHWM") - before


def peak_bytes(settings: Settings, op: str, T: int, dtype_name: str, invariant: bool, fn=None) -> int:
    if settings.device == "cuda":
        x = op_inputs(op, T, DTYPES[dtype_name], "cuda")
        with kernels.kernel_mode(backend=settings.backend, batch_invariant=invariant):
            fwd_bwd(op, x, fn)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd(op, x, fn)
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    args = (op, T, dtype_name, invariant, settings.backend, torch.get_num_threads())
    return _in_fresh_process(_peak_child, args)


def _in_fresh_process(fn: Callable, args: tuple) -> Any:
    """``fn(args)`` in a new process whose allocator returns every large block to the system when it is freed:
    glibc otherwise raises its mmap threshold after the first large free and keeps later blocks in its heap,
    so memory freed by a warm-up would hide part of the measured peak."""
    import os

    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    os.environ.update({"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)})
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, (args,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Correctness gate
@torch.no_grad()
def check_op(settings: Settings, op: str, dtype: torch.dtype) -> dict[str, Any]:
    """Invariant rows: one call == one token at a time (bitwise); fp32 plain ≈ invariant (1e-4 relative)."""
    T = 70
    x = {
        k: v.detach() if isinstance(v, torch.Tensor) else v
        for k, v in op_inputs(op, T, dtype, settings.device).items()
    }
    with kernels.kernel_mode(backend=settings.backend, batch_invariant=True):
        full = forward(op, x)
        steps = _token_by_token(op, x)
    if not torch.equal(full, steps):
        raise CorrectnessError(
            f"{op} {dtype}: invariant rows differ between one call and one token at a time "
            f"(max |Δ| = {(full.float() - steps.float()).abs().max().item():.3e})"
        )
    with kernels.kernel_mode(backend=settings.backend, batch_invariant=False):
        plain = forward(op, x)
    rel = ((plain.double() - full.double()).norm() / full.double().norm()).item()
    if dtype == torch.float32 and not rel <= 1e-4:
        raise CorrectnessError(f"{op} fp32: plain differs from invariant by {rel:.2e} (relative) > 1e-4")
    return {
        "op": op,
        "dtype": str(dtype).removeprefix("torch."),
        "bitwise_stepwise": True,
        "plain_rel_diff": rel,
    }


def _token_by_token(op: str, x: dict[str, Any]) -> torch.Tensor:
    if op == "gemm":
        return torch.cat([linear(x["x"][t : t + 1], x["w"]) for t in range(x["x"].shape[0])])
    T = x["q"].shape[1]
    outs = []
    if op == "linear_attention":
        state, dev = None, x["q"].device  # positions on the inputs' device: a Triton kernel reads them there
        for t in range(T):
            s = slice(t, t + 1)
            o, state = linear_attention(
                x["q"][:, s], x["k"][:, s], x["v"][:, s], x["decay"], D**-0.5, state,
                torch.tensor([t], device=dev), torch.tensor([1], device=dev),
            )  # fmt: skip
            outs.append(o)
        return torch.cat(outs, 1)
    for t in range(T):
        s = slice(t, t + 1)
        outs.append(softmax_attention(x["q"][:, s], x["k"], x["v"], x["pos"][:, s], D**-0.5))
    return torch.cat(outs, 1)


# The measurements
def bench_fwd_bwd(settings: Settings, log: Callable[[str], None]) -> Iterator[dict]:
    """Rows as they are measured (an interrupted run keeps the ones done)."""
    have_fla = settings.device == "cuda" and _fla_available()
    for op in settings.ops:
        for dtype_name in settings.dtypes:
            for T in settings.seq_lens:
                x = op_inputs(op, T, DTYPES[dtype_name], settings.device)
                fns: dict[str, Callable[[], Any]] = {
                    path: in_mode(settings, inv, lambda x=x, op=op: fwd_bwd(op, x))
                    for path, inv in PATHS.items()
                }
                # bf16 only: FLA autotunes each kernel per dtype, minutes of a GPU check's few
                if have_fla and op == "linear_attention" and dtype_name == "bf16":
                    fns["fla"] = lambda x=x, op=op: fwd_bwd(op, x, fla_forward)
                for path, times in interleaved(fns, settings.repeats, settings.device).items():
                    invariant = PATHS.get(path, False)
                    fn = fla_forward if path == "fla" else None
                    peak = peak_bytes(settings, op, T, dtype_name, invariant, fn)
                    yield (
                        {
                            "op": op, "dtype": dtype_name, "T": T, "path": path, "seconds": statistics.median(times),
                            "seconds_all": times, "peak_mb": peak / 2**20,
                        }
                    )  # fmt: skip
                    log(
                        f"{op} {dtype_name} T={T} {path}: {statistics.median(times):.4f} s, {peak / 2**20:.0f} MB"
                    )
                del x


@torch.no_grad()
def bench_decode(settings: Settings, log: Callable[[str], None]) -> Iterator[dict]:
    for op in settings.ops:
        for dtype_name in settings.dtypes:
            dtype = DTYPES[dtype_name]
            for L in settings.contexts if op != "gemm" else settings.contexts[:1]:
                for b in settings.decode_batches:
                    fns = {
                        path: in_mode(settings, inv, _decode_fn(op, L, b, dtype, settings, inv))
                        for path, inv in PATHS.items()
                    }
                    for path, times in interleaved(fns, settings.decode_repeats, settings.device).items():
                        yield (
                            {
                                "op": op, "dtype": dtype_name, "context": L, "batch": b, "path": path,
                                "ms": 1e3 * statistics.median(times), "ms_best": 1e3 * min(times),
                            }
                        )  # fmt: skip
                    log(f"decode {op} {dtype_name} L={L} B={b} done")


def _decode_fn(
    op: str, L: int, b: int, dtype: torch.dtype, settings: Settings, invariant: bool
) -> Callable[[], Any]:
    """One decode step of ``b`` sequences, each against a context of L tokens, the state filled with random values
    (its cost depends only on the shapes). Each mode gets the state layout it keeps (see rlplat.models.cache)."""
    dev = settings.device
    g = torch.Generator(device=dev).manual_seed(
        L
    )  # on a GPU drawn there: batch 32 at 8K is gigabytes of cache
    rand = lambda *shape: torch.randn(*shape, generator=g, device=dev)
    if op == "gemm":
        x, w = rand(b, HIDDEN).to(dtype), (rand(QKV, HIDDEN) * HIDDEN**-0.5).to(dtype)
        return lambda: linear(x, w)
    q = rand(b, 1, H, D).to(dtype)
    if op == "linear_attention":
        k, v = rand(b, 1, H, D).to(dtype), rand(b, 1, H, D).to(dtype)
        decay, C = -(torch.rand(H, generator=g, device=dev) * 0.5 + 0.01), kernels.get_mode().chunk_size
        S = rand(b, H, D, D) * 0.02
        fill = torch.arange(C, device=dev)[:, None] < L % C
        state = ChunkState(S, *(torch.where(fill, rand(b, H, C, D), 0).to(dtype) for _ in range(2)))
        start, one = torch.full((b,), L, device=dev), torch.ones(b, dtype=torch.long, device=dev)
        return lambda: linear_attention(q, k, v, decay, D**-0.5, state if invariant else S, start, one)
    # the engine's own KV cache holding L + 1 tokens (its layout and its capacity in whole key blocks, which the
    # invariant path reads in place)
    positions = torch.arange(L + 1, device=dev).expand(b, -1)
    cache_k, cache_v = LayerCache().append_kv(rand(b, L + 1, G, D), rand(b, L + 1, G, D), positions)
    pos = torch.full((b, 1), L, device=dev)
    return lambda: softmax_attention(q, cache_k, cache_v, pos, D**-0.5)


def bench_layer(settings: Settings, log: Callable[[str], None]) -> Iterator[dict]:
    """One Ring-mini-linear-2.0 decoder layer (linear attention + MoE), forward + backward, B = 1: each path in a
    fresh process (so neither inherits the other's allocator state), the better of two timed steps."""
    for path, invariant in PATHS.items():
        if settings.device == "cpu":
            seconds, peak = _in_fresh_process(_layer_child, (settings, invariant, torch.get_num_threads()))
        else:
            seconds, peak = _layer_child((settings, invariant, None))
        yield {"T": settings.layer_seq_len, "path": path, "seconds": seconds, "peak_mb": peak / 2**20}
        log(
            f"layer T={settings.layer_seq_len} {path}: {seconds:.2f} s, {peak / 2**20:.0f} MB above weights and input"
        )


def _layer_child(args: tuple) -> tuple[float, int]:
    from kernels.rope import rope_table
    from rlplat.models import preset
    from rlplat.models.ring_linear import DecoderLayer

    settings, invariant, threads = args
    if threads:
        torch.set_num_threads(threads)
    kernels.set_mode(backend=settings.backend, batch_invariant=invariant)
    cfg = preset("ring-mini-linear-2.0")
    index = next(
        i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i) and not cfg.is_softmax_layer(i)
    )
    T, dev = settings.layer_seq_len, settings.device
    with torch.device(dev):
        layer = DecoderLayer(cfg, index)
    gen = _gen()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02)
    cos, sin = rope_table(T, cfg.rotary_dim, cfg.rope_theta)
    rope = (cos.to(dev), sin.to(dev))
    x = torch.randn(1, T, cfg.hidden_size, generator=gen).to(dev).requires_grad_()
    pos = torch.arange(T, device=dev)[None]

    def step() -> None:
        layer(x, pos, rope, None, None).sum().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    step()
    times = []
    if dev == "cpu":
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    else:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = _status_bytes("VmHWM") - before if dev == "cpu" else torch.cuda.max_memory_allocated() - before
    return min(times), peak


def ratios(fwd_bwd_rows: list[dict], decode_rows: list[dict]) -> list[dict]:
    out = []
    by = {(r["op"], r["dtype"], r["T"], r["path"]): r for r in fwd_bwd_rows}
    for (op, dtype, T, path), r in by.items():
        plain = by.get((op, dtype, T, "plain"))
        if path != "invariant" or plain is None:
            continue
        time_ratio = r["seconds"] / plain["seconds"]
        mem_ratio = r["peak_mb"] / max(plain["peak_mb"], 1e-9)
        out.append(
            {
                "op": op, "dtype": dtype, "T": T, "phase": "fwd+bwd", "time_ratio": time_ratio,
                "memory_ratio": mem_ratio,
                "meets_target": (time_ratio <= TARGET and mem_ratio <= TARGET) if T >= 2048 else None,
            }
        )  # fmt: skip
    dec = {(r["op"], r["dtype"], r["context"], r.get("batch", 1), r["path"]): r for r in decode_rows}
    for (op, dtype, L, b, path), r in dec.items():
        plain = dec.get((op, dtype, L, b, "plain"))
        if path == "invariant" and plain is not None:
            ratio = r["ms"] / plain["ms"]
            out.append(
                {
                    "op": op,
                    "dtype": dtype,
                    "context": L,
                    "batch": b,
                    "phase": "decode",
                    "time_ratio": ratio,
                    "meets_target": ratio <= TARGET,
                }
            )
    return out


def _fla_available() -> bool:
    """FLA is a speed reference, not an rlplat path: if it is missing or fails on a small input, it is left out
    (and the result file says so) rather than stopping the benchmark."""
    try:
        x = op_inputs("linear_attention", 64, torch.bfloat16, "cuda")
        fwd_bwd("linear_attention", x, fla_forward)
    except Exception as err:  # any failure of a third-party kernel on this machine
        print(f"FLA's chunk_simple_gla is not timed: {type(err).__name__}: {err}")
        return False
    return True


def table(rows: list[dict]) -> Table:
    t = Table(title="Invariant / plain (time, memory); target ≤ 1.5 at T ≥ 2048 and in decode")
    for col in ("op", "dtype", "phase", "T / context", "time", "memory", "target"):
        t.add_column(col)
    for r in rows:
        target = {True: "met", False: "MISSED", None: "-"}[r["meets_target"]]
        where = str(r["T"]) if "T" in r else f"{r['context']}, batch {r['batch']}"
        t.add_row(
            r["op"], r["dtype"], r["phase"], where, f"{r['time_ratio']:.2f}×",
            f"{r['memory_ratio']:.2f}×" if "memory_ratio" in r else "-", target,
        )  # fmt: skip
    return t


def run(settings: Settings, console: Console, out_dir: str = "bench_results") -> dict[str, Any]:
    log = lambda msg: console.log(msg)
    checks = [check_op(settings, op, DTYPES[d]) for op in settings.ops for d in settings.dtypes]
    log("correctness gate passed: " + ", ".join(f"{c['op']} {c['dtype']}" for c in checks))
    fb: list[dict] = []
    dec: list[dict] = []
    layer: list[dict] = []
    phases = [
        (fb, bench_fwd_bwd, "fwd_bwd" in settings.phases),
        (dec, bench_decode, "decode" in settings.phases),
        (layer, bench_layer, settings.layer),
    ]
    interrupted = False
    try:
        for rows, bench, wanted in phases:
            if wanted:
                for row in bench(settings, log):  # row by row: an interrupt keeps the rows already measured
                    rows.append(row)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: what was measured is still written
        interrupted = True
        log("interrupted: writing the measurements taken so far")
    summary = ratios(fb, dec)
    console.print(table(summary))
    payload = {
        "settings": asdict(settings), "kernel_mode": str(kernels.get_mode()), "checks": checks, "fwd_bwd": fb,
        "decode": dec, "layer": layer, "ratios": summary, "interrupted": interrupted,
    }  # fmt: skip
    path = write_result("kernels", payload, out_dir)
    console.print(f"results: {path}" + (" (interrupted: partial)" if interrupted else ""))
    if interrupted:
        raise KeyboardInterrupt
    return payload


def register(sub) -> None:
    p = sub.add_parser("kernels", help="fwd+bwd time/memory and decode time per op: invariant vs plain")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16")
    p.add_argument("--seq-lens", default=None, help="comma-separated T for fwd+bwd (default 512,2048,8192)")
    p.add_argument("--contexts", default=None, help="comma-separated decode contexts (default 256..8192)")
    p.add_argument(
        "--decode-batches", default=None, help="comma-separated sequences decoded at once (default 1)"
    )
    p.add_argument("--phases", default=None, help="comma-separated subset of fwd_bwd,decode (default both)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 3)")
    p.add_argument(
        "--decode-repeats", type=int, default=None, help="timed decode steps per measurement (default 200)"
    )
    p.add_argument("--layer", action="store_true", help="also one Ring-mini decoder layer fwd+bwd at T=4096")
    p.add_argument("--backend", choices=kernels.BACKENDS, default="reference")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat (a smoke test, not a measurement)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench_results", help="directory for the dated result file")
    p.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    settings = Settings.quick() if args.quick else Settings()
    changes: dict[str, Any] = {"backend": args.backend, "device": args.device, "layer": args.layer}
    if args.ops:
        changes["ops"] = csv_names(args.ops)
        bad = set(changes["ops"]) - set(OPS)
        if bad:
            raise ValueError(f"unknown op(s) {sorted(bad)}; choose from {', '.join(OPS)}")
    if args.dtypes:
        changes["dtypes"] = csv_names(args.dtypes)
        bad = set(changes["dtypes"]) - set(DTYPES)
        if bad:
            raise ValueError(f"unknown dtype(s) {sorted(bad)}; choose from fp32, bf16")
    if args.seq_lens:
        changes["seq_lens"] = csv_ints(args.seq_lens)
    if args.contexts:
        changes["contexts"] = csv_ints(args.contexts)
    if args.decode_batches:
        changes["decode_batches"] = csv_ints(args.decode_batches)
    if args.phases:
        changes["phases"] = csv_names(args.phases)
        bad = set(changes["phases"]) - {"fwd_bwd", "decode"}
        if bad or not changes["phases"]:
            raise ValueError(f"unknown phase(s) {sorted(bad)}; choose from fwd_bwd, decode")
    for name in ("repeats", "decode_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give at least 1")
        if value is not None:
            changes[name] = value
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = replace(settings, **changes)
    return run_reported(lambda console: run(settings, console, args.out))
