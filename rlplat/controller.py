"""The RL loop: prompts → rollouts → rewards → advantages → train → weight push → metrics → checkpoint.

Sync mode (default): every step samples with the weights of the previous optimizer step (policy version =
step), so with the native engine in batch-invariant mode the rollout log-probs ARE the trainer's π_old,
bitwise; `mismatch/*` metrics show it (max |Δlogp| = 0). Async mode (``run.mode: async``): a producer
thread samples ahead, at most ``run.max_staleness`` versions, and the samples reach the loop through the
Redis experience stream; see ``rlplat.async_rollout`` for how nothing is lost or trained twice.

Before RL, a short supervised warm start (``run.warm_start_steps``) teaches the format of the answers on the
training prompts' reference answers. It goes through the trainer's own RL step with advantages of 1 and
π_old = π, whose gradient is the NLL gradient, so there is one optimizer and one code path. The KL reference
(when on) is then reset to the warm-started policy.

Faults: a rollout or reward worker that dies is replaced (``workers.max_restarts``); the replacement gets
the current weights and the same prompts again, so each step's prompts are scored exactly once
(`prompts/scored` in metrics.jsonl counts them). A trainer that dies is replaced from the latest
checkpoint, and the steps after it are trained again on the same samples: regenerated in sync mode (a
step's prompts and sampling seeds are functions of its index), read back from the stream's pending
entries in async mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from actors.trainer import TrainerWorker
from rewards.api import Sample as RewardSample
from rlplat.async_rollout import AsyncRollout
from rlplat.buffer import ExperienceStream
from rlplat.config import ExperimentConfig
from rlplat.data.prompts import PromptItem, load_prompts, step_prompts
from rlplat.data.tokenizers import TextTokenizer
from rlplat.runlog import RunLog, mismatch_summary
from rlplat.train.batch import TrainBatch
from rlplat.train.checkpoint import latest_checkpoint

CHECKPOINTS = "checkpoints"


@dataclass
class Pool:
    """The actors of one role; a dead actor is replaced and its shard of work issued again."""

    name: str
    make: Callable[[], Any]
    size: int
    max_restarts: int
    on_restart: Callable[[Any], None] = lambda actor: None
    actors: list = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.actors = [self.make() for _ in range(self.size)]

    def map(self, method: str, shards: list[tuple]) -> list[Any]:
        """Call ``method(*shard)`` on actor i for shard i (i < size); results in shard order."""
        results: list[Any] = [None] * len(shards)
        pending = dict(enumerate(shards))
        while pending:
            refs = {
                i: getattr(self.actors[i % self.size], method).remote(*args) for i, args in pending.items()
            }
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref)
                    del pending[i]
                except ray.exceptions.RayActorError:
                    self._replace(i % self.size)
        return results

    def _replace(self, index: int) -> None:
        if self.restarts >= self.max_restarts:
            raise RuntimeError(
                f"{self.name} worker {index} died and workers.max_restarts={self.max_restarts} is used up"
            )
        self.restarts += 1
        self.actors[index] = self.make()
        self.on_restart(self.actors[index])


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Rank 0's address for torch.distributed, found on the node where rank 0 will run."""
    from rlplat.train.dist import free_port

    return ray.util.get_node_ip_address(), free_port()


class TrainerGroup:
    """The trainer's ranks, one actor each, gang-placed in a placement group (PACK: one node when they fit).
    Every call goes to every rank (they run the step's collectives together); rank 0 answers, since all ranks
    return the same results and rank 0 alone writes checkpoints."""

    def __init__(self, make: Callable[[int, str | None, int | None, Any], Any], size: int, resources: dict):
        self.pg, addr, port = None, None, None
        placements: list[Any] = [None] * size  # one rank: Ray places it like any actor
        if size > 1:
            bundle = {
                k: v for k, v in {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]}.items() if v
            }
            self.pg = placement_group([bundle] * size, strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=300)
            except ray.exceptions.GetTimeoutError as err:
                raise RuntimeError(
                    f"Ray could not place {size} trainer ranks of {bundle} in 300 s; lower workers.trainer.*"
                ) from err
            placements = [PlacementGroupSchedulingStrategy(self.pg, i) for i in range(size)]
            addr, port = ray.get(_rendezvous.options(scheduling_strategy=placements[0]).remote())
        self.actors = [make(i, addr, port, placements[i]) for i in range(size)]

    def call(self, method: str, *args: Any) -> Any:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        pending = list(refs)
        while pending:  # as they finish: a dead rank raises at once, while its peers wait in a collective
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
        return ray.get(refs[0])

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)


