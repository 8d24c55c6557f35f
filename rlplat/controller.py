"""The RL program: resume or warm start, then prompts → rollouts → rewards → train → weight push → metrics →
checkpoint, every step. ``Controller.run`` reads top to bottom; ``rlplat run`` (``rlplat.run``) adds the
command line around it (preflight, run directory, progress bar, Ctrl-C).

Sync mode (default): every step samples with the weights of the previous optimizer step, so with the native
engine in batch-invariant mode the rollout log-probs ARE the trainer's π_old, bitwise; `mismatch/*` metrics
show it (max |Δlogp| = 0). Async mode (``run.mode: async``): a producer thread samples ahead, at most
``run.max_staleness`` versions, and the samples reach the loop through the Redis experience stream; see
``rlplat.async_rollout`` for how nothing is lost or trained twice.

Where a step's data goes: rollout workers keep their samples (``SampleGroups``: token ids and log-probs,
packed) in the Ray object store and answer with a small summary; reward workers and every trainer rank read
the samples from those refs, the trainer ranks building the padded batch themselves; the driver holds the
refs, the per-sample rewards and a few counts. In async mode the samples pass through the driver, which
owns the Redis stream (they are JSON there, to survive a crash), and are put in the object store once.

Before RL, a short supervised warm start (``run.warm_start_steps``) teaches the format of the answers on the
training prompts' reference answers. It goes through the trainer's own RL step with advantages of 1 and
π_old = π, whose gradient is the NLL gradient, so there is one optimizer and one code path. The KL reference
(when on) is then reset to the warm-started policy. A stop (Ctrl-C) mid-way checkpoints the warm start after its
current step, and resume continues it from there, bitwise as if it had not stopped (its batches are functions
of the step; tests/train/test_warm_start_resume.py); restarting it instead would throw the steps away.

Deviations from the papers, on purpose:
- One optimizer step per batch (PPO and GRPO take several mini-batch epochs). With an exact backend and
  ``algo.correction.use_rollout_logp_as_old`` the rollout's log-probs are π_old = π_θ, so the ratio is 1 and
  the clip never binds: the update is the on-policy policy gradient of the chosen advantages.
- Dynamic sampling (DAPO) drops zero-variance groups and samples no replacements, so a step may train on
  fewer than ``data.prompts_per_step`` groups.
- IcePop (Ring-1T) is a mask only (the ratio weight is TIS, a separate option); on an exact backend it masks
  nothing. LPO (Ling 2.0) uses the GSPO-token form (``rlplat.algos.losses``); GAR judges both orders of each
  pair and normalises by the most points attainable (``rewards.gar``).
- Async mode trains on samples up to ``run.max_staleness`` versions old with their rollout log-probs as
  π_old, so the PPO ratio measures the policy lag and the clip bounds it; there is no separate proximal
  policy (AReaL's decoupled objective).
- The papers start RL from an instruction-tuned checkpoint; the tiny preset starts from random weights, hence
  the warm start.

Reward failures never stop a step (``rewards.runner``), so they are reported: per-term means and error counts
in metrics.jsonl (``rewards.summary``), and a warning with the step's first error text on the
``rlplat.controller`` logger (``rlplat run`` writes it to run.log). A run whose every sample's reward erred
for ``run.stop_after_failed_reward_steps`` steps in a row is learning nothing: it checkpoints and raises
``RewardsFailedError`` quoting that error.

Faults: a rollout or reward worker that dies is replaced (``workers.max_restarts``); the replacement gets
the current weights and the same prompts again, so each step's prompts are scored exactly once
(`prompts/scored` in metrics.jsonl counts them). A trainer that dies is replaced from the latest
checkpoint, and the steps after it are trained again on the same samples: regenerated in sync mode (a
step's prompts and sampling seeds are functions of its index), read back from the stream's pending
entries in async mode.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from actors.reward import RewardPool, RewardWorker, Scores
from actors.rollout import RolloutPool, Rollouts, RolloutSummary, RolloutWorker
from actors.trainer import TrainerGroup
from rewards.summary import RewardSummary
from rlplat.async_rollout import AsyncRollout, from_records, to_records
from rlplat.buffer import ExperienceStream
from rlplat.config import ExperimentConfig
from rlplat.data.prompts import PromptItem, load_prompts, step_prompts
from rlplat.data.tokenizers import TextTokenizer
from rlplat.runlog import RunLog, mismatch_summary
from rlplat.train.batch import SampleGroups
from rlplat.train.checkpoint import latest_checkpoint

CHECKPOINTS = "checkpoints"
# dashboard.html is re-rendered at most this often during the loop, and at its end (`rlplat dashboard RUN_DIR` is
# the live view)
DASHBOARD_EVERY_S = 15.0

logger = logging.getLogger(__name__)


class RewardsFailedError(RuntimeError):
    """Every sample's reward failed for ``run.stop_after_failed_reward_steps`` steps in a row; the steps
    trained are checkpointed, and the message says what failed and how to continue."""


@dataclass
class ProgressHooks:
    """What the program tells its caller as it goes (``rlplat run``'s progress bar); every hook is optional."""

    # (checkpoint, next RL step, warm-start steps done)
    resumed: Callable[[Path, int, int], None] = lambda checkpoint, step, warm: None
    warm_start: Callable[[int, dict], None] = lambda k, metrics: None
    step: Callable[[int, dict], None] = lambda step, metrics: None


@dataclass
class StepSamples:
    """One step's scored samples as the loop holds them: the samples as object refs, the rest small."""

    rollouts: Rollouts
    scores: Scores
    rollout_s: float
    reward_s: float
    entry_ids: list[str] = field(default_factory=list)  # async: the stream entries they came from


class Controller:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, tokenizer_dir: str | None):
        self.cfg, self.run_dir = cfg, run_dir
        self.tokenizer = TextTokenizer.from_dir(tokenizer_dir or cfg.model.path)
        self.train_items, self.eval_items = load_prompts(cfg.data, cfg.run.seed)
        w, config = cfg.workers, cfg.model_dump(mode="json")
        self.make_trainer = lambda: TrainerGroup(
            config, w.trainer.num, w.trainer.num_cpus, w.trainer.num_gpus, w.trainer.threads
        )
        self.trainer, self.trainer_restarts = self.make_trainer(), 0
        self.weight_refs, self.version = [], 0
        # The rollout and reward pools are used by the loop and, in async mode, by the producer thread.
        self.workers_lock = threading.RLock()
        rollout = ray.remote(RolloutWorker).options(num_cpus=w.rollout.num_cpus, num_gpus=w.rollout.num_gpus)
        self.rollout = RolloutPool(
            lambda: rollout.remote(config, tokenizer_dir, w.rollout.threads),
            w.rollout.num,
            w.max_restarts,
            self.send_weights,
        )
        reward = ray.remote(RewardWorker).options(num_cpus=w.reward.num_cpus, num_gpus=w.reward.num_gpus)
        self.rewards = RewardPool(
            lambda: reward.remote(cfg.rewards.model_dump()), w.reward.num, w.max_restarts
        )
        self.log = RunLog(run_dir, wandb=cfg.wandb, config=config)
        self._encoded: dict[str, list[int]] = {}
        self.source: AsyncRollout | None = None

    def run(
        self, resume: bool, should_stop: Callable[[], bool], progress: ProgressHooks | None = None
    ) -> int:
        """Resume from the latest checkpoint (``resume``) and/or warm start, then RL steps until ``run.steps`` or
        ``should_stop()`` (checked after every warm-start and RL step); the steps done are checkpointed. Returns
        the next RL step."""
        cfg, progress = self.cfg, progress or ProgressHooks()
        step, ckpt = 0, latest_checkpoint(self.run_dir / CHECKPOINTS) if resume else None
        warm, warm_steps = 0, cfg.run.warm_start_steps  # warm-start steps done, and to do
        if ckpt is not None:  # resume: the trainer's state, and the step after the checkpoint
            position = self.trainer.load_checkpoint(str(ckpt))
            step, warm = position["next_step"], position.get("warm_start_done", warm_steps)
            progress.resumed(ckpt, step, warm)
        warming = warm < warm_steps
        while warm < warm_steps:  # supervised, on the training prompts' reference answers
            metrics = self.trainer.sft_step(self.warm_start_samples(warm), cfg.run.warm_start_lr)
            progress.warm_start(warm, metrics)
            warm += 1
            if warm < warm_steps and should_stop():
                # Stopped mid-way: the checkpoint holds the trainer's state and random streams, and step k's
                # batch is a function of k, so resume continues the warm start where it stopped, exactly.
                self.trainer.save_checkpoint(
                    str(self.run_dir / CHECKPOINTS), {"next_step": 0, "warm_start_done": warm}
                )
                return 0
        if warming:
            self.trainer.finish_warm_start()
        self.push_weights()
        if warming:
            self.log.log_metrics(0, self.evaluate())  # line 0: the warm-started policy
            self.checkpoint(-1)  # a crash from here on never repeats the warm start
            self.drop_warm_start_checkpoints()
        if cfg.run.mode == "async":
            self.source = self.start_async(step)
        failing = 0  # consecutive steps on which every sample's reward erred
        while step < cfg.run.steps and not should_stop():
            t0 = time.perf_counter()
            prompts = step_prompts(self.train_items, step, cfg.data.prompts_per_step, cfg.run.seed)
            if self.source is None:  # sync: rollout and reward workers sample this step now
                samples = self.sample(prompts, step)
            else:  # async: the producer sampled it ahead, with weights ≤ max_staleness versions old
                samples = self.take(prompts, step)
            t1 = time.perf_counter()
            metrics = self.sample_metrics(prompts, samples)  # staleness: against the weights that sampled
            logged = [i * cfg.rollout.sampling.n for i in range(min(cfg.run.rollouts_logged, len(prompts)))]
            try:  # every trainer rank reads the samples from the rollout workers' refs
                train, probes = self.trainer.train_step(samples.rollouts.refs, samples.scores, logged)
            except ray.exceptions.RayActorError:
                step = self.replace_trainer()  # from the latest checkpoint; its steps are trained again
                continue
            t2 = time.perf_counter()
            failing = self.report_reward_errors(step, samples.scores.summary, failing)
            self.push_weights()  # new policy version
            if self.source is not None:
                self.source.trained(step + 1, samples.entry_ids)
            t3 = time.perf_counter()
            metrics.update(self.train_metrics(train))
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                metrics.update(self.evaluate())
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                self.checkpoint(step)
            metrics.update(self.step_metrics(samples, metrics, t0, t1, t2, t3))
            metrics.update(self.rewards.take_metrics())  # reward calls since the last step
            # metrics.jsonl counts optimizer updates: line k is the state after k RL steps (0: warm start)
            self.log.log_metrics(step + 1, metrics)
            self.log.log_rollouts(step + 1, self.rollout_records(prompts, samples, probes))
            self.log.write_dashboard(every_s=DASHBOARD_EVERY_S)
            progress.step(step, metrics)
            step += 1
            if 0 < cfg.run.stop_after_failed_reward_steps <= failing:
                break
        self.checkpoint(step - 1)  # at the end, and on a stop: every step trained so far
        self.log.write_dashboard()
        if 0 < cfg.run.stop_after_failed_reward_steps <= failing:
            raise RewardsFailedError(
                f"every sample's reward failed in the last {failing} steps "
                f"(run.stop_after_failed_reward_steps={cfg.run.stop_after_failed_reward_steps}); the first "
                f"error of step {step}: {samples.scores.summary.first_error}. The {step} steps trained are "
                f"checkpointed: fix the reward, then continue with `rlplat run --resume {self.run_dir}`"
            )
        return step

    @staticmethod
    def report_reward_errors(step: int, summary: RewardSummary, failing: int) -> int:
        """Warn with the step's first reward error; returns the new count of consecutive all-failed steps."""
        if summary.errors:
            logger.warning(
                "step %d: %d of %d samples' rewards failed; first error: %s",
                step + 1,
                summary.errors,
                summary.samples,
                summary.first_error,
            )
        return failing + 1 if summary.all_failed else 0

    def encode(self, prompts: list[PromptItem]) -> list[list[int]]:
        """Prompt token ids, memoised by prompt id: the prompts recur every epoch."""
        for p in prompts:
            if p.id not in self._encoded:
                text = self.cfg.data.prompt_template.format(question=p.question)
                chat = [{"role": "user", "content": text}] if self.cfg.data.use_chat_template else text
                self._encoded[p.id] = self.tokenizer.encode_prompt(chat)
        return [self._encoded[p.id] for p in prompts]

    def warm_start_samples(self, k: int) -> SampleGroups:
        """Warm-start step ``k``'s prompts, each with its demonstration (the worked solution where the data has
        one, else the reference answer) and EOS as the response."""
        items = step_prompts(self.train_items, k, self.cfg.run.warm_start_batch_size, self.cfg.run.seed + 1)
        eos = self.tokenizer.special_tokens.get("eos_token")
        end = [self.tokenizer.token_to_id(eos)] if eos else []
        answers = [self.tokenizer.encode(p.demonstration) + end for p in items]
        return SampleGroups.pack(
            self.encode(items), answers, [torch.zeros(len(a)) for a in answers], [0] * len(items)
        )

    def generate(self, prompts: list[PromptItem], step: int, sampling: dict, texts: int = 0) -> Rollouts:
        indices = [step * len(prompts) + i for i in range(len(prompts))]  # seeds: same prompt, same samples
        if sampling.get("seed") is None:  # a run is reproducible from run.seed unless sampling.seed is set
            sampling = {**sampling, "seed": self.cfg.run.seed}
        return self.rollout.generate(self.encode(prompts), indices, sampling, texts)

    def sample(self, prompts: list[PromptItem], step: int) -> StepSamples:
        """Rollout and reward for one step's prompts."""
        with self.workers_lock:
            t0 = time.perf_counter()
            rollouts = self.generate(
                prompts, step, self.cfg.rollout.sampling.model_dump(), self.cfg.run.rollouts_logged
            )
            t1 = time.perf_counter()
            scores = self.rewards.score(rollouts, prompts)
            t2 = time.perf_counter()
        return StepSamples(rollouts, scores, t1 - t0, t2 - t1)

    def produce(self, step: int) -> tuple[list[dict], int]:
        """Async mode's producer: step ``step`` sampled and scored, as stream records, and its policy version."""
        prompts = step_prompts(self.train_items, step, self.cfg.data.prompts_per_step, self.cfg.run.seed)
        s = self.sample(prompts, step)
        parts = ray.get(s.rollouts.refs)  # the stream holds the samples themselves
        records = to_records(parts, s.scores, step, s.rollout_s, s.reward_s)
        return records, s.rollouts.summary.min_version

    def take(self, prompts: list[PromptItem], step: int) -> StepSamples:
        """Async mode: step ``step``'s samples from the stream, put in the object store once for the trainer."""
        records, entry_ids = self.source.take(step)
        samples, scores = from_records(records, self.encode(prompts))
        summary = RolloutSummary.of(samples, self.cfg.run.rollouts_logged)
        rollouts = Rollouts([ray.put(samples)], [list(range(len(prompts)))], summary)
        first = records[0]
        return StepSamples(rollouts, scores, first["rollout_s"], first["reward_s"], entry_ids)

    def sample_metrics(self, prompts: list[PromptItem], samples: StepSamples) -> dict[str, float]:
        """Counts, response lengths and the rewards' summary: ``reward/mean``, ``reward/errors`` and per term
        ``reward/<term>_{mean,errors,timeouts}``; ``accuracy/train`` only when a term counts toward accuracy."""
        s, n, rewards = samples.rollouts.summary, self.cfg.rollout.sampling.n, samples.scores.summary
        out = {
            "prompts/issued": len(prompts),
            "prompts/scored": len(samples.scores.rewards) // n,
            "samples/scored": len(samples.scores.rewards),
            "samples/staleness_max": self.version - s.min_version,
            "response/length_mean": torch.tensor(s.response_lengths).float().mean().item(),
            "response/tokens": s.response_tokens,
            **rewards.metrics(),
        }
        if "reward/accuracy" in out:  # one key for it, beside accuracy/eval
            out["accuracy/train"] = out.pop("reward/accuracy")
        return out

    @staticmethod
    def train_metrics(train: dict[str, float]) -> dict[str, float]:
        """The trainer's metrics under ``train/``, and the dashboard's canonical names for the main ones."""
        names = {
            "mismatch/max_abs_dlogp": "max_abs_dlogp",
            "mismatch/kl": "mismatch_kl",
            "mismatch/routing_disagreement": "routing_disagreement",
            "kl/ref": "kl_to_ref",
            "entropy/mean": "entropy",
            "icepop/masked_fraction": "icepop_masked_fraction",
            "throughput/train_tokens_per_s": "tokens_per_s",
        }
        return {
            **{f"train/{k}": v for k, v in train.items()},
            **{k: train[v] for k, v in names.items() if v in train},
        }

    def step_metrics(
        self, samples: StepSamples, metrics: dict, t0: float, t1: float, t2: float, t3: float
    ) -> dict[str, float]:
        now = time.perf_counter()
        out = {
            "time/rollout_s": samples.rollout_s,
            "time/reward_s": samples.reward_s,
            "time/train_s": t2 - t1,
            "time/weight_sync_s": t3 - t2,
            "time/checkpoint_s": now - t3,  # with the evaluation, when there is one
            "time/step_s": now - t0,
            "throughput/rollout_tokens_per_s": metrics["response/tokens"] / max(samples.rollout_s, 1e-9),
            "faults/rollout_restarts": self.rollout.restarts,
            "faults/reward_restarts": self.rewards.restarts,
            "faults/trainer_restarts": self.trainer_restarts,
        }
        if self.source is not None:  # async: the loop waited this long for the producer (0: fully overlapped)
            out["time/wait_s"] = t1 - t0
            out.update(self.source.metrics())
        return out

    def rollout_records(self, prompts: list[PromptItem], samples: StepSamples, probes: list) -> list[dict]:
        """The first sample of the first ``run.rollouts_logged`` prompts, with the trainer's log-probs of it
        from the training forward (None when a filter dropped it)."""
        n = self.cfg.rollout.sampling.n
        return [
            {
                "prompt": prompts[i].question,
                "response": samples.rollouts.summary.texts[i],
                "reward": samples.scores.rewards[i * n],
                "label": prompts[i].answer,
                "mismatch": None
                if t is None
                else mismatch_summary(t["train_logp"], t["rollout_logp"], t["keep"]),
            }
            for i, t in enumerate(probes)
        ]

    def push_weights(self) -> None:
        """The trainer's weights to every rollout worker as a new policy version, streamed bucket by bucket
        (``trainer.weight_sync_bucket_mb``): a large model is never gathered whole in one message."""
        with self.workers_lock:  # never while the producer is mid-step: one step, one policy version
            version, buckets = self.trainer.weight_buckets(self.cfg.trainer.weight_sync_bucket_mb << 20)
            self.weight_refs, self.version = [], version
            for ref in buckets:
                self.weight_refs.append(ref)  # kept for a replacement rollout worker
                self.rollout.update_weights(ref, version)

    def send_weights(self, actor: Any) -> None:
        """The current weights to a replacement rollout worker."""
        for ref in self.weight_refs:
            ray.get(actor.update_weights.remote(ref, self.version))

    def evaluate(self) -> dict[str, float]:
        items = self.eval_items[: self.cfg.data.eval_prompts]
        greedy = {**self.cfg.rollout.sampling.model_dump(), "n": 1, "greedy": True, "temperature": 0.0}
        with self.workers_lock:
            summary = self.rewards.score(self.generate(items, 0, greedy), items).summary
        if summary.errors:
            logger.warning(
                "eval: %d of %d samples' rewards failed; first error: %s",
                summary.errors,
                summary.samples,
                summary.first_error,
            )
        out = {"reward/eval_mean": summary.mean, "reward/eval_errors": summary.errors}
        if summary.accuracy is not None:
            out["accuracy/eval"] = summary.accuracy
        return out

    def checkpoint(self, step: int) -> None:
        """Commit every step up to ``step`` (-1: the warm start); async mode acks their samples after it."""
        self.trainer.save_checkpoint(str(self.run_dir / CHECKPOINTS), {"next_step": step + 1})
        if self.source is not None:
            self.source.commit()

    def drop_warm_start_checkpoints(self) -> None:
        """Checkpoints of a stopped warm start are named by its step count (step-<k>, k up to
        run.warm_start_steps), so they would sort after, and outlive, the RL steps' under keep_last; once the
        finished warm start is checkpointed (step-0, the latest) nothing else in the directory is needed."""
        latest = latest_checkpoint(self.run_dir / CHECKPOINTS)
        for old in (self.run_dir / CHECKPOINTS).glob("step-*"):
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)

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
        step = self.trainer.load_checkpoint(str(ckpt))["next_step"] if ckpt is not None else 0
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
        source = AsyncRollout(stream, self.produce, self.cfg.run.steps, self.cfg.run.max_staleness)
        source.start(start_step)
        return source

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.log.close()
