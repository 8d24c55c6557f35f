"""The Megatron-core trainer backend: the torch ``Trainer``'s RL step on a tensor/expert/pipeline-parallel model.

One process per rank (torch.distributed; nccl on GPUs, gloo on CPU). ``init_megatron`` checks the layout
first (``layout.check_layout``: a bad size fails before any process group exists), then joins the default
group and builds Megatron's groups (``parallel_state.initialize_model_parallel``, expert tensor parallel 1).

The step itself is ``rlplat.train.trainer.Trainer._train_step`` unchanged — advantages, filters,
corrections, losses, micro-batching, the global loss normaliser — because the model's ``token_logprobs`` is
the same function of the same weights. Only the reductions differ, and they go through ``MegatronGroups``,
the object the Trainer calls its data-parallel group:

- loss normaliser, metrics and the non-finite flag: summed over the data-parallel group (tensor-parallel
  ranks hold the same rows and compute the same values);
- gradients (``all_reduce_grads``): the routers and QK norms (partial per tensor-parallel rank, see
  ``parallelize.py``) over the tensor-parallel group, then each optimizer bucket in one call over its
  group — dense parameters over the data-parallel group, routed experts over the expert-data-parallel group;
  then the global norm over unique tensors (tensor-parallel shards counted once each, replicated tensors
  once, experts once per expert-parallel group, every pipeline stage's own) and clipping by it, so the
  Trainer's own per-rank clip that follows is a no-op (its norm is ≤ the global one). Without model
  parallelism the Trainer's own norm is already global and is left to it.

Pipeline parallelism (``pipeline_parallel_size`` > 1): each stage holds its layers (``layout.stage_layers``)
and Megatron's 1F1B schedule (``forward_backward_pipelining_without_interleaving``) runs the step's
micro-batches through the stages, passing hidden states [B, T, C] point to point; shapes travel with each
micro-batch (``variable_seq_lengths``), as rows and lengths change from one to the next. The last stage
computes each micro-batch's loss with the Trainer's ``_micro_loss``, so the loss is the same function as
without stages. Results only the last stage has — log-probs (old, reference) and the step's metrics — are
broadcast over the pipeline group, so every rank returns the same answer.

The optimizer is the Trainer's: AdamW on fp32 masters sharded as Megatron's distributed optimizer shards them
(``rlplat.train.optim``; ``MegatronGroups.shard_group``: dense tensors over the data-parallel group, routed
experts over the expert-data-parallel group), not Megatron's ``DistributedOptimizer`` class (CUDA tensors
only, and its own clipping and NaN handling). Tokens per expert (the ``expert_load_imbalance`` metric and the
aux-loss-free expert-bias update) are counted on each rank's routed slice and summed over tensor- and
data-parallel ranks, so every rank of a stage updates its biases alike. Under expert parallelism every rank
must run the same number of forwards and backwards (the all-to-alls pair them up): micro-batches are split
until all ranks have as many as the busiest one, and a rank whose log-probs went NaN/inf still runs its
backward (on a zero loss) before every rank refuses the step with ``NonFiniteError``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlplat.algos.config import AlgoConfig
from rlplat.models import RingLinearForCausalLM, precision_of
from rlplat.models.checkpoint import INDEX_FILE, SINGLE_FILE
from rlplat.models.config import RingLinearConfig
from rlplat.train.batch import TrainBatch
from rlplat.train.checkpoint import empty_directory
from rlplat.train.config import TrainerConfig
from rlplat.train.dist import DataParallel
from rlplat.train.experts import ExpertLoadCounter
from rlplat.train.megatron.layout import (
    ParallelLayout,
    check_checkpoint_layout,
    check_layout,
    global_expert_name,
    is_tensor_parallel,
    shard_state,
    shard_tag,
    unshard_tensor,
    write_layout,
)
from rlplat.train.megatron.parallelize import ParallelRingLinear
from rlplat.train.optim import ShardedAdamW
from rlplat.train.trainer import RowProbe, Trainer, _Sums, weight_buckets


def init_megatron(
    model_cfg: RingLinearConfig,
    trainer_cfg: TrainerConfig,
    *,
    rank: int,
    world_size: int,
    precision: str = "fp32",
    backend: str = "auto",
) -> ParallelLayout:
    """Check the layout, join the default process group (MASTER_ADDR/PORT from the environment) and build
    Megatron's tensor/expert/data-parallel groups. Returns the layout."""
    lay = check_layout(model_cfg, trainer_cfg, precision=precision, world_size=world_size)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # one GPU per rank: torchrun's LOCAL_RANK, else the rank's place on its node
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("the Megatron backend needs MASTER_ADDR and MASTER_PORT in the environment")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        expert_model_parallel_size=lay.ep,
        expert_tensor_parallel_size=1,
    )
    return lay