def shard(items: list, n: int) -> list[list[int]]:
    """Indices of ``items`` split into ≤ n contiguous, non-empty shards."""
    size = -(-len(items) // n)
    return [list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size)]


class Controller:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, tokenizer_dir: str | None):
        self.cfg, self.run_dir = cfg, run_dir
        self.tokenizer = TextTokenizer.from_dir(tokenizer_dir or cfg.model.path)
        self.train_items, self.eval_items = load_prompts(cfg.data, cfg.run.seed)
        w, as_dict = cfg.workers, cfg.model_dump(mode="json")
        opts = lambda r: {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
        self.make_trainer = lambda: TrainerGroup(
            lambda rank, addr, port, placement: (
                ray.remote(TrainerWorker)
                .options(**opts(w.trainer), scheduling_strategy=placement)
                .remote(as_dict, w.trainer.threads, rank, addr, port)
            ),
            w.trainer.num,
            opts(w.trainer),
        )
        self.trainer, self.trainer_restarts = self.make_trainer(), 0
        self.weight_refs, self.version = [], 0
        # The rollout and reward pools are used by the loop and, in async mode, by the producer thread.
        self.workers_lock = threading.RLock()
        self.rollout = Pool(
            "rollout",
            lambda: (
                ray.remote(RolloutWorker)
                .options(**opts(w.rollout))
                .remote(as_dict, tokenizer_dir, w.rollout.threads)
            ),
            w.rollout.num,
            w.max_restarts,
            self._send_weights,
        )
        self.rewards = Pool(
            "reward",
            lambda: ray.remote(RewardWorker).options(**opts(w.reward)).remote(cfg.rewards.model_dump()),
            w.reward.num,
            w.max_restarts,
        )
        self.log = RunLog(run_dir, wandb=cfg.wandb, config=as_dict)
        self._encoded: dict[str, list[int]] = {}
        self.source: AsyncRollout | None = None

    # -- the loop: one screen -------------------------------------------------------------------------------
    def run(
        self, start_step: int, should_stop: Callable[[], bool], on_step: Callable[[int, dict], None]
    ) -> int:
        cfg, step = self.cfg, start_step
        if cfg.run.mode == "async":
            self.source = self.start_async(start_step)
        while step < cfg.run.steps:
            t0 = time.perf_counter()
            prompts = step_prompts(self.train_items, step, cfg.data.prompts_per_step, cfg.run.seed)
            if self.source is None:  # sync: rollout and reward workers sample this step now
                groups, entry_ids = self.sample(step)[0], []
            else:  # async: the producer sampled it ahead, with weights ≤ max_staleness versions old
                groups, entry_ids = self.source.take(step)
            t1 = time.perf_counter()
            batch, info = self.build_batch(prompts, groups)  # advantages: trainer
            try:
                logged = self.trainer_logprobs(batch, cfg.run.rollouts_logged)  # π_old of logged rows
                train = self.trainer.call("train_step", batch)  # trainer worker
            except ray.exceptions.RayActorError:
                step = self.replace_trainer()  # from the latest checkpoint; its steps are trained again
                continue
            t2 = time.perf_counter()
            self.push_weights()  # new policy version
            if self.source is not None:
                self.source.trained(step + 1, entry_ids)
            t3 = time.perf_counter()
            metrics = {**info, **{f"train/{k}": v for k, v in train.items()}, **self.key_metrics(train, info)}
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                metrics.update(self.evaluate())
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                self.checkpoint(step)
            metrics.update(self.step_metrics(groups, info, t0, t1, t2, t3))
            # metrics.jsonl counts optimizer updates: line k is the state after k RL steps (0: warm start)
            self.log.log_metrics(step + 1, metrics)
            self.log.log_rollouts(step + 1, self.rollout_records(prompts, groups, batch, logged))
            self.log.write_dashboard()
            on_step(step, metrics)
            step += 1
            if should_stop() and step < cfg.run.steps:
                self.checkpoint(step - 1)
                return step
        return cfg.run.steps

    # -- the pieces -------------------------------------------------------------------------------------------
    def encode(self, prompts: list[PromptItem]) -> list[list[int]]:
        """Prompt token ids, memoised by prompt id: each step needs them for rollout and again for the batch."""
        for p in prompts:
            if p.id not in self._encoded:
                text = self.cfg.data.prompt_template.format(question=p.question)
                chat = [{"role": "user", "content": text}] if self.cfg.data.use_chat_template else text
                self._encoded[p.id] = self.tokenizer.encode_prompt(chat)
        return [self._encoded[p.id] for p in prompts]

    def sample(self, step: int) -> tuple[list[list[dict]], int]:
        """Rollout and reward for one step's prompts: groups of scored samples as plain (JSON-able) dicts,
        and the policy version that generated them."""
        prompts = step_prompts(self.train_items, step, self.cfg.data.prompts_per_step, self.cfg.run.seed)
        with self.workers_lock:
            t0 = time.perf_counter()
            groups = self.generate(prompts, step, self.cfg.rollout.sampling.model_dump())
            t1 = time.perf_counter()
            scored = self.score(prompts, groups)
            t2 = time.perf_counter()
        records = [
            [
                {
                    "step": step,
                    "prompt": i,
                    "sample": j,
                    "tokens": s["tokens"].tolist(),
                    "logprobs": np.asarray(
                        s["logprobs"], np.float32
                    ).tolist(),  # float32→float→float32: exact
                    "text": s["text"],
                    "version": s["version"],
                    "score": x.score,
                    "correct": self.is_correct(x),
                    "reward_error": bool(x.errors),
                    "rollout_s": t1 - t0,
                    "reward_s": t2 - t1,
                }
                for j, (s, x) in enumerate(zip(g, xs, strict=True))
            ]
            for i, (g, xs) in enumerate(zip(groups, scored, strict=True))
        ]
        return records, groups[0][0]["version"]

    def generate(self, prompts: list[PromptItem], step: int, sampling: dict) -> list[list[dict]]:
        ids = self.encode(prompts)
        indices = [step * len(prompts) + i for i in range(len(prompts))]  # seeds: same prompt, same samples
        if sampling.get("seed") is None:  # a run is reproducible from run.seed unless sampling.seed is set
            sampling = {**sampling, "seed": self.cfg.run.seed}
        shards = shard(prompts, self.rollout.size)
        out = self.rollout.map(
            "generate", [([ids[i] for i in s], [indices[i] for i in s], sampling) for s in shards]
        )
        return [group for part in out for group in part]

    def score(self, prompts: list[PromptItem], groups: list[list[dict]]) -> list[list[Any]]:
        samples = [
            [
                RewardSample(
                    prompt=p.question,
                    response=s["text"],
                    response_tokens=s["tokens"].tolist(),
                    label=p.answer,
                    metadata={"group_id": p.id},
                )
                for s in g
            ]
            for p, g in zip(prompts, groups)
        ]
        shards = shard(samples, self.rewards.size)
        out = self.rewards.map("score", [([x for i in s for x in samples[i]],) for s in shards])
        flat = [r for part in out for r in part]
        n = [len(g) for g in groups]
        return [flat[sum(n[:i]) : sum(n[: i + 1])] for i in range(len(groups))]

    def build_batch(self, prompts: list[PromptItem], groups: list[list[dict]]) -> tuple[TrainBatch, dict]:
        ids = self.encode(prompts)
        rows = [(ids[i], s) for i, g in enumerate(groups) for s in g]
        T = max(len(p) + len(s["tokens"]) for p, s in rows)
        B = len(rows)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        rollout_logp = torch.zeros(B, T)
        for b, (p, s) in enumerate(rows):
            r = torch.tensor(s["tokens"], dtype=torch.long)
            input_ids[b, : len(p)], input_ids[b, len(p) : len(p) + len(r)] = torch.tensor(p), r
            mask[b, len(p) - 1 : len(p) - 1 + len(r)] = True  # position t predicts token t + 1
            rollout_logp[b, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(s["logprobs"])
        rewards = torch.tensor([s["score"] for _, s in rows], dtype=torch.float32)
        correct = torch.tensor([float(s["correct"]) for _, s in rows])
        versions = [s["version"] for _, s in rows]
        batch = TrainBatch(
            input_ids,
            mask,
            rollout_logp,
            group_size=len(groups[0]),
            rewards_B=rewards,
            correctness_B=correct,
            policy_version=min(versions),
        )
        info = {
            "prompts/issued": len(prompts),
            "prompts/scored": len(groups),
            "samples/scored": B,
            "samples/staleness_max": self.version - min(versions),
            "reward/mean": rewards.mean().item(),
            "accuracy/train": correct.mean().item(),
            "response/length_mean": mask.sum(1).float().mean().item(),
            "response/tokens": mask.sum().item(),
            "reward/errors": sum(s["reward_error"] for _, s in rows),
        }
        return batch, info

    @staticmethod
    def is_correct(scored) -> bool:
        verdicts = [r.verdict for r in scored.components.values() if r.verdict is not None]
        return bool(verdicts) and all(v == "correct" for v in verdicts)

    def key_metrics(self, train: dict, info: dict) -> dict[str, float]:
        """The dashboard's canonical names for what the trainer reports."""
        names = {
            "mismatch/max_abs_dlogp": "max_abs_dlogp",
            "mismatch/kl": "mismatch_kl",
            "kl/ref": "kl_to_ref",
            "entropy/mean": "entropy",
            "icepop/masked_fraction": "icepop_masked_fraction",
            "throughput/train_tokens_per_s": "tokens_per_s",
        }
        return {k: train[v] for k, v in names.items() if v in train}

    def step_metrics(self, groups, info, t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
        first = groups[0][0]
        metrics = {
            "time/rollout_s": first["rollout_s"],
            "time/reward_s": first["reward_s"],
            "time/train_s": t2 - t1,
            "time/weight_sync_s": t3 - t2,
            "time/checkpoint_s": time.perf_counter() - t3,
            "throughput/rollout_tokens_per_s": info["response/tokens"] / max(first["rollout_s"], 1e-9),
            "faults/rollout_restarts": self.rollout.restarts,
            "faults/reward_restarts": self.rewards.restarts,
            "faults/trainer_restarts": self.trainer_restarts,
        }
        if self.source is not None:  # async: the loop waited this long for the producer (0: fully overlapped)
            metrics["time/wait_s"] = t1 - t0
            metrics.update(self.source.metrics())
        return metrics

    def push_weights(self) -> None:
        """The trainer's weights to every rollout worker as a new policy version, streamed bucket by bucket
        (``trainer.weight_sync_bucket_mb``): a large model is never gathered whole in one message."""
        max_bytes = self.cfg.trainer.weight_sync_bucket_mb << 20
        with self.workers_lock:  # never while the producer is mid-step: one step, one policy version
            version = self.trainer.call("version")
            streams = [
                a.weight_buckets.options(num_returns="streaming").remote(max_bytes)
                for a in self.trainer.actors
            ]
            self.weight_refs, self.version = [], version
            for ref in streams[0]:
                self.weight_refs.append(ref)  # kept for a replacement rollout worker
                ray.get([a.update_weights.remote(ref, version) for a in self.rollout.actors])
            for stream in streams[1:]:  # the other ranks yield nothing; this surfaces their errors
                ray.get(list(stream))

    def _send_weights(self, actor) -> None:
        for ref in self.weight_refs:
            ray.get(actor.update_weights.remote(ref, self.version))

    def evaluate(self) -> dict[str, float]:
        items = self.eval_items[: self.cfg.data.eval_prompts]
        greedy = {**self.cfg.rollout.sampling.model_dump(), "n": 1, "greedy": True, "temperature": 0.0}
        with self.workers_lock:
            groups = self.generate(items, 0, greedy)
            scored = self.score(items, groups)
        flat = [x for g in scored for x in g]
        return {
            "accuracy/eval": sum(map(self.is_correct, flat)) / len(flat),
            "reward/eval_mean": sum(x.score for x in flat) / len(flat),
        }

    def warm_start(self, steps: int, batch_size: int, on_step: Callable[[int, dict], None]) -> None:
        eos = self.tokenizer.special_tokens.get("eos_token")
        eos_id = self.tokenizer.token_to_id(eos) if eos else None
        for k in range(steps):
            items = step_prompts(self.train_items, k, batch_size, self.cfg.run.seed + 1)
            prompts = self.encode(items)
            answers = [
                self.tokenizer.encode(p.answer) + ([eos_id] if eos_id is not None else []) for p in items
            ]
            T = max(len(p) + len(a) for p, a in zip(prompts, answers))
            ids = torch.zeros(len(items), T, dtype=torch.long)
            mask = torch.zeros(len(items), T, dtype=torch.bool)
            for b, (p, a) in enumerate(zip(prompts, answers)):
                ids[b, : len(p) + len(a)] = torch.tensor(p + a)
                mask[b, len(p) - 1 : len(p) - 1 + len(a)] = True
            on_step(k, self.trainer.call("sft_step", ids, mask, self.cfg.run.warm_start_lr))
        self.trainer.call("finish_warm_start")

    def checkpoint(self, step: int) -> str:
        """Commit every step up to ``step`` (-1: the warm start); async mode acks their samples after it."""
        path = self.trainer.call("save_checkpoint", str(self.run_dir / CHECKPOINTS), {"next_step": step + 1})
        if self.source is not None:
            self.source.commit()
        return path

    def restore(self, path: str) -> int:
        position = self.trainer.call("load_checkpoint", path)
        return int(position["next_step"])

    def replace_trainer(self) -> int:
        """A dead trainer is replaced from the latest checkpoint; returns the step to continue from."""
        if self.trainer_restarts >= self.cfg.workers.max_restarts:
            raise RuntimeError(
                f"the trainer died and workers.max_restarts={self.cfg.workers.max_restarts} is used up"
            )
        self.trainer_restarts += 1
        self.trainer.kill()  # the other ranks of a data-parallel group are waiting on the dead one
        self.trainer = self.make_trainer()
        # No checkpoint yet: a new trainer holds the initial weights, the state before step 0 (a warm start,
        # when there is one, always ends with a checkpoint).
        ckpt = latest_checkpoint(self.run_dir / CHECKPOINTS)
        step = self.restore(str(ckpt)) if ckpt is not None else 0
        self.push_weights()
        if (
            self.source is not None
        ):  # the uncommitted steps' samples are pending in the stream: train them again
            self.source.rewind(step)
        return step

    def start_async(self, start_step: int) -> AsyncRollout:
        """The experience stream of this run (a per-run key on a shared server) and its producer thread."""
        redis_cfg = self.cfg.redis
        if redis_cfg.url is not None:
            redis_cfg = redis_cfg.model_copy(update={"stream": f"{redis_cfg.stream}:{self.run_dir.name}"})
        stream = ExperienceStream.connect(redis_cfg, self.run_dir)
        source = AsyncRollout(
            stream, self.sample, self.cfg.run.steps, self.cfg.rollout.sampling.n, self.cfg.run.max_staleness
        )
        source.start(start_step)
        return source

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.log.close()

    def trainer_logprobs(self, batch: TrainBatch, groups: int) -> torch.Tensor:
        """The trainer's log-probs (before its update) of the first sample of the first ``groups`` groups."""
        rows = torch.arange(min(groups, batch.batch_size // batch.group_size)) * batch.group_size
        probe = TrainBatch(
            batch.input_ids_BT[rows],
            batch.response_mask_BT[rows],
            batch.rollout_logp_BT[rows],
            group_size=1,
            advantages_BT=torch.zeros(len(rows), batch.input_ids_BT.shape[1]),
        )
        return self.trainer.call("compute_logprobs", probe)[0]

    def rollout_records(
        self, prompts: list[PromptItem], groups: list[list[dict]], batch: TrainBatch, train_logp: torch.Tensor
    ) -> list[dict]:
        records = []
        for i, row in enumerate(train_logp):
            b = i * batch.group_size
            mask = batch.response_mask_BT[b]
            s = groups[i][0]
            records.append(
                {
                    "prompt": prompts[i].question,
                    "response": s["text"],
                    "reward": s["score"],
                    "label": prompts[i].answer,
                    "mismatch": mismatch_summary(row[mask].tolist(), batch.rollout_logp_BT[b][mask].tolist()),
                }
            )
        return records
