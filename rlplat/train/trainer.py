"""The trainer: one optimizer step per ``TrainBatch``, with the same model code and kernels as the rollout.

Legend: B sequences, T positions, N micro-batches. One ``train_step`` (every rank of a data-parallel group
runs it on the same global batch):

    rows  = drop bad samples (config) and zero-variance groups (algo.dynamic_sampling)
    adv   = advantages on the global batch (or the batch's own), KL folded into rewards if algo.kl.mode=reward
    local = this rank's slice of rows
    old   = rollout log-probs (algo.correction.use_rollout_logp_as_old) | batch.old_logp | recomputed
    mask  = response mask ∧ IcePop / sequence-rejection keep masks (old vs rollout log-probs)
    norm  = all_reduce_sum(global_normalizer(micro-batch masks))
    for each micro-batch: loss = aggregate(policy loss · TIS weight + β·KL + entropy term) / norm; backward
    all_reduce_sum(grads); refuse the step on a non-finite loss or gradient; clip; AdamW; expert-bias update

Deviations and choices, on purpose:
- Corrections (TIS, IcePop, MIS) compare pi_old with pi_rollout, both known before the first micro-batch, so
  the loss mask and therefore the global normaliser are exact. With ``use_rollout_logp_as_old`` they are
  identities, as they should be for an exact backend.
- Every precision trains with fp32 master weights: AdamW and gradient accumulation run in fp32, and the
  model weights (what the rollout gets from ``export_weights``) are the master weights rounded once per step.
  Masters and AdamW moments are sharded over data-parallel ranks (``rlplat.train.optim.ShardedAdamW``, the
  layout of Megatron's distributed optimizer); the updated weights do not depend on the number of ranks.
- The kernel mode defaults to the process-wide one, batch-invariant in RL, so ``compute_logprobs`` and the
  training forward give the rollout's log-probs bitwise. Its linear attention is a token-by-token recurrence:
  exact but slow for long sequences (autograd keeps every step). ``trainer.batch_invariant: false`` trains
  with the chunked kernels, faster, at the price of a small train–inference mismatch (use a correction).
- A NaN/inf loss or gradient raises ``NonFiniteError`` before anything is updated: weights, optimizer state,
  expert biases, step and version stay those of the last good step.
- One optimizer step per batch; PPO epochs or mini-batches are the caller's loop (pass ``old_logp_BT``
  from ``compute_logprobs`` so later mini-batches keep the same pi_old).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

import kernels
from rlplat.algos import advantages as adv_fns
from rlplat.algos import corrections, kl, metrics
from rlplat.algos.aggregation import aggregate_loss, global_normalizer
from rlplat.algos.config import AlgoConfig
from rlplat.algos.filtering import dynamic_sampling_mask
from rlplat.algos.losses import gspo_loss, lpo_loss, ppo_clip_loss
from rlplat.algos.validation import masked_values
from rlplat.models import RingLinearForCausalLM, precision_of, save_pretrained, to_precision
from rlplat.models.routing import RoutingRecorder, routing_differs
from rlplat.train.batch import TrainBatch
from rlplat.train.checkpoint import (
    HF_DIR,
    RNG_FILE,
    TRAINER_FILE,
    Checkpointable,
    empty_directory,
    rng_state,
    set_rng_state,
)
from rlplat.train.config import TrainerConfig
from rlplat.train.dist import DataParallel
from rlplat.train.experts import ExpertLoadCounter
from rlplat.train.optim import ShardedAdamW


def weight_buckets(
    named: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Groups named tensors, in order, into dicts of at most ``max_bytes`` (a larger tensor is a bucket alone)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket


class NonFiniteError(FloatingPointError):
    """The loss or the gradient of a step was NaN/inf; nothing was updated (keep the last good checkpoint)."""


@runtime_checkable
class TrainerBackend(Checkpointable, Protocol):
    """What the trainer actor calls, on every rank. The torch ``Trainer`` implements it, and so does the
    Megatron-core backend (``rlplat.train.megatron``), which exports full tensors under HF names too.
    Checkpoints go through ``rlplat.train.checkpoint.save_checkpoint`` / ``load_checkpoint``."""

    def train_step(self, batch: TrainBatch, probe: RowProbe | None = None) -> dict[str, float]: ...

    def compute_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def export_weights(self) -> tuple[dict[str, torch.Tensor], int]: ...

    def export_weight_buckets(self, max_bytes: int = ...) -> Iterator[dict[str, torch.Tensor]]: ...


_MICRO_SUMS = (
    "loss",
    "n_forward_tokens",
    "n_loss_tokens",
    "n_response_tokens",
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac_dual",
    "clip_frac",
    "approx_kl",
    "resp:entropy",
    "resp:mismatch_kl",
)


@dataclass
class RowProbe:
    """Per-token log-probs of some rows of a step's batch, taken from the step's own training forward (the
    weights before the update): what ``rollouts.jsonl`` compares with the rollout's, with no second forward.
    Pass one to ``train_step``; ``tokens[i]`` is then, over row ``rows[i]``'s response tokens, its
    ``train_logp``, ``rollout_logp`` and IcePop/rejection ``keep`` flags, or None when a filter dropped it."""

    rows: Sequence[int]
    tokens: list[dict[str, list] | None] = field(default_factory=list)


class _Sums:
    """Token-weighted metric sums, reduced over micro-batches and ranks in one all-reduce, and the probed
    rows (``RowProbe``), which ride along in the same all-reduce: each is filled by the one rank holding it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.probe_slots: dict[int, int] = {}  # row of the (filtered) batch → its slot in ``probe``
        # per slot and position: response mask, keep mask, train log-prob, rollout log-prob
        self.probe = torch.zeros(0, 4, 0, dtype=torch.float64)

    def add(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight

    def max(self, name: str, value: torch.Tensor | float) -> None:
        self.maxes[name] = max(self.maxes.get(name, float("-inf")), float(value))

    def watch(self, slots: dict[int, int], T: int) -> None:
        self.probe_slots = slots
        self.probe = torch.zeros(len(slots), 4, T, dtype=torch.float64)

    def add_probe(self, rows: torch.Tensor, mask_BT, keep_BT, logp_BT, rollout_BT) -> None:
        """Copy the watched ones of ``rows`` (batch rows of a micro-batch, in its order) into ``probe``."""
        for i, row in enumerate(rows.tolist()):
            slot = self.probe_slots.get(row)
            if slot is not None:
                T_mb = mask_BT.shape[1]
                for c, x in enumerate((mask_BT, keep_BT, logp_BT.detach(), rollout_BT)):
                    self.probe[slot, c, :T_mb] = x[i].to("cpu", torch.float64)

    def reduce(self, dp: DataParallel, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
        names, max_names = sorted(self.sums), sorted(self.maxes)
        s = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=device)
        s = torch.cat([s, self.probe.flatten().to(device)])
        m = torch.tensor([self.maxes[n] for n in max_names], dtype=torch.float64, device=device)
        dp.all_reduce(s, "sum")
        if max_names:
            dp.all_reduce(m, "max")
        self.probe = s[len(names) :].view_as(self.probe).cpu()
        return dict(zip(names, s[: len(names)].tolist(), strict=True)), dict(
            zip(max_names, m.tolist(), strict=True)
        )

    def fill(self, probe: RowProbe, batch_rows: list[int | None]) -> None:
        """``probe.tokens`` from the reduced ``probe`` tensor; ``batch_rows[i]``: row i's place after the filters."""
        probe.tokens = []
        for row in batch_rows:
            slot = None if row is None else self.probe_slots.get(row)
            if slot is None:
                probe.tokens.append(None)
                continue
            mask, keep, train, rollout = self.probe[slot]
            m = mask > 0
            probe.tokens.append(
                {
                    "train_logp": train[m].tolist(),
                    "rollout_logp": rollout[m].tolist(),
                    "keep": (keep[m] > 0).tolist(),
                }
            )


class Trainer:
    """Plain-PyTorch trainer of a ``RingLinearForCausalLM`` (the trainer actor wraps one per rank)."""

    # Whether the model's backward holds collectives across data-parallel ranks (expert all-to-alls): then a
    # rank whose micro-batch went non-finite still runs its backward, so the others' are not left waiting.
    _collective_backward = False
    _load_counter = ExpertLoadCounter  # counts tokens per expert in the model's MoE layers

    def __init__(
        self,
        model: RingLinearForCausalLM,
        algo: AlgoConfig | None = None,
        config: TrainerConfig | None = None,
        *,
        precision: str | None = None,
        dp: DataParallel | None = None,
    ):
        self.algo = algo or AlgoConfig()
        self.config = config or TrainerConfig()
        self.dp = dp or DataParallel()
        if self.config.lr_decay != "constant" and self.config.lr_decay_steps is None:
            raise ValueError(
                f"trainer.lr_decay {self.config.lr_decay!r} needs trainer.lr_decay_steps (rlplat run sets it to "
                "run.steps when it is null)"
            )
        if self.config.dp_world_size != self.dp.world_size:
            raise ValueError(
                f"trainer.dp_world_size is {self.config.dp_world_size} but this process group has "
                f"{self.dp.world_size} rank(s); start one trainer per rank"
            )
        if precision is not None:
            model = to_precision(model, precision)
        self.precision = precision_of(model)
        self.model = model.train()
        self.device = next(model.parameters()).device
        self.step = 0  # steps taken, skipped ones included (every group dropped): the lr schedule's clock
        self._version = 0  # weight updates: the policy version
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        for p in self.params:
            p.requires_grad_(True)
        # fp32 master weights and AdamW state, sharded over data-parallel ranks (rlplat.train.optim)
        cfg = self.config
        self.optimizer = ShardedAdamW(
            self.params, self.dp.shard_group, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
        self.reference = None
        if self.algo.kl.mode != "none":
            self.reference = copy.deepcopy(model).eval()
            self.reference.requires_grad_(False)
        self.expert_load = self._load_counter(model)
        self._routing: RoutingRecorder | None = None  # built on the first batch with rollout routing

    @property
    def version(self) -> int:
        """Weight version: the number of optimizer steps taken (0 = the initial weights)."""
        return self._version

    def train_step(self, batch: TrainBatch, probe: RowProbe | None = None) -> dict[str, float]:
        """One optimizer step on ``batch`` (the global batch; each rank trains on its slice). Returns metrics;
        fills ``probe`` with its rows' log-probs from the training forward."""
        started = time.perf_counter()
        with self._kernel_mode():
            out = self._train_step(batch.to(self.device), probe)
        out["time_s"] = time.perf_counter() - started
        out["tokens_per_s"] = out["tokens"] / out["time_s"] if out["time_s"] > 0 else 0.0
        return out

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Current-policy (log-prob, entropy) of every target, fp32 [B, T] (0 at unscored positions)."""
        with self._kernel_mode():
            rows = torch.arange(batch.batch_size)
            return self._logprobs(self.model, batch.to(self.device), rows)

    def export_weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """Named tensors for rollout workers (HF names, the model's dtypes, CPU copies) and their version."""
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return tensors, self._version

    def export_weight_buckets(self, max_bytes: int = 512 << 20) -> Iterator[dict[str, torch.Tensor]]:
        """``export_weights`` as a stream of buckets of at most ``max_bytes``: CPU copies are made one bucket
        at a time, so a large model is never copied whole."""
        named = ((k, v.detach().to("cpu", copy=True)) for k, v in self.model.state_dict().items())
        return weight_buckets(named, max_bytes)

    @property
    def keep_last(self) -> int:
        return self.config.checkpoint.keep_last

    def write_checkpoint(self, staging: Path) -> bool:
        """``Checkpointable``: rank 0 writes ``trainer.pt``, ``rng.pt`` and, on request, ``hf/``. Every rank
        must call it (the optimizer's shards are gathered first, so a checkpoint does not depend on the number
        of ranks)."""
        state = self.state_dict(keep_optimizer=self.dp.rank == 0)
        if self.dp.rank != 0:
            return False
        empty_directory(staging)
        if not self.config.checkpoint.save_optimizer:
            state["optimizer"] = None
        torch.save(state, staging / TRAINER_FILE)
        torch.save(rng_state(), staging / RNG_FILE)
        if self.config.checkpoint.export_hf:
            save_pretrained(self.model, staging / HF_DIR)
        return True

    def read_checkpoint(self, directory: Path) -> None:
        """``Checkpointable``: the state of ``trainer.pt`` and the random streams of ``rng.pt``."""
        if not (directory / TRAINER_FILE).exists():
            raise ValueError(
                f"{directory} has no {TRAINER_FILE}: it was not written by the torch trainer (a Megatron-backend "
                "checkpoint does not match this model's trainer); set trainer.backend to the one that wrote it, "
                "or start from its weights (python -m rlplat.train.megatron.convert to-hf)"
            )
        # on the host: each rank then takes its shard of the optimizer state, not the whole of it on its device
        state = torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=True)
        if state["optimizer"] is None:
            raise ValueError(
                f"{directory} was saved without optimizer state (checkpoint.save_optimizer: false)"
            )
        self.load_state_dict(state)
        set_rng_state(torch.load(directory / RNG_FILE, weights_only=True))

    def barrier(self) -> None:
        self.dp.barrier()

    def state_dict(self, keep_optimizer: bool = True) -> dict[str, Any]:
        """Everything a checkpoint holds. A collective under data parallelism (the optimizer's shards are
        gathered); ranks that write nothing pass ``keep_optimizer=False`` and get ``optimizer: None``."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(keep=keep_optimizer),
            "reference": self.reference.state_dict() if self.reference is not None else None,
            "step": self.step,
            "version": self._version,
            "precision": self.precision,
            "param_names": self.names,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["precision"] != self.precision:
            raise ValueError(
                f"checkpoint was trained in {state['precision']}, this trainer runs {self.precision}; "
                "set model.precision to match"
            )
        if state["param_names"] != self.names:
            raise ValueError("checkpoint parameters do not match this model (different preset or config?)")
        if (state["reference"] is None) != (self.reference is None):
            raise ValueError("checkpoint and trainer disagree on whether KL to a reference model is on")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])
        self.step, self._version = int(state["step"]), int(state["version"])

    def _kernel_mode(self):
        if self.config.batch_invariant is None:
            return contextlib.nullcontext()
        return kernels.kernel_mode(batch_invariant=self.config.batch_invariant)

    def _train_step(self, batch: TrainBatch, probe: RowProbe | None = None) -> dict[str, float]:
        algo, sums = self.algo, _Sums()
        info: dict[str, float] = {
            "policy_version": float(batch.policy_version),
            "staleness": float(self._version - batch.policy_version),
            "empty_responses": float((~batch.response_mask_BT.any(dim=1)).sum()),
        }
        batch, keep_B = self._filter(batch, info)
        kept = int(keep_B.sum())
        # each probed row's place in the filtered batch (None: dropped)
        place_B = keep_B.long().cumsum(0) - 1
        probe_rows = [
            int(place_B[r]) if keep_B[r] else None for r in (probe.rows if probe is not None else ())
        ]
        if batch is None:
            # every group was dropped: nothing to learn from, and no rank communicates (all saw the same). The
            # step still counts (the lr schedule and checkpoint names follow the RL steps); the weights and
            # their version do not change.
            if probe is not None:
                sums.fill(probe, [None] * len(probe_rows))
            lr = self._lr()
            self.step += 1
            return {**info, "skipped": 1.0, "tokens": 0.0, "lr": lr, "version": float(self._version)}
        # one slot per distinct kept row, numbered densely: the probe tensor has one row per slot
        kept_rows = dict.fromkeys(r for r in probe_rows if r is not None)
        sums.watch({r: i for i, r in enumerate(kept_rows)}, batch.input_ids_BT.shape[1])
        adv_BT = self._advantages(batch, info)
        local = self.dp.shard(batch.batch_size)
        mask_BT = batch.response_mask_BT[local]
        rollout_BT = batch.rollout_logp_BT[local].float()
        old_BT = self._old_logp(batch, local)
        loss_mask_BT, weights_BT = self._corrections(old_BT, rollout_BT, mask_BT, sums)
        ref_BT = None
        if algo.kl.mode == "loss":
            ref_BT, _ = self._logprobs(self.reference, batch, local, grad=False)
        micro = self._micro_batches(batch, local)
        normalizer = global_normalizer(
            [loss_mask_BT[rows] for rows in micro] or [loss_mask_BT[:0]],
            algo.loss_agg_mode,
            max_len=algo.loss_agg_max_len,
        ).to(self.device)
        self.dp.all_reduce(normalizer, "sum")

        self.expert_load.reset()
        for name in _MICRO_SUMS:  # every rank reduces the same names, even one without rows
            sums.add(name, 0.0)
        sums.max("max_abs_dlogp", 0.0)
        if batch.rollout_routes_BTLk is not None:  # the same on every rank: they share the global batch
            sums.add("resp:routing_disagreement", 0.0)

        def micro_args(rows: torch.Tensor) -> tuple:
            """What ``_micro_loss`` takes of one micro-batch (positions ``rows`` into ``local``)."""
            return (
                local[rows], adv_BT, old_BT[rows], rollout_BT[rows], loss_mask_BT[rows], mask_BT[rows],
                None if weights_BT is None else weights_BT[rows], None if ref_BT is None else ref_BT[rows],
                normalizer, sums,
            )  # fmt: skip

        finite = self._backward_micro_batches(batch, micro, micro_args, sums)
        bad_loss = torch.tensor(0.0 if finite else 1.0, device=self.device)
        self.dp.all_reduce(bad_loss, "max")
        if bad_loss.item() > 0:
            self.optimizer.zero_grad()
            raise NonFiniteError(
                f"step {self.step}: the loss is NaN/inf on some micro-batch; the step was refused and weights, "
                "optimizer and expert biases are unchanged (resume from the last good checkpoint if it repeats)"
            )
        self.dp.all_reduce_grads(self.optimizer)
        grads = self.optimizer.grads()
        grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad()
            raise NonFiniteError(
                f"step {self.step}: the gradient norm is {grad_norm.item()}; the step was refused and weights, "
                "optimizer and expert biases are unchanged (resume from the last good checkpoint if it repeats)"
            )
        if self.config.grad_clip is not None:
            self.optimizer.scale_grads((self.config.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
        lr = self._lr()
        self.optimizer.step(lr)
        self.dp.reduce_expert_counts(list(self.expert_load.counts.values()))
        if self.config.expert_bias_update_rate > 0:
            self.expert_load.apply_update(self.config.expert_bias_update_rate)
        self.step += 1
        self._version += 1

        total, maxes = sums.reduce(self.dp, self.device)
        if probe is not None:
            sums.fill(probe, probe_rows)
        out = {**info, "skipped": 0.0, "kept_samples": float(kept), "lr": lr, "version": float(self._version)}
        out["grad_norm"] = grad_norm.item()
        out["loss"] = total.pop("loss", 0.0)
        n_loss, n_resp = total.pop("n_loss_tokens", 0.0), total.pop("n_response_tokens", 0.0)
        out["tokens"] = total.pop("n_forward_tokens", 0.0)
        out["loss_tokens"], out["response_tokens"] = n_loss, n_resp
        for name, value in total.items():
            denom = n_resp if name.startswith("resp:") else n_loss
            out[name.removeprefix("resp:")] = value / denom if denom > 0 else 0.0
        out.update(maxes)
        out["expert_load_imbalance"] = self.expert_load.imbalance()
        return out

    def _filter(self, batch: TrainBatch, info: dict[str, float]) -> tuple[TrainBatch | None, torch.Tensor]:
        """The batch without bad samples' groups and (``algo.dynamic_sampling``) zero-variance groups, and
        which rows it kept (bool [B]); None when nothing is left to train on."""
        n = batch.group_size
        keep_B = torch.ones(batch.batch_size, dtype=torch.bool)
        bad_B = batch.bad_rows().cpu()
        if bad_B.any():
            rows = bad_B.nonzero()[:, 0].tolist()
            if self.config.bad_samples == "error":
                raise ValueError(
                    f"TrainBatch rows {rows[:20]} hold NaN/inf rewards, advantages or log-probs at response "
                    "tokens; repair or drop them, or set trainer.bad_samples: skip to drop their groups"
                )
            keep_B &= ~bad_B.view(-1, n).any(dim=1).repeat_interleave(n)
        info["bad_samples_dropped"] = float((~keep_B).sum())
        if self.algo.dynamic_sampling:
            correctness = batch.correctness_B if batch.correctness_B is not None else batch.rewards_B
            if correctness is None:
                raise ValueError(
                    "algo.dynamic_sampling needs TrainBatch.correctness_B (or rewards_B) to find "
                    "zero-variance groups"
                )
            c = torch.where(keep_B, correctness.detach().cpu().float(), 0.0)
            varied = dynamic_sampling_mask(c, n)
            info["dynamic_sampling_dropped"] = float((keep_B & ~varied).sum())
            keep_B &= varied
        if keep_B.all():
            return batch, keep_B
        rows = keep_B.nonzero()[:, 0]
        if len(rows) == 0 or not batch.response_mask_BT[rows.to(batch.response_mask_BT.device)].any():
            return None, torch.zeros_like(keep_B)
        return batch.select(rows), keep_B

    def _advantages(self, batch: TrainBatch, info: dict[str, float]) -> torch.Tensor:
        algo, mask_BT = self.algo, batch.response_mask_BT
        if batch.advantages_BT is not None:
            return masked_values("advantages_BT", batch.advantages_BT.float(), mask_BT)
        rewards_B = batch.rewards_B.float()
        kl_BT = None
        if algo.kl.mode == "reward":
            ref_BT, _ = self._logprobs(self.reference, batch, torch.arange(batch.batch_size), grad=False)
            cur_BT, _ = self._logprobs(self.model, batch, torch.arange(batch.batch_size), grad=False)
            kl_BT = kl.kl_estimate(cur_BT, ref_BT, mask_BT, algo.kl.estimator)
            info["kl_in_reward"] = float(metrics.masked_mean(kl_BT, mask_BT))
        if algo.advantage_estimator == "reinforce_pp":
            token_rewards_BT = adv_fns.rewards_at_last_token(rewards_B, mask_BT)
            if kl_BT is not None:
                token_rewards_BT = kl.fold_kl_into_token_rewards(
                    token_rewards_BT, kl_BT, mask_BT, algo.kl.coef
                )
            return adv_fns.reinforce_pp_advantages(token_rewards_BT, mask_BT, eps=algo.adv_eps)
        if kl_BT is not None:
            rewards_B = kl.fold_kl_into_sequence_rewards(rewards_B, kl_BT, mask_BT, algo.kl.coef)
        if batch.group_size < 2:
            raise ValueError(
                f"{algo.advantage_estimator} advantages need group_size >= 2 responses per prompt, got "
                f"{batch.group_size} (after dropping samples); pass advantages_BT or use reinforce_pp"
            )
        if algo.advantage_estimator == "grpo":
            return adv_fns.grpo_advantages(
                rewards_B, mask_BT, batch.group_size, eps=algo.adv_eps, norm_by_std=algo.norm_adv_by_std
            )
        return adv_fns.rloo_advantages(rewards_B, mask_BT, batch.group_size)

    def _old_logp(self, batch: TrainBatch, local: torch.Tensor) -> torch.Tensor:
        if self.algo.correction.use_rollout_logp_as_old:
            return batch.rollout_logp_BT[local].float()
        if batch.old_logp_BT is not None:
            return batch.old_logp_BT[local].float()
        recomputed, _ = self._logprobs(self.model, batch, local, grad=False)
        return recomputed

    def _corrections(self, old_BT, rollout_BT, mask_BT, sums: _Sums):
        c = self.algo.correction
        weights_BT = None
        loss_mask_BT = mask_BT
        n = float(mask_BT.sum())
        if c.method == "token_tis":
            weights_BT = corrections.token_tis_weights(old_BT, rollout_BT, mask_BT, cap=c.tis_cap)
        elif c.method == "sequence_tis":
            weights_BT = corrections.sequence_tis_weights(old_BT, rollout_BT, mask_BT, cap=c.tis_cap)
        elif c.method == "icepop":
            pop = corrections.icepop_mask(
                old_BT, rollout_BT, mask_BT, alpha=c.icepop_alpha, beta=c.icepop_beta
            )
            loss_mask_BT = pop.keep_BT
            sums.add("resp:icepop_masked_fraction", metrics.icepop_masked_fraction(pop.keep_BT, mask_BT), n)
        elif c.method == "sequence_mis":
            rej = corrections.sequence_rejection_mask(
                old_BT, rollout_BT, mask_BT, low=c.mis_low, high=c.mis_high, ratio=c.mis_ratio
            )
            loss_mask_BT = rej.keep_BT
            sums.add("resp:mis_rejected_token_fraction", 1.0 - float(rej.keep_BT.sum()) / max(n, 1.0), n)
        if weights_BT is not None:
            sums.add("resp:tis_weight_mean", metrics.masked_mean(weights_BT, mask_BT), n)
        return loss_mask_BT, weights_BT

    def _micro_batches(self, batch: TrainBatch, local: torch.Tensor) -> list[torch.Tensor]:
        """Positions into ``local`` per micro-batch: fixed rows, or rows packed under a padded-token budget."""
        cfg = self.config
        if cfg.micro_batch_tokens is None:
            return list(torch.arange(len(local)).split(cfg.micro_batch_size))
        lengths = self._forward_lengths(batch, local).tolist()
        out, current, longest = [], [], 0
        for i, n in enumerate(lengths):
            longest_if = max(longest, n)
            if current and longest_if * (len(current) + 1) > cfg.micro_batch_tokens:
                out.append(torch.tensor(current))
                current, longest_if = [], n
            current.append(i)
            longest = longest_if
        if current:
            out.append(torch.tensor(current))
        return out

    @staticmethod
    def _forward_lengths(batch: TrainBatch, rows: torch.Tensor) -> torch.Tensor:
        """Input positions each row needs: up to its last scored target (>= 1 so a forward is well-formed)."""
        return (batch.lengths_B[rows.to(batch.lengths_B.device)] - 1).clamp_min(1).cpu()

    def _inputs(self, batch: TrainBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input ids, targets) [len(rows), T_mb] on the device over the rows' needed prefix, and T_mb."""
        T_mb = int(self._forward_lengths(batch, rows).max())
        dev_rows = rows.to(batch.input_ids_BT.device)
        ids_BT = batch.input_ids_BT[dev_rows, :T_mb].long().to(self.device)
        return ids_BT, batch.targets_BT[dev_rows, :T_mb].to(self.device), T_mb

    def _forward(self, model: nn.Module, batch: TrainBatch, rows: torch.Tensor, count: bool = False):
        """(logp, entropy) [len(rows), T_mb] over the rows' needed prefix, and that prefix length."""
        ids_BT, tgt_BT, T_mb = self._inputs(batch, rows)
        if not count:
            logp_BT, ent_BT = model.token_logprobs(ids_BT, tgt_BT)
            return logp_BT, ent_BT, T_mb
        with self._counting(batch, rows, T_mb):
            logp_BT, ent_BT = model.token_logprobs(ids_BT, tgt_BT)
        return logp_BT, ent_BT, T_mb

    def _counting(self, batch: TrainBatch, rows: torch.Tensor, T_mb: int):
        """Count the routed real tokens (each row's needed prefix) of a training forward of ``rows``."""
        valid_BT = torch.arange(T_mb)[None, :] < self._forward_lengths(batch, rows)[:, None]
        return self.expert_load.counting(valid_BT.to(self.device))

    def _logprobs(self, model, batch: TrainBatch, rows: torch.Tensor, grad: bool = False):
        """No-grad (logp, entropy) [len(rows), T] in fp32, micro-batched; 0 beyond each row's prefix."""
        T = batch.input_ids_BT.shape[1]
        logp = torch.zeros(len(rows), T, dtype=torch.float32, device=self.device)
        ent = torch.zeros_like(logp)
        with torch.set_grad_enabled(grad):
            for part in self._micro_batches(batch, rows):
                lp, en, T_mb = self._forward(model, batch, rows[part])
                logp[part.to(self.device), :T_mb] = lp.float()
                ent[part.to(self.device), :T_mb] = en.float()
        return logp, ent

    def _backward_micro_batches(
        self, batch: TrainBatch, micro: list[torch.Tensor], micro_args, sums: _Sums
    ) -> bool:
        """Forward and backward every micro-batch, accumulating fp32 master gradients; False if some loss was
        NaN/inf (its backward is skipped). ``micro_args(rows)`` gives ``_micro_loss``'s arguments."""
        finite = True
        record = batch.rollout_routes_BTLk is not None
        if record and self._routing is None:
            self._routing = RoutingRecorder(self.model)
        for rows in micro:
            args = micro_args(rows)
            with self._routing.recording() if record else contextlib.nullcontext():  # type: ignore[union-attr]
                logp_full, ent_full, T_mb = self._forward(self.model, batch, args[0], count=True)
            if record:
                self._routing_disagreement(batch, args[0], args[5], T_mb, sums)
            loss = self._micro_loss(batch, logp_full, ent_full, T_mb, *args)
            if loss is None:
                finite = False
                if not self._collective_backward:
                    continue
                loss = logp_full.sum() * 0.0  # the step is refused after; the backward only pairs up
            loss.backward()
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    self.optimizer.accumulate(i)
        return finite

    def _routing_disagreement(
        self, batch: TrainBatch, rows: torch.Tensor, mask_BT: torch.Tensor, T_mb: int, sums: _Sums
    ) -> None:
        """Share of (response token, MoE layer) pairs whose expert set in this training forward differs from
        the rollout's, token-weighted into ``resp:routing_disagreement``."""
        assert self._routing is not None
        L, k = self._routing.take_shape()
        train_BTLk = self._routing.take(len(rows) * T_mb).view(len(rows), T_mb, L, k)
        m_BT = mask_BT[:, :T_mb].to(train_BTLk.device)
        roll = batch.rollout_routes_BTLk[rows.to(batch.rollout_routes_BTLk.device)][:, :T_mb]  # type: ignore[index]
        n = float(m_BT.sum())
        if n and L:
            differs = routing_differs(train_BTLk[m_BT], roll.to(train_BTLk.device)[m_BT])
            sums.add("resp:routing_disagreement", differs.float().mean(), n)

    def _micro_loss(
        self, batch, logp_full, ent_full, T_mb, rows, adv_BT, old_BT, rollout_BT, loss_mask_BT, mask_BT,
        weights_BT, ref_BT, normalizer, sums: _Sums,
    ) -> torch.Tensor | None:  # fmt: skip
        """One micro-batch's share of the step's loss from its log-probs and entropies, with its metrics in
        ``sums``; None if the model's outputs or the loss are NaN/inf."""
        algo = self.algo
        dev = logp_full.device
        sl = slice(0, T_mb)
        lm_BT, m_BT = loss_mask_BT[:, sl].to(dev), mask_BT[:, sl].to(dev)
        old, roll = old_BT[:, sl].to(dev), rollout_BT[:, sl].to(dev)
        adv = adv_BT[rows.to(adv_BT.device)][:, sl].to(dev)
        if not (torch.isfinite(logp_full[m_BT]).all() and torch.isfinite(ent_full[m_BT]).all()):
            sums.add("n_forward_tokens", float(self._forward_lengths(batch, rows).sum()))
            return None  # the model produced NaN/inf: refuse the step (see _train_step)
        clip = algo.clip()
        kwargs = dict(clip_low=clip.clip_low, clip_high=clip.clip_high, dual_clip=clip.dual_clip)
        if algo.policy_loss == "ppo":
            out = ppo_clip_loss(logp_full, old, adv, lm_BT, **kwargs)
        elif algo.policy_loss == "gspo":
            out = gspo_loss(logp_full, old, adv, lm_BT, **kwargs)
        else:
            if batch.sentence_ids_BT is None:
                raise ValueError(
                    "algo.policy_loss 'lpo' needs TrainBatch.sentence_ids_BT (rlplat.algos.sentences)"
                )
            sent = batch.sentence_ids_BT[rows.to(batch.sentence_ids_BT.device)][:, sl].to(dev)
            out = lpo_loss(logp_full, old, adv, lm_BT, sent, **kwargs)
        sums.add("n_forward_tokens", float(self._forward_lengths(batch, rows).sum()))
        n_loss, n_resp = float(lm_BT.sum()), float(m_BT.sum())
        sums.add("n_loss_tokens", n_loss)
        sums.add("n_response_tokens", n_resp)
        loss_BT = out.loss_BT
        if weights_BT is not None:
            loss_BT = loss_BT * weights_BT[:, sl].to(dev)
        if ref_BT is not None:
            ref = ref_BT[:, sl].to(dev)
            loss_BT = loss_BT + algo.kl.coef * kl.kl_estimate(logp_full, ref, lm_BT, algo.kl.estimator)
            sums.add("kl_to_ref", metrics.kl_to_ref(logp_full, ref, lm_BT, algo.kl.estimator), n_loss)
        if algo.entropy_coef > 0:
            loss_BT = loss_BT + kl.entropy_bonus(ent_full, lm_BT, algo.entropy_coef)
        loss = aggregate_loss(loss_BT, lm_BT, algo.loss_agg_mode, normalizer)
        if not torch.isfinite(loss):
            return None
        sums.add("loss", loss.detach())
        for name, value in metrics.clip_fractions(out, lm_BT).items():
            sums.add(name, value, n_loss)
        sums.add("approx_kl", metrics.approx_kl(logp_full.detach(), old, lm_BT), n_loss)
        sums.add("resp:entropy", metrics.entropy_mean(ent_full.detach(), m_BT), n_resp)
        mm = metrics.mismatch_metrics(logp_full.detach(), roll, m_BT)
        sums.add("resp:mismatch_kl", mm["mismatch_kl"], n_resp)
        sums.max("max_abs_dlogp", mm["max_abs_dlogp"])
        sums.add_probe(rows, m_BT, lm_BT, logp_full, roll)
        return loss

    def _lr(self) -> float:
        return scheduled_lr(self.config, self.step + 1)  # this step's number, from 1


def scheduled_lr(cfg: TrainerConfig, k: int) -> float:
    """The learning rate of RL step ``k`` (from 1) under ``cfg``'s warm-up and decay (``lr_decay_steps`` set)."""
    if k <= cfg.lr_warmup_steps:
        return cfg.lr * k / cfg.lr_warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    # progress through the decay: 0 at the end of the warm-up, 1 at lr_decay_steps and after
    t = min(1.0, (k - cfg.lr_warmup_steps) / (cfg.lr_decay_steps - cfg.lr_warmup_steps))
    shape = 1.0 - t if cfg.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr * (cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * shape)