class MegatronGroups:
    """The Trainer's data-parallel interface (``rank``, ``world_size``, ``shard``, ``all_reduce``,
    ``all_reduce_grads``, ``reduce_expert_counts``, ``shard_group``) over Megatron's groups: gradients and
    optimizer state per group as the module docstring says."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], grad_clip: float | None):
        self.rank = ps.get_data_parallel_rank()
        self.world_size = ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self._dp = DataParallel(self.rank, self.world_size, self.dp_group)  # shard rows, reduce metrics
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.ep_group = ps.get_expert_model_parallel_group()
        self.edp_group = ps.get_expert_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        # routed experts are replicated over the expert-data-parallel group, the rest over data-parallel ranks
        self._edp = DataParallel(ps.get_expert_data_parallel_rank(), self.edp_group.size(), self.edp_group)
        tp_rank = ps.get_tensor_model_parallel_rank()
        # with tp = ep = pp = 1 every rank holds every tensor, so the Trainer's own norm and clip are global
        self.model_parallel = any(g.size() > 1 for g in (self.tp_group, self.ep_group, self.pp_group))
        self.grad_clip = grad_clip
        self.expert = [".mlp.experts." in n for n, _ in named_params]
        self.partial_tp = [bool(getattr(p, "sequence_parallel", False)) for _, p in named_params]
        # dense tensors in this rank's share of the global norm: tp shards, replicated ones on tp rank 0
        # (by name, from layout.py: Megatron sets its tensor_model_parallel attribute only when it initialises)
        self.in_dense_norm = [
            not e and (is_tensor_parallel(n) or tp_rank == 0)
            for (n, _), e in zip(named_params, self.expert, strict=True)
        ]
        self.last_grad_norm: float | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, num_rows: int) -> torch.Tensor:
        return self._dp.shard(num_rows)

    def shard_group(self, param_index: int) -> DataParallel:
        return self._edp if self.expert[param_index] else self._dp

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self._dp.all_reduce(t, op)

    def reduce_expert_counts(self, counts: list[torch.Tensor]) -> None:
        """Each tensor-parallel rank routes a slice of its rows' tokens (``DispatchedExperts``): sum the
        slices, then the data-parallel ranks' rows. Pipeline stages count their own layers."""
        for c in counts:
            dist.all_reduce(c, group=self.tp_group)
        self._dp.all_reduce_tensors(counts)

    def all_reduce_grads(self, optimizer: ShardedAdamW) -> None:
        """Sum the fp32 gradients where they are partial — routers and QK norms over the tensor-parallel
        group (each tp rank saw a slice of the tokens or heads), then each optimizer bucket over the group its
        shards span (dense: data-parallel, experts: expert-data-parallel) — and clip by the global norm."""
        grads = optimizer.grads()
        for g, partial_tp in zip(grads, self.partial_tp, strict=True):
            if partial_tp:
                dist.all_reduce(g, group=self.tp_group)
        optimizer.all_reduce_grads()
        if self.model_parallel:
            self._clip_by_global_norm(grads)

    def _clip_by_global_norm(self, grads: list[torch.Tensor]) -> None:
        """The norm over unique tensors (module docstring); NaN everywhere if it is not finite."""
        sq = torch.zeros(2, dtype=torch.float64, device=grads[0].device)  # nccl reduces device tensors only
        for g, expert, dense in zip(grads, self.expert, self.in_dense_norm, strict=True):
            if expert or dense:
                sq[int(expert)] += g.detach().double().square().sum()
        dense_sq, expert_sq = sq[:1].clone(), sq[1:].clone()
        dist.all_reduce(dense_sq, group=self.tp_group)
        dist.all_reduce(expert_sq, group=self.ep_group)
        stage_sq = dense_sq + expert_sq
        dist.all_reduce(stage_sq, group=self.pp_group)
        norm = float(stage_sq.sqrt())
        self.last_grad_norm = norm
        if not torch.isfinite(torch.tensor(norm)):
            for g in grads:  # every rank then refuses the step in the Trainer, not just the one with NaN
                g.fill_(float("nan"))
            return
        if self.grad_clip is not None:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)


