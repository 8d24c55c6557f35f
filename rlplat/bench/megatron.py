"""Benchmark of the Megatron backend: tokens/s per precision, FP8-vs-bf16 loss gap, rollout alignment.

    torchrun --nproc-per-node 1 -m rlplat.bench.megatron --preset mid --precisions bf16,fp8
    torchrun --nproc-per-node 2 -m rlplat.bench.megatron --preset mid --tp 2 --fp8-recipe te_blockwise

Every rank builds the preset from the same seed and keeps its shard. Per precision (fp8 uses ``--fp8-recipe``):

1. Correctness gate and the **alignment figure**: the trainer's log-probs against the rollout's — the same
   weights in ``RingLinearForCausalLM`` (what the embedded engine and rlplat's vLLM plugin run, with the same
   kernels and, for FP8, rlplat's blockwise FP8 GEMM). Reported: bitwise or not, max |Δ log-prob| and the
   mismatch KL over scored tokens. A non-finite log-prob aborts with no result file.
2. **tokens/s** of ``train_step`` (forward, backward, AdamW) on a fixed batch, best of ``--repeats``.
3. **loss**: ``--loss-steps`` steps on the affine next-token task of ``rlplat.bench.train`` from the same
   initial weights; held-out cross-entropy before and after; FP8's relative gap to bf16 at the end.

Rank 0 writes ``bench_results/megatron_train-<date>.json`` naming the hardware and the layout.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist

import kernels
from rlplat.algos.config import AlgoConfig
from rlplat.algos.metrics import mismatch_metrics
from rlplat.bench.common import CorrectnessError, csv_names, write_result
from rlplat.bench.train import synthetic_batch
from rlplat.models import RingLinearForCausalLM, preset, to_precision
from rlplat.train.config import MegatronConfig, TrainerConfig
from rlplat.train.megatron.trainer import MegatronTrainer, init_megatron


def _trainer(args, precision: str, lr: float) -> tuple[MegatronTrainer, RingLinearForCausalLM]:
    model = RingLinearForCausalLM(preset(args.preset))
    model.reset_parameters(seed=args.seed)
    model = to_precision(model, precision)
    cfg = TrainerConfig(
        backend="megatron", lr=lr, grad_clip=1.0, micro_batch_size=args.micro_batch_size,
        dp_world_size=dist.get_world_size() // (args.tp * args.pp),
        megatron=MegatronConfig(
            tensor_parallel_size=args.tp, expert_parallel_size=args.ep, pipeline_parallel_size=args.pp,
            fp8_recipe=args.fp8_recipe,
        ),
    )  # fmt: skip
    init_megatron(
        model.config, cfg, rank=dist.get_rank(), world_size=dist.get_world_size(), precision=precision
    )
    trainer = MegatronTrainer(model, AlgoConfig(), cfg, precision=precision)
    rollout = model.to(trainer.device).eval()
    return trainer, rollout


@torch.no_grad()
def alignment(trainer: MegatronTrainer, rollout: RingLinearForCausalLM, batch) -> dict[str, Any]:
    got, _ = trainer.compute_logprobs(batch)
    ids = batch.input_ids_BT.to(trainer.device)
    want, _ = rollout.token_logprobs(ids, batch.targets_BT.to(trainer.device))
    m = batch.response_mask_BT.to(trainer.device)
    if not (torch.isfinite(got[m]).all() and torch.isfinite(want[m]).all()):
        raise CorrectnessError("non-finite log-probs")
    mm = mismatch_metrics(got, want.float(), m)  # k3 KL(rollout || trainer), as the trainer reports it
    return {
        "bitwise": bool(torch.equal(got[m], want[m].float())),
        "max_abs_dlogp": float(mm["max_abs_dlogp"]),
        "mismatch_kl": float(mm["mismatch_kl"]),
    }


def _cross_entropy(trainer: MegatronTrainer, batch) -> float:
    logp, _ = trainer.compute_logprobs(batch)
    m = batch.response_mask_BT.to(logp.device)
    return float(-logp[m].double().mean())


def run(args) -> dict[str, Any]:
    results: dict[str, Any] = {
        "preset": args.preset, "tp": args.tp, "ep": args.ep, "pp": args.pp, "world": dist.get_world_size(),
        "fp8_recipe": args.fp8_recipe, "kernels": str(kernels.get_mode()), "batch": args.batch, "seq_len": args.seq_len,
    }  # fmt: skip
    vocab = preset(args.preset).vocab_size
    B, T = args.batch, args.seq_len
    batch = synthetic_batch(vocab, B, T, seed=1)
    held_out = synthetic_batch(vocab, B, T, seed=10_000)
    for precision in args.precisions:
        trainer, rollout = _trainer(args, precision, lr=1e-5)
        row: dict[str, Any] = {"alignment": alignment(trainer, rollout, batch)}
        del rollout
        out = trainer.train_step(batch)  # warm-up and the finite-step gate
        if not math.isfinite(out["loss"]):
            raise CorrectnessError(f"{precision}: non-finite training step")
        times = []
        for _ in range(args.repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = trainer.train_step(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        row["tokens_per_s"] = out["tokens"] / min(times)
        trainer, _ = _trainer(args, precision, lr=args.loss_lr)
        initial = _cross_entropy(trainer, held_out)
        for step in range(args.loss_steps):
            trainer.train_step(synthetic_batch(vocab, B, T, seed=100 + step))
        row["loss"] = {
            "initial": initial,
            "final": _cross_entropy(trainer, held_out),
            "steps": args.loss_steps,
        }
        results[precision] = row
        if dist.get_rank() == 0:
            print(
                f"{precision}: {row['tokens_per_s']:.0f} tokens/s, alignment {row['alignment']}, loss {row['loss']}"
            )
    if "bf16" in results and "fp8" in results:
        bf16, fp8 = results["bf16"]["loss"]["final"], results["fp8"]["loss"]["final"]
        results["fp8_vs_bf16"] = {
            "final_loss_relative_gap": (fp8 - bf16) / bf16,
            "speedup": results["fp8"]["tokens_per_s"] / results["bf16"]["tokens_per_s"],
        }
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m rlplat.bench.megatron", description=__doc__)
    p.add_argument("--preset", default="mid")
    p.add_argument("--precisions", type=csv_names, default=("bf16", "fp8"))
    p.add_argument("--fp8-recipe", choices=("kernels", "te_blockwise"), default="te_blockwise")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--loss-lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kernel-backend", choices=("reference", "triton"), default=None, help="default: triton on GPU"
    )
    p.add_argument("--plain", action="store_true", help="plain (chunked) kernels instead of batch-invariant")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args(argv)
    backend = args.kernel_backend or ("triton" if torch.cuda.is_available() else "reference")
    kernels.set_mode(backend, batch_invariant=not args.plain)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    results = run(args)
    if rank == 0:
        path = write_result("megatron_train", results, args.out)
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
