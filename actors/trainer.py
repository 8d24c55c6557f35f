"""Trainer workers: one Ray actor per trainer rank, wrapping ``rlplat.train.Trainer`` (or the Megatron
trainer), and ``TrainerGroup``, the driver's typed handle on the ranks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlplat.train.batch import SampleGroups, TrainBatch
from rlplat.train.checkpoint import load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from actors.reward import Scores


class TrainerWorker:
    """Owns the policy's trainable copy: RL steps, the warm start, weight export, checkpoints."""

    def __init__(
        self,
        config: dict[str, Any],
        num_threads: int = 1,
        rank: int = 0,
        master_addr: str | None = None,
        master_port: int | None = None,
    ):
        import kernels
        from rlplat.config import ExperimentConfig
        from rlplat.engine.policy import build_policy
        from rlplat.train.dist import init_data_parallel
        from rlplat.train.trainer import Trainer

        torch.set_num_threads(max(1, num_threads))
        self.rank = rank
        cfg = ExperimentConfig.model_validate(config)
        cfg = cfg.model_copy(update={"trainer": cfg.trainer_config()})  # what `trainer:` leaves to the run
        kernels.set_mode(cfg.kernels.backend, cfg.kernels.batch_invariant, cfg.kernels.chunk_size)
        if cfg.trainer.backend == "megatron":
            from rlplat.train.megatron.trainer import rank_trainer, single_rank_trainer

            if cfg.workers.trainer.num == 1:
                self.trainer = single_rank_trainer(cfg)
            else:  # every rank gets every call from the TrainerGroup: they are collectives
                self.trainer = rank_trainer(cfg, rank, master_addr, master_port)
            return
        # Ranks of one data-parallel group meet at rank 0's address; every rank returns the same results.
        dp = init_data_parallel(
            rank, cfg.trainer.dp_world_size, cfg.trainer.dist_backend, master_addr, master_port
        )
        # build_policy is what the rollout workers call too: same seed, same weights, same precision.
        self.trainer = Trainer(build_policy(cfg.model), cfg.algo, cfg.trainer, dp=dp)

    def train_step(
        self,
        samples: list[ray.ObjectRef],
        scores: tuple[torch.Tensor, torch.Tensor | None],
        probe_rows: list[int],
    ) -> tuple[dict[str, float], list[dict[str, list] | None]]:
        """One RL step on the step's samples, read from the rollout workers' object refs (each rank builds the
        batch itself). Returns the metrics and, for ``probe_rows``, the training forward's log-probs."""
        from rlplat.train.trainer import RowProbe

        rewards_B, correct_B = scores
        batch = TrainBatch.from_groups(ray.get(samples), rewards_B, correct_B)
        probe = RowProbe(probe_rows)
        return self.trainer.train_step(batch, probe), probe.tokens

    def sft_step(self, samples: SampleGroups, lr: float | None = None) -> dict[str, float]:
        """Supervised step through the RL loss on prompts with their reference responses: advantages of 1 with
        π_old = π make the clipped surrogate's gradient exactly the negative log-likelihood gradient of the
        response tokens (token-mean)."""
        padded = TrainBatch.from_groups([samples], torch.zeros(len(samples.response_lengths_S)))
        input_ids_BT, response_mask_BT = padded.input_ids_BT, padded.response_mask_BT
        probe = TrainBatch(
            input_ids_BT,
            response_mask_BT,
            torch.zeros(response_mask_BT.shape),
            group_size=1,
            advantages_BT=response_mask_BT.float(),
        )
        logp, _ = self.trainer.compute_logprobs(probe)
        batch = TrainBatch(
            input_ids_BT,
            response_mask_BT,
            logp,
            group_size=1,
            advantages_BT=response_mask_BT.float(),
            old_logp_BT=logp,
        )
        algo, config = self.trainer.algo, self.trainer.config
        if lr is not None:
            update = {"lr": lr, "lr_warmup_steps": 0, "lr_decay": "constant"}
            self.trainer.config = config.model_copy(update=update)
        # no rewards to filter on, and no KL pull towards the initial weights during the warm start
        self.trainer.algo = algo.model_copy(
            update={
                "dynamic_sampling": False,
                "entropy_coef": 0.0,
                "kl": algo.kl.model_copy(update={"mode": "none"}),
            }
        )
        try:
            metrics = self.trainer.train_step(batch)
        finally:
            self.trainer.algo, self.trainer.config = algo, config
        metrics["nll"] = float(
            -(logp * response_mask_BT).sum() / response_mask_BT.sum()
        )  # before this update
        return metrics

    def finish_warm_start(self) -> None:
        """The KL reference of RL is the warm-started policy, not the random initialisation."""
        if self.trainer.reference is not None:
            self.trainer.reference.load_state_dict(self.trainer.model.state_dict())
        # trainer.lr_warmup_steps and lr_decay_steps count RL steps; the warm start's steps must not use them up
        self.trainer.step = 0

    def weight_buckets(self, max_bytes: int) -> Iterator[int | dict[str, torch.Tensor]]:
        """The policy version, then the weights as a stream of buckets (call with Ray's
        ``num_returns="streaming"``). Every rank must run it (gathering shards is collective); rank 0 alone
        yields, so each bucket travels once."""
        if self.rank == 0:
            yield self.trainer.version
        for bucket in self.trainer.export_weight_buckets(max_bytes):
            if self.rank == 0:
                yield bucket

    def save_checkpoint(self, directory: str, data_position: Any) -> str | None:
        path = save_checkpoint(self.trainer, directory, data_position)
        return None if path is None else str(path)

    def load_checkpoint(self, path: str) -> Any:
        return load_checkpoint(self.trainer, Path(path))


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Rank 0's address for torch.distributed, found on the node where rank 0 will run."""
    from rlplat.train.dist import free_port

    return ray.util.get_node_ip_address(), free_port()