def _hf_source(weights: RingLinearForCausalLM | str | Path):
    """(config, names, get(name)) of an in-memory model or an HF directory read tensor by tensor."""
    if isinstance(weights, RingLinearForCausalLM):
        state = weights.state_dict()
        return weights.config, list(state), lambda n: state[n].detach().cpu()
    path = Path(weights)
    cfg = RingLinearConfig.from_json(path / "config.json")
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    else:
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)

    def get(name: str) -> torch.Tensor:
        with safe_open(str(path / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    with torch.device("meta"):
        names = list(RingLinearForCausalLM(cfg).state_dict())
    absent = [n for n in names if n not in weight_map]
    if absent:
        raise ValueError(f"{path} lacks {len(absent)} tensor(s) of the model, e.g. {absent[:5]}")
    return cfg, names, get


def gather_full(
    model: ParallelRingLinear, lay: ParallelLayout, local: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full CPU tensor) for tensors named like ``model.local_state()`` (weights, or their
    gradients), gathered over the tensor- and expert-parallel groups one at a time, then stage by stage over
    the pipeline group, so every rank gets every tensor. A collective: every rank must iterate it to the end."""
    if lay.pp == 1:
        yield from _gather_stage(model, lay, local)
        return
    pp_group, my_stage = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank()
    stage_ranks = dist.get_process_group_ranks(pp_group)
    device = next(model.parameters()).device
    for stage, src in enumerate(stage_ranks):
        # the receivers allocate from the owner's list of (name, shape, dtype), one message per stage
        header: list[Any] = [_stage_header(model, lay, local) if stage == my_stage else None]
        dist.broadcast_object_list(header, src=src, group=pp_group)
        owned = _gather_stage(model, lay, local) if stage == my_stage else None
        for name, shape, dtype in header[0]:
            if owned is not None:
                got, full = next(owned)
                assert got == name, (got, name)
                buf = full.to(device)
            else:
                buf = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=src, group=pp_group)
            yield name, buf.cpu()


def _stage_header(
    model: ParallelRingLinear, lay: ParallelLayout, local: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Size, torch.dtype]]:
    """What ``_gather_stage`` yields on this rank, (name, full shape, dtype) in its order, without gathering."""
    cfg, out = model.config, []
    for name, t in local.items():
        if ".mlp.experts." in name:
            out += [(global_expert_name(name, cfg, lay.ep, e), t.shape, t.dtype) for e in range(lay.ep)]
        elif is_tensor_parallel(name) and lay.tp > 1:
            parts = [torch.empty(t.shape, device="meta")] * lay.tp
            out.append((name, unshard_tensor(name, parts, cfg).shape, t.dtype))
        else:
            out.append((name, t.shape, t.dtype))
    return out


def _gather_stage(
    model: ParallelRingLinear, lay: ParallelLayout, local: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``gather_full`` within one pipeline stage: over its tensor- and expert-parallel groups."""
    cfg = model.config
    tp_group, ep_group = ps.get_tensor_model_parallel_group(), ps.get_expert_model_parallel_group()
    for name, t in local.items():
        t = t.detach().contiguous()
        if ".mlp.experts." in name:
            parts = [torch.empty_like(t) for _ in range(lay.ep)]
            dist.all_gather(parts, t, group=ep_group)
            for e, part in enumerate(parts):
                yield global_expert_name(name, cfg, lay.ep, e), part.cpu()
        elif is_tensor_parallel(name) and lay.tp > 1:
            parts = [torch.empty_like(t) for _ in range(lay.tp)]
            dist.all_gather(parts, t, group=tp_group)
            yield name, unshard_tensor(name, [p.cpu() for p in parts], cfg)
        else:
            yield name, t.cpu().clone()


class _ParallelLoadCounter(ExpertLoadCounter):
    """Tokens per expert on the routers, which see this tensor-parallel rank's slice of the forward's tokens
    (padded to a multiple of tp, as ``parallelize.DispatchedExperts`` scatters them)."""

    def routed_rows(self, valid_N: torch.Tensor) -> torch.Tensor:
        tp = ps.get_tensor_model_parallel_world_size()
        padded = torch.cat([valid_N, valid_N.new_zeros(-len(valid_N) % tp)])
        return padded.chunk(tp)[ps.get_tensor_model_parallel_rank()]

    def imbalance(self) -> float:
        """The mean over every stage's MoE layers (a collective over the pipeline group)."""
        group = ps.get_pipeline_model_parallel_group()
        if group.size() == 1:
            return super().imbalance()
        ratios = self.load_ratios()
        # on the GPU under nccl, also on a stage without MoE layers (nothing of the model's to take it from)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        total = torch.tensor([float(sum(ratios)), len(ratios)], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=group)
        return float(total[0] / total[1]) if total[1] > 0 else 0.0


class MegatronTrainer(Trainer):
    """``TrainerBackend`` on Megatron-core: call ``init_megatron`` in every rank first, then build this."""

    _load_counter = _ParallelLoadCounter

    def __init__(
        self,
        weights: RingLinearForCausalLM | str | Path,
        algo: AlgoConfig | None = None,
        config: TrainerConfig | None = None,
        *,
        precision: str | None = None,
    ):
        config = config or TrainerConfig(backend="megatron")
        if precision is None:
            precision = precision_of(weights) if isinstance(weights, RingLinearForCausalLM) else "bf16"
        cfg, names, get = _hf_source(weights)
        self.layout = check_layout(cfg, config, precision=precision, world_size=dist.get_world_size())
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        fp8 = config.megatron.fp8_recipe if precision == "fp8" else None
        model = ParallelRingLinear(cfg, dtype, fp8=fp8)
        if torch.cuda.is_available():
            model = model.cuda()
        model.load_local_state(
            shard_state(names, get, cfg, self.layout, self.tp_rank, self.ep_rank, self.pp_rank)
        )
        groups = MegatronGroups(list(model.named_parameters()), config.grad_clip)
        super().__init__(model, algo, config, dp=groups)  # type: ignore[arg-type]
        self.groups = groups
        self.precision = precision
        self._collective_backward = self.layout.ep > 1

    def train_step(self, batch: TrainBatch, probe: RowProbe | None = None) -> dict[str, float]:
        out = super().train_step(batch, probe)
        if "grad_norm" in out and self.groups.last_grad_norm is not None:
            out["grad_norm"] = self.groups.last_grad_norm  # the global norm, before clipping
        return out

    # Pipeline parallelism: the Trainer's forwards through Megatron's schedule.

    def _backward_micro_batches(
        self, batch: TrainBatch, micro: list[torch.Tensor], micro_args, sums: _Sums
    ) -> bool:
        if self.layout.pp == 1:
            return super()._backward_micro_batches(batch, micro, micro_args, sums)
        finite = True
        zero = torch.zeros((), dtype=torch.int, device=self.device)

        def loss_func(args: tuple, T_mb: int, outputs: tuple[torch.Tensor, torch.Tensor]):
            nonlocal finite
            logp, ent = outputs
            loss = self._micro_loss(batch, logp, ent, T_mb, *args)
            if loss is None:
                # the schedule still runs this micro-batch's backward through every stage (the stages are
                # paired point to point); the step is refused afterwards and its gradients discarded
                finite = False
                loss = logp.sum() * 0.0
            return loss, zero, {}

        def forward_step(data: Iterator[torch.Tensor], _model):
            args = micro_args(next(data))
            return self._stage_step(self.model, batch, args[0], partial(loss_func, args), count=True)

        # the schedule runs the backwards: each micro-batch's gradient goes to the fp32 buffer as it arrives
        hooks = [
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self.optimizer.accumulate(i))
            for i, p in enumerate(self.params)
        ]
        try:
            self._run_pipeline(self.model, forward_step, micro, forward_only=False)
        finally:
            for h in hooks:
                h.remove()
        # the last stage computed the losses: its metrics, probed rows and verdict are the step's on every stage
        state = [sums.sums, sums.maxes, sums.probe, finite]
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(state, src=last, group=self.groups.pp_group)
        sums.sums, sums.maxes, sums.probe = state[0], state[1], state[2]
        return state[3]

    def _logprobs(self, model, batch: TrainBatch, rows: torch.Tensor, grad: bool = False):
        if self.layout.pp == 1:
            return super()._logprobs(model, batch, rows, grad)
        assert not grad, "pipeline stages recompute log-probs without gradients only"
        T = batch.input_ids_BT.shape[1]
        out = torch.zeros(2, len(rows), T, dtype=torch.float32, device=self.device)  # log-probs, entropies
        zero = torch.zeros((), dtype=torch.int, device=self.device)
        parts = self._micro_batches(batch, rows)

        def keep(part: torch.Tensor, T_mb: int, outputs: tuple[torch.Tensor, torch.Tensor]):
            out[0, part.to(self.device), :T_mb] = outputs[0].float()
            out[1, part.to(self.device), :T_mb] = outputs[1].float()
            return outputs[0].new_zeros(()), zero, {}

        def forward_step(data: Iterator[torch.Tensor], _model):
            part = next(data)
            return self._stage_step(model, batch, rows[part], partial(keep, part))

        with torch.no_grad():
            self._run_pipeline(model, forward_step, parts, forward_only=True)
        dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(), group=self.groups.pp_group)
        return out[0], out[1]

    def _stage_step(
        self, model: ParallelRingLinear, batch: TrainBatch, rows: torch.Tensor, finish: Callable,
        count: bool = False,
    ):  # fmt: skip
        """One micro-batch through this stage, as the schedule's ``forward_step`` returns it: hidden states for
        the next stage, or on the last stage (log-probs, entropies) with ``finish(T_mb, outputs)`` as the loss
        function. ``count``: the training forward, whose routed tokens the expert-load counter counts."""
        ids_BT, tgt_BT, T_mb = self._inputs(batch, rows)
        with self._counting(batch, rows, T_mb) if count else contextlib.nullcontext():
            h = model.stage_forward(ids_BT)
        if not model.last_stage:
            return h, None
        return model.logprobs_from_hidden(h, tgt_BT), partial(finish, T_mb)

    def _run_pipeline(
        self, model: ParallelRingLinear, forward_step: Callable, micro: list[torch.Tensor], forward_only: bool
    ) -> None:
        """Megatron's pipeline schedule over ``micro`` (every stage passes the same list)."""
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=_ScheduledStage(model),
            num_microbatches=len(micro),
            seq_length=0,  # unused: with variable_seq_lengths each tensor's shape is sent ahead of it
            micro_batch_size=0,
            forward_only=forward_only,
        )

    def _micro_batches(self, batch: TrainBatch, local: torch.Tensor) -> list[torch.Tensor]:
        micro = super()._micro_batches(batch, local)
        if self.layout.ep == 1:
            return micro
        stats = torch.tensor([len(micro), -len(local)], device=self.device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        target, fewest_rows = int(stats[0]), -int(stats[1])
        if fewest_rows < target:
            raise ValueError(
                f"expert parallelism needs every data-parallel rank to run {target} micro-batch(es), but a rank "
                f"has only {fewest_rows} row(s) this step; use a larger batch, a larger micro_batch_size or "
                "fewer data-parallel ranks"
            )
        while len(micro) < target:
            i = max(range(len(micro)), key=lambda j: len(micro[j]))
            micro[i : i + 1] = list(micro[i].tensor_split(2))
        return micro

    def export_weight_buckets(self, max_bytes: int = 512 << 20) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors under HF names (CPU, the model's dtypes), in buckets of at most ``max_bytes`` (a
        tensor larger than that is a bucket of its own). Every rank must iterate (collectives); every rank
        gets the same buckets, so any rank can push them to rollout workers."""
        return weight_buckets(self._gathered(), max_bytes)

    def export_weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """The whole model at once (``TrainerBackend``); large models should stream ``export_weight_buckets``."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self.export_weight_buckets():
            out.update(bucket)
        return out, self._version

    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]]:
        return gather_full(self.model, self.layout, self.model.local_state())

    # Checkpoints: one model and one trainer file per distinct (tp, ep, pp) rank, through the one commit of
    # rlplat.train.checkpoint.save_checkpoint.

    def write_checkpoint(self, staging: Path) -> bool:
        """``Checkpointable``: rank 0 writes the layout and the model config, then the lowest global rank of
        each (tp, ep, pp) rank writes its shard of the model and of the trainer state. Every rank must call it
        (collectives); rank 0 commits."""
        lead = dist.get_rank() == 0
        if lead:
            empty_directory(staging)
            write_layout(staging, self.layout, {"precision": self.precision})
            (staging / "config.json").write_text(json.dumps(self.model.config.to_dict(), indent=2) + "\n")
        dist.barrier()  # the staging directory exists before anyone writes into it
        writer = self._writes_shard()
        state = self.state_dict(keep_optimizer=writer)  # a collective: gathers the optimizer's shards
        if writer:
            tag = shard_tag(self.tp_rank, self.ep_rank, self.pp_rank)
            local = {k: v.detach().contiguous().cpu() for k, v in self.model.local_state().items()}
            save_file(local, str(staging / f"model-{tag}.safetensors"), metadata={"format": "pt"})
            state.pop("model")
            if not self.config.checkpoint.save_optimizer:
                state["optimizer"] = None
            torch.save(state, staging / f"trainer-{tag}.pt")
        dist.barrier()  # every shard is written
        return lead

    def read_checkpoint(self, directory: Path) -> None:
        """``Checkpointable``: this rank's shard of a checkpoint saved under the same tp/ep/pp sizes."""
        check_checkpoint_layout(directory, self.layout)
        tag = shard_tag(self.tp_rank, self.ep_rank, self.pp_rank)
        # on the host: each rank then takes its shard of the optimizer state, not the whole of it on its device
        state = torch.load(directory / f"trainer-{tag}.pt", map_location="cpu", weights_only=True)
        if state["optimizer"] is None:
            raise ValueError(
                f"{directory} was saved without optimizer state (checkpoint.save_optimizer: false)"
            )
        # Trainer.load_state_dict loads the module strictly; Megatron's layers default their _extra_state
        state["model"] = load_file(str(directory / f"model-{tag}.safetensors"), device=str(self.device))
        self.load_state_dict(state)

    def barrier(self) -> None:
        dist.barrier()

    def _writes_shard(self) -> bool:
        """The lowest global rank holding this (tp, ep, pp rank) writes its files; replicas write nothing."""
        coords: list[Any] = [None] * dist.get_world_size()
        mine = (self.tp_rank, self.ep_rank, self.pp_rank)
        dist.all_gather_object(coords, mine)
        return coords.index(mine) == dist.get_rank()


