"""Two CPU processes on gloo running the Megatron backend in several layouts; results go to OUT/*.pt.

Run as a script (``python _workers.py OUT``) by the session fixture in ``conftest.py``: spawned children
re-import a script by path, which works whatever pytest's import mode. OUT/inputs.pt (written by the
fixture) holds the batch, the per-token loss weights and the HF model directory. One launch runs every
layout, because importing megatron-core costs ~4 s per process on 2 cores.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shim import cpu_shim

LAYOUTS = {
    "tp2": dict(tp=2, ep=1, dp=1),
    "ep2": dict(tp=1, ep=2, dp=2),
    "tp2ep2": dict(tp=2, ep=2, dp=1),
    "pp2": dict(tp=1, ep=1, dp=1, pp=2),
    "dp2": dict(
        tp=1, ep=1, dp=2
    ),  # experts and dense tensors' optimizer state over two groups of the same ranks
}
# 9 rows in micro-batches of 2 with a KL term (the reference model is a copy of the parallel model). EP=2:
# ranks get 5 and 4 rows, 3 and 2 micro-batches, so the trainer must even them out for the all-to-alls.
# PP=2: 5 micro-batches through the 1F1B schedule (warm-up, steady state and cool-down all run).
UNEVEN = {"uneven": dict(tp=1, ep=2, dp=2), "uneven-pp2": dict(tp=1, ep=1, dp=1, pp=2)}


def _trainer_cfg(tp: int, ep: int, dp: int, pp: int = 1, **kw):
    from rlplat.train.config import MegatronConfig, TrainerConfig

    return TrainerConfig(
        backend="megatron",
        dp_world_size=dp,
        megatron=MegatronConfig(tensor_parallel_size=tp, expert_parallel_size=ep, pipeline_parallel_size=pp),
        **kw,
    )


def _module_step(name: str, lay_sizes: dict, inputs: dict, out: Path) -> None:
    """Forward + backward of the parallel model on this rank's rows, gradients reduced by MegatronGroups."""
    from megatron.core import parallel_state as ps

    from rlplat.models.config import RingLinearConfig
    from rlplat.train.megatron.layout import shard_state
    from rlplat.train.megatron.parallelize import DispatchedExperts, ParallelRingLinear
    from rlplat.train.megatron.trainer import MegatronGroups, _hf_source, gather_full, init_megatron
    from rlplat.train.optim import ShardedAdamW

    hf = inputs["hf_dir"]
    cfg = RingLinearConfig.from_json(Path(hf) / "config.json")
    lay = init_megatron(cfg, _trainer_cfg(**lay_sizes), rank=dist.get_rank(), world_size=2)
    _, names, get = _hf_source(hf)
    model = ParallelRingLinear(cfg, torch.float32)
    model.load_local_state(
        shard_state(
            names, get, cfg, lay, ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
        )
    )
    ids, tgt, w = inputs["ids"], inputs["targets"], inputs["loss_w"]
    rows = torch.tensor_split(torch.arange(ids.shape[0]), lay.dp)[ps.get_data_parallel_rank()]
    logp, ent = model.token_logprobs(ids[rows], tgt[rows])
    loss = (logp * w[rows]).sum() + 0.01 * (ent * w[rows]).sum()
    loss.backward()
    params = [p for _, p in model.named_parameters()]
    groups = MegatronGroups(list(model.named_parameters()), grad_clip=None)
    opt = ShardedAdamW(params, groups.shard_group, lr=1.0, betas=(0.9, 0.999), eps=1.0, weight_decay=0.0)
    for i, p in enumerate(params):
        if p.grad is not None:
            opt.accumulate(i)
    groups.all_reduce_grads(opt)
    grads = opt.grads()
    named = {n: g for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
    full_grads = dict(gather_full(model, lay, named))
    total = loss.detach().clone()
    groups.all_reduce(total)
    all_logp = [torch.empty(0)] * dist.get_world_size()
    dist.all_gather_object(all_logp, (rows, logp.detach()))
    if dist.get_rank() == 0:
        torch.save(
            {
                "loss": total,
                "logp": all_logp,
                "grads": full_grads,
                "grad_norm": groups.last_grad_norm,
                "dispatchers": {
                    type(m.dispatcher).__name__ for m in model.modules() if isinstance(m, DispatchedExperts)
                },
                "classes": {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()},
                "heads": {
                    n: (m.num_heads, getattr(m, "num_kv_heads", None), getattr(m, "groups", None))
                    for n, m in model.named_modules()
                    if n.endswith(".attention")
                },
            },
            out / f"module-{name}.pt",
        )


def _uneven_step(name: str, lay_sizes: dict, inputs: dict, out: Path) -> None:
    from rlplat.algos.config import AlgoConfig
    from rlplat.models.config import RingLinearConfig
    from rlplat.train.megatron.trainer import MegatronTrainer, init_megatron

    hf = inputs["hf_dir"]
    cfg = RingLinearConfig.from_json(Path(hf) / "config.json")
    tcfg = _trainer_cfg(**lay_sizes, **inputs["uneven_trainer_kw"])
    init_megatron(cfg, tcfg, rank=dist.get_rank(), world_size=2)
    trainer = MegatronTrainer(hf, AlgoConfig.model_validate(inputs["uneven_algo"]), tcfg, precision="fp32")
    metrics = trainer.train_step(inputs["uneven_batch"])
    after, _ = trainer.export_weights()
    if dist.get_rank() == 0:
        torch.save({"metrics": metrics, "after": after}, out / f"trainer-{name}.pt")


def _nan_step(inputs: dict, out: Path) -> None:
    """EP=2, DP=2: only data-parallel rank 1's rows hold a token whose embedding is inf, so only its log-probs
    go NaN; both ranks must refuse the step (not hang in the all-to-alls of a backward one rank skipped)."""
    from rlplat.models.config import RingLinearConfig
    from rlplat.train.batch import TrainBatch
    from rlplat.train.megatron.trainer import MegatronTrainer, init_megatron
    from rlplat.train.trainer import NonFiniteError

    hf = inputs["hf_dir"]
    cfg = RingLinearConfig.from_json(Path(hf) / "config.json")
    tcfg = _trainer_cfg(**LAYOUTS["ep2"], **inputs["trainer_kw"])
    init_megatron(cfg, tcfg, rank=dist.get_rank(), world_size=2)
    trainer = MegatronTrainer(hf, None, tcfg, precision="fp32")
    b = inputs["batch"]
    ids = b.input_ids_BT.clone()
    ids[3:, 1] = 1  # rows 3..5 are rank 1's; token 1 appears nowhere else (the batch draws from [2, 512))
    batch = TrainBatch(
        ids, b.response_mask_BT, b.rollout_logp_BT, group_size=b.group_size, rewards_B=b.rewards_B
    )
    with torch.no_grad():
        trainer.model.model.word_embeddings.weight[1] = float("inf")
    before, _ = trainer.export_weights()
    try:
        trainer.train_step(batch)
        outcome = "trained"
    except NonFiniteError as err:
        outcome = str(err)
    after, _ = trainer.export_weights()
    unchanged = all(torch.equal(after[n], t) for n, t in before.items())
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if dist.get_rank() == 0:
        torch.save({"outcomes": outcomes, "unchanged": unchanged}, out / "trainer-nan-ep2.pt")


def _bf16_step(inputs: dict, out: Path) -> None:
    """PP=2 in bf16: gradients reach the fp32 masters through hooks, as the schedule runs the backwards."""
    from rlplat.models.config import RingLinearConfig
    from rlplat.train.megatron.trainer import MegatronTrainer, init_megatron

    hf = inputs["hf_dir"]
    cfg = RingLinearConfig.from_json(Path(hf) / "config.json")
    tcfg = _trainer_cfg(**UNEVEN["uneven-pp2"], **inputs["uneven_trainer_kw"])
    init_megatron(cfg, tcfg, rank=dist.get_rank(), world_size=2)
    trainer = MegatronTrainer(hf, None, tcfg, precision="bf16")
    metrics = trainer.train_step(inputs["uneven_batch"])
    after, _ = trainer.export_weights()
    if dist.get_rank() == 0:
        torch.save({"metrics": metrics, "after": after}, out / "trainer-pp2-bf16.pt")


def _trainer_step(name: str, lay_sizes: dict, inputs: dict, out: Path) -> None:
    """MegatronTrainer: export at step 0, one train_step, export, checkpoint save + load."""
    from rlplat.models.config import RingLinearConfig
    from rlplat.train.checkpoint import load_checkpoint, save_checkpoint
    from rlplat.train.megatron.trainer import MegatronTrainer, init_megatron

    hf = inputs["hf_dir"]
    cfg = RingLinearConfig.from_json(Path(hf) / "config.json")
    tcfg = _trainer_cfg(**lay_sizes, **inputs["trainer_kw"])
    init_megatron(cfg, tcfg, rank=dist.get_rank(), world_size=2)
    trainer = MegatronTrainer(hf, None, tcfg, precision="fp32")
    before, _ = trainer.export_weights()
    logp0, _ = trainer.compute_logprobs(inputs["batch"])
    metrics = trainer.train_step(inputs["batch"])
    after, version = trainer.export_weights()
    buckets = [sorted(b) for b in trainer.export_weight_buckets(max_bytes=200_000)]
    ckpt = save_checkpoint(trainer, out / f"ckpt-{name}", data_position={"next": 3})
    logp1, _ = trainer.compute_logprobs(inputs["batch"])
    trainer.train_step(inputs["batch"])  # move away, then come back through load_checkpoint
    position = load_checkpoint(trainer, out / f"ckpt-{name}")
    restored, restored_version = trainer.export_weights()
    logp_restored, _ = trainer.compute_logprobs(inputs["batch"])
    # (parameters on this rank, the ones whose masters and moments it keeps: expert and dense)
    held = {
        kind: (
            sum(p.numel() for n, p in trainer.model.named_parameters() if (".mlp.experts." in n) == expert),
            sum(
                b.master.numel() for b in trainer.optimizer.buckets if (b.dp is trainer.groups._edp) == expert
            ),
        )
        for kind, expert in (("expert", True), ("dense", False))
    }
    sharding = [None] * dist.get_world_size()
    dist.all_gather_object(sharding, held)
    if dist.get_rank() == 0:
        torch.save(
            {
                "before": before, "after": after, "version": version, "metrics": metrics, "logp0": logp0,
                "logp1": logp1, "logp_restored": logp_restored, "restored": restored,
                "restored_version": restored_version, "position": position, "ckpt": str(ckpt),
                "buckets": buckets, "sharding": sharding,
            },
            out / f"trainer-{name}.pt",
        )  # fmt: skip


def _worker(rank: int, out: str, port: int) -> None:
    cpu_shim()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out_dir = Path(out)
    inputs = torch.load(out_dir / "inputs.pt", weights_only=False)
    try:
        for name, sizes in LAYOUTS.items():
            if sizes.get("pp", 1) == 1:  # a pipeline stage alone has no token_logprobs: trainer level only
                _module_step(name, sizes, inputs, out_dir)
            _trainer_step(name, sizes, inputs, out_dir)
        for name, sizes in UNEVEN.items():
            _uneven_step(name, sizes, inputs, out_dir)
        _bf16_step(inputs, out_dir)
        _nan_step(inputs, out_dir)
    except Exception:
        (out_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, port = sys.argv[1], int(sys.argv[2])
    mp.spawn(_worker, args=(out_dir, port), nprocs=2, join=True)