class TrainerGroup:
    """The trainer's ranks, one ``TrainerWorker`` actor each, gang-placed in a placement group (PACK: one node
    when they fit). Every call goes to every rank (they run the step's collectives together) and waits for
    all of them; rank 0 answers, since all ranks return the same results and rank 0 alone writes checkpoints.
    Bulk arguments are put in the object store once, whatever the number of ranks."""

    def __init__(self, config: dict[str, Any], size: int, num_cpus: float, num_gpus: float, threads: int):
        self.pg, addr, port = None, None, None
        placements: list[Any] = [None] * size  # one rank: Ray places it like any actor
        if size > 1:
            bundle = {k: v for k, v in {"CPU": num_cpus, "GPU": num_gpus}.items() if v}
            self.pg = placement_group([bundle] * size, strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=300)
            except ray.exceptions.GetTimeoutError as err:
                raise RuntimeError(
                    f"Ray could not place {size} trainer ranks of {bundle} in 300 s; lower workers.trainer.*"
                ) from err
            placements = [PlacementGroupSchedulingStrategy(self.pg, i) for i in range(size)]
            addr, port = ray.get(_rendezvous.options(scheduling_strategy=placements[0]).remote())
        actor = ray.remote(TrainerWorker)
        self.actors = [
            actor.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=placements[rank]).remote(
                config, threads, rank, addr, port
            )
            for rank in range(size)
        ]

    def train_step(
        self, samples: list[ray.ObjectRef], scores: Scores, probe_rows: list[int]
    ) -> tuple[dict[str, float], list[dict[str, list] | None]]:
        """One RL step of every rank on the samples behind ``samples`` (refs of ``SampleGroups``, in order)
        with their ``scores``; the metrics and the training forward's log-probs of ``probe_rows``."""
        rewards_B = torch.tensor(scores.rewards, dtype=torch.float32)
        # With no term counting toward accuracy (correct is None) dynamic sampling groups by reward instead,
        # TrainBatch's documented default.
        judged = all(c is not None for c in scores.correct)
        correct_B = torch.tensor([float(c) for c in scores.correct]) if judged else None
        ref = ray.put((rewards_B, correct_B))
        return self._all([a.train_step.remote(samples, ref, probe_rows) for a in self.actors])

    def sft_step(self, samples: SampleGroups, lr: float | None) -> dict[str, float]:
        ref = ray.put(samples)
        return self._all([a.sft_step.remote(ref, lr) for a in self.actors])

    def finish_warm_start(self) -> None:
        self._all([a.finish_warm_start.remote() for a in self.actors])

    def save_checkpoint(self, directory: str, data_position: Any) -> str:
        return self._all([a.save_checkpoint.remote(directory, data_position) for a in self.actors])

    def load_checkpoint(self, path: str) -> Any:
        return self._all([a.load_checkpoint.remote(path) for a in self.actors])

    def weight_buckets(self, max_bytes: int) -> tuple[int, Iterator[ray.ObjectRef]]:
        """The policy version and the refs of its weight buckets, streamed from rank 0 as they are ready."""
        streams = [a.weight_buckets.options(num_returns="streaming").remote(max_bytes) for a in self.actors]

        def buckets() -> Iterator[ray.ObjectRef]:
            yield from first
            for stream in streams[1:]:  # the other ranks yield nothing; this surfaces their errors
                ray.get(list(stream))

        first = iter(streams[0])
        return ray.get(next(first)), buckets()

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)

    @staticmethod
    def _all(refs: list[ray.ObjectRef]) -> Any:
        pending = list(refs)
        while pending:  # as they finish: a dead rank raises at once, while its peers wait in a collective
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
        return ray.get(refs[0])