class _ScheduledStage:
    """What Megatron's pipeline schedule asks of the model it runs: the parallel config (p2p dtype, variable
    shapes, loss scaling), the model type and ``set_input_tensor``. The forward itself is the trainer's
    ``forward_step``, which calls the stage directly."""

    model_type = ModelType.encoder_or_decoder

    def __init__(self, stage: ParallelRingLinear):
        self.config = stage.transformer_config
        self.set_input_tensor = stage.set_input_tensor


def rank_trainer(
    cfg, rank: int = 0, master_addr: str | None = None, master_port: int | None = None
) -> MegatronTrainer:
    """This rank's Megatron trainer for an ``ExperimentConfig``: ``layout.world`` processes (tensor × pipeline
    × data) call it with their rank and rank 0's address; each builds the policy from the same seed or
    checkpoint and keeps its shard. Every rank must then receive every call (train_step, compute_logprobs,
    export, checkpoints) with the same arguments: they are collectives."""
    from rlplat.engine.policy import build_policy
    from rlplat.models.config import RingLinearConfig
    from rlplat.models.presets import preset
    from rlplat.train.megatron.layout import layout_of

    world = layout_of(cfg.trainer).world
    model_cfg = (
        RingLinearConfig.from_json(Path(cfg.model.path) / "config.json")
        if cfg.model.path is not None
        else preset(cfg.model.preset, **cfg.model.overrides)
    )
    check_layout(model_cfg, cfg.trainer, precision=cfg.model.precision, world_size=world)
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    init_megatron(
        model_cfg, cfg.trainer, rank=rank, world_size=world, precision=cfg.model.precision,
        backend=cfg.trainer.dist_backend,
    )  # fmt: skip
    return MegatronTrainer(build_policy(cfg.model), cfg.algo, cfg.trainer, precision=cfg.model.precision)


def single_rank_trainer(cfg) -> MegatronTrainer:
    """The Megatron trainer of a one-rank layout (``rlplat run`` with one trainer actor): a one-process group,
    the whole model on one device, rank 0's address on this host."""
    from rlplat.train.dist import free_port
    from rlplat.train.megatron.layout import check_run

    check_run(cfg)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return rank_trainer(cfg)
