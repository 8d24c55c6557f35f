"""Trainer worker: one Ray actor per trainer rank, wrapping ``rlplat.train.Trainer`` (or the Megatron trainer)."""

from __future__ import annotations

from typing import Any

import torch


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
            else:  # every rank gets every call from the controller's TrainerGroup: they are collectives
                self.trainer = rank_trainer(cfg, rank, master_addr, master_port)
            return
        # Ranks of one data-parallel group meet at rank 0's address; every rank returns the same results.
        dp = init_data_parallel(
            rank, cfg.trainer.dp_world_size, cfg.trainer.dist_backend, master_addr, master_port
        )
        # build_policy is what the rollout workers call too: same seed, same weights, same precision.
        self.trainer = Trainer(build_policy(cfg.model), cfg.algo, cfg.trainer, dp=dp)

    def train_step(self, batch) -> dict[str, float]:
        return self.trainer.train_step(batch)

    def sft_step(
        self, input_ids_BT: torch.Tensor, response_mask_BT: torch.Tensor, lr: float | None = None
    ) -> dict[str, float]:
        """Supervised step through the RL loss: advantages of 1 with π_old = π make the clipped surrogate's
        gradient exactly the negative log-likelihood gradient of the response tokens (token-mean)."""
        from rlplat.train.batch import TrainBatch

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

    def compute_logprobs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.compute_logprobs(batch)

    def export_weights(self) -> tuple[dict[str, torch.Tensor], int]:
        return self.trainer.export_weights()

    def weight_buckets(self, max_bytes: int):
        """The weights as a stream of buckets (call with Ray's ``num_returns="streaming"``). Every rank must
        run it (gathering shards is collective); rank 0 alone yields, so each bucket travels once."""
        for bucket in self.trainer.export_weight_buckets(max_bytes):
            if self.rank == 0:
                yield bucket

    def save_checkpoint(self, directory: str, data_position: Any) -> str | None:
        from rlplat.train.checkpoint import save_checkpoint

        path = save_checkpoint(self.trainer, directory, data_position)
        return None if path is None else str(path)

    def load_checkpoint(self, path: str) -> Any:
        from rlplat.train.checkpoint import load_checkpoint

        return load_checkpoint(self.trainer, path)

    def version(self) -> int:
        return self.trainer.version
