"""``rlplat bench train``: trainer throughput per precision and an FP8-vs-bf16 loss comparison.

Two measurements:

- **Trainer tokens/s** of one ``Trainer.train_step`` (recompute of pi_old, forward, backward, AdamW) for each
  preset in fp32, bf16 and FP8, on the batch-invariant kernel path (exact rollout log-probs) and on the plain
  path (chunked linear attention, plain GEMMs). Tokens are the input positions the step runs through.
- **FP8 vs bf16 loss**: the tiny model trained from the same initial weights for ``loss_steps`` steps on a
  fixed synthetic next-token task (each sequence follows x_{t+1} = (a·x_t + c) mod V' from a random start),
  through the trainer itself: advantages 1 and pi_old recomputed make the PPO gradient the cross-entropy
  gradient. Reported: held-out cross-entropy before and after, and the relative gap of FP8's final loss to
  bf16's (the Ling 2.0 report keeps it within 0.25% at scale; a tiny model after a short run is noisier).

Correctness gate, before anything is timed: on every model being timed, the trainer's log-probs must equal
the model's own forward (``torch.equal``, invariant path), and one training step must give finite metrics.
A failure aborts with exit code 1 and no result file.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import kernels
from rlplat.algos.config import AlgoConfig
from rlplat.bench.common import (
    PATHS,
    CorrectnessError,
    csv_names,
    hardware,
    run_reported,
    write_result,
)
from rlplat.models import PRESETS, RingLinearForCausalLM, preset
from rlplat.models.presets import check_presets
from rlplat.train import TrainBatch, Trainer, TrainerConfig

PRECISIONS = ("fp32", "bf16", "fp8")
SEED = 0


@dataclass(frozen=True)
class Settings:
    presets: tuple[str, ...] = ("tiny", "mid")
    precisions: tuple[str, ...] = PRECISIONS
    paths: tuple[str, ...] = ("invariant", "plain")
    shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: {"tiny": (4, 128), "mid": (2, 64)})
    repeats: int = 2
    loss_steps: int = 100
    loss_batch: tuple[int, int] = (8, 32)
    loss_lr: float = 3e-3

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            presets=("tiny",),
            precisions=("fp32", "fp8"),
            paths=("plain",),
            shapes={"tiny": (2, 16)},
            repeats=1,
            loss_steps=3,
            loss_batch=(2, 12),
        )


def build(name: str, precision: str) -> Trainer:
    model = RingLinearForCausalLM(preset(name))
    model.reset_parameters(seed=SEED)
    return Trainer(model, AlgoConfig(), TrainerConfig(lr=1e-5, micro_batch_size=8), precision=precision)


def synthetic_batch(vocab: int, B: int, T: int, seed: int, prompt: int = 4) -> TrainBatch:
    """Sequences of the affine next-token task; the first ``prompt`` tokens are not scored."""
    g = torch.Generator().manual_seed(seed)
    span = vocab - 2
    start = torch.randint(0, span, (B,), generator=g)
    ids = torch.empty(B, T, dtype=torch.long)
    ids[:, 0] = start
    for t in range(1, T):
        ids[:, t] = (ids[:, t - 1] * 5 + 3) % span
    ids += 2
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, prompt - 1 : T - 1] = True
    return TrainBatch(ids, mask, torch.zeros(B, T), advantages_BT=torch.where(mask, 1.0, 0.0), group_size=1)


def check(trainer: Trainer, batch: TrainBatch) -> dict[str, Any]:
    with kernels.kernel_mode(batch_invariant=True), torch.no_grad():
        expected, _ = trainer.model.token_logprobs(batch.input_ids_BT, batch.targets_BT)
        got, _ = trainer.compute_logprobs(batch)
    m = batch.response_mask_BT
    equal = torch.equal(got[m], expected[m])
    if not equal:
        raise CorrectnessError(f"{trainer.precision}: trainer log-probs differ from the model forward")
    return {"precision": trainer.precision, "logprobs_bitwise": equal}


def bench_throughput(settings: Settings, log) -> tuple[list[dict], list[dict]]:
    rows, checks = [], []
    for name in settings.presets:
        B, T = settings.shapes.get(name, (2, 64))
        for precision in settings.precisions:
            trainer = build(name, precision)
            batch = synthetic_batch(trainer.model.config.vocab_size, B, T, seed=1)
            checks.append({"preset": name, **check(trainer, batch)})
            for path in settings.paths:
                trainer.config = trainer.config.model_copy(update={"batch_invariant": PATHS[path]})
                out = trainer.train_step(batch)  # warm-up, and the finite-metrics gate
                if not math.isfinite(out["loss"]) or not math.isfinite(out["grad_norm"]):
                    raise CorrectnessError(f"{name} {precision} {path}: non-finite training step")
                times = []
                for _ in range(settings.repeats):
                    started = time.perf_counter()
                    out = trainer.train_step(batch)
                    times.append(time.perf_counter() - started)
                best = min(times)
                row = {
                    "preset": name,
                    "precision": precision,
                    "path": path,
                    "batch": B,
                    "seq_len": T,
                    "tokens": out["tokens"],
                    "seconds": best,
                    "tokens_per_s": out["tokens"] / best,
                }
                rows.append(row)
                log(f"{name} {precision} {path}: {row['tokens_per_s']:.1f} tokens/s")
    return rows, checks


@torch.no_grad()
def cross_entropy(trainer: Trainer, batch: TrainBatch) -> float:
    logp, _ = trainer.compute_logprobs(batch)
    m = batch.response_mask_BT
    return float(-logp[m].double().mean())


def loss_comparison(settings: Settings, log) -> dict[str, Any]:
    B, T = settings.loss_batch
    vocab = PRESETS["tiny"]["vocab_size"]
    held_out = synthetic_batch(vocab, 2 * B, T, seed=10_000)
    result: dict[str, Any] = {"steps": settings.loss_steps, "batch": B, "seq_len": T, "lr": settings.loss_lr}
    for precision in ("bf16", "fp8"):
        model = RingLinearForCausalLM(preset("tiny"))
        model.reset_parameters(seed=SEED)
        cfg = TrainerConfig(lr=settings.loss_lr, grad_clip=1.0, micro_batch_size=B, batch_invariant=False)
        trainer = Trainer(model, AlgoConfig(), cfg, precision=precision)
        initial = cross_entropy(trainer, held_out)
        curve = []
        for step in range(settings.loss_steps):
            trainer.train_step(synthetic_batch(vocab, B, T, seed=step))
            if (step + 1) % max(1, settings.loss_steps // 10) == 0:
                curve.append(cross_entropy(trainer, held_out))
        final = cross_entropy(trainer, held_out)
        result[precision] = {"initial_loss": initial, "final_loss": final, "curve": curve}
        log(f"{precision}: held-out loss {initial:.4f} -> {final:.4f}")
    bf16, fp8 = result["bf16"]["final_loss"], result["fp8"]["final_loss"]
    result["final_loss_relative_gap"] = (fp8 - bf16) / bf16
    return result


def run(settings: Settings, out_dir: str | Path, console: Console | None = None) -> Path:
    console = console or Console()
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    check_presets(*settings.presets)
    for p in settings.precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    for p in settings.paths:
        if p not in PATHS:
            raise ValueError(f"unknown kernel path {p!r}; choose from {', '.join(PATHS)}")
    started, load_before = time.perf_counter(), os.getloadavg()
    throughput, checks = bench_throughput(settings, log)
    losses = loss_comparison(settings, log)
    payload = {
        "settings": asdict(settings),
        "correctness": checks,
        "throughput": throughput,
        "fp8_vs_bf16_loss": losses,
        "wall_seconds": time.perf_counter() - started,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    path = write_result("train", payload, out_dir)
    hw = hardware()
    console.print(f"hardware: {hw['cpu']} ({hw['torch_threads']} torch threads), torch {hw['torch']}")
    table = Table(title="trainer step throughput (tokens/s)")
    for col in ("preset", "precision", "path", "B x T", "tokens/s"):
        table.add_column(col)
    for r in throughput:
        table.add_row(
            r["preset"], r["precision"], r["path"], f"{r['batch']}x{r['seq_len']}", f"{r['tokens_per_s']:.1f}"
        )
    console.print(table)
    console.print(
        f"FP8 vs bf16 held-out loss after {losses['steps']} steps: bf16 {losses['bf16']['final_loss']:.4f}, "
        f"fp8 {losses['fp8']['final_loss']:.4f}, relative gap {100 * losses['final_loss_relative_gap']:+.3f}%"
    )
    console.print(f"correctness checks passed; results written to {path}")
    return path


def run_from_args(args: argparse.Namespace) -> int:
    settings = Settings.quick() if args.quick else Settings()
    if args.presets:
        settings = replace(settings, presets=csv_names(args.presets))
    if args.precisions:
        settings = replace(settings, precisions=csv_names(args.precisions))
    if args.paths:
        settings = replace(settings, paths=csv_names(args.paths))
    if args.loss_steps is not None:
        settings = replace(settings, loss_steps=args.loss_steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_reported(lambda console: run(settings, args.out, console))


def register(bench_sub) -> None:
    p = bench_sub.add_parser(
        "train", help="trainer tokens/s per precision and an FP8-vs-bf16 loss comparison (tiny model)"
    )
    p.add_argument("--quick", action="store_true", help="a small, fast configuration (for tests)")
    p.add_argument("--presets", default="", help="comma-separated presets (default tiny,mid)")
    p.add_argument("--precisions", default="", help="comma-separated subset of fp32,bf16,fp8")
    p.add_argument("--paths", default="", help="comma-separated kernel paths: invariant,plain")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of the FP8-vs-bf16 loss run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="bench_results", help="directory of the result file")
    p.set_defaults(func=run_from_args)
