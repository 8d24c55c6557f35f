"""Typed config of the ``trainer:`` section: optimiser, micro-batching, backend, data parallelism, checkpoints,
and the Megatron backend's parallel layout (``trainer.megatron``).

The model's precision is ``model.precision`` (one setting for rollout and trainer); the RL objective is
``algo:``. Gradient accumulation needs no setting: micro-batch losses are divided by the global normaliser of
``rlplat.algos.aggregation``, so any micro-batch size gives the same update.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointConfig(_Closed):
    dir: str | None = Field(
        None, description="Checkpoint directory; null: <run dir>/checkpoints (set by the controller)."
    )
    every_steps: int = Field(0, ge=0, description="Save every N optimizer steps (0: only when asked).")
    keep_last: int = Field(3, ge=1, description="Keep this many newest checkpoints, delete older ones.")
    save_optimizer: bool = Field(True, description="Include optimizer state (needed for an exact resume).")
    export_hf: bool = Field(
        False, description="Also write an HF-format model directory (save_pretrained) inside each checkpoint."
    )


class MegatronConfig(_Closed):
    """Parallel layout of the Megatron-core backend; world size = tensor × pipeline × trainer.dp_world_size."""

    tensor_parallel_size: int = Field(
        1, ge=1, description="Tensor-parallel ranks: attention heads, MLP columns and vocabulary are split."
    )
    expert_parallel_size: int = Field(
        1, ge=1, description="Expert-parallel ranks: routed experts are split, tokens move by all-to-all."
    )
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="Pipeline stages: layers split evenly, micro-batches run by Megatron's 1F1B schedule.",
    )
    fp8_recipe: Literal["kernels", "te_blockwise"] = Field(
        "kernels",
        description=(
            "FP8 GEMMs when model.precision is fp8: rlplat's blockwise kernel (the rollout's, aligned) or "
            "Transformer Engine's Float8BlockScaling (GPU only, faster)."
        ),
    )


class TrainerConfig(_Closed):
    backend: Literal["torch", "megatron"] = Field(
        "torch",
        description="Training backend: plain PyTorch, or Megatron-core (tensor/expert parallel, trainer.megatron).",
    )
    lr: float = Field(1e-6, gt=0.0, description="AdamW peak learning rate.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to lr over this many steps.")
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="After the warm-up: keep lr, or decay it to lr × lr_min_ratio."
    )
    lr_decay_steps: int | None = Field(
        None,
        ge=1,
        description="Steps (from the first RL step) at whose end the decay reaches its floor; null: run.steps.",
    )
    lr_min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Floor of the decay, as a fraction of lr.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="Clip the global gradient norm to this value; null disables clipping."
    )
    micro_batch_size: int = Field(4, ge=1, description="Sequences per micro-batch (forward/backward pass).")
    micro_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget per micro-batch (padded length x rows); replaces micro_batch_size when set.",
    )
    batch_invariant: bool | None = Field(
        None,
        description=(
            "Kernel mode for training: null follows kernels.batch_invariant (exact rollout log-probs); "
            "false trains with the faster chunked kernels (log-probs no longer bitwise the rollout's)."
        ),
    )
    expert_bias_update_rate: float = Field(
        0.0, ge=0.0, description="u of the aux-loss-free expert-bias update (Ling 2.0); 0 disables it (RL)."
    )
    bad_samples: Literal["error", "skip"] = Field(
        "error",
        description="Non-finite reward/log-prob in a sample: raise, or drop its whole group and record it.",
    )
    dp_world_size: int = Field(1, ge=1, description="Data-parallel trainer processes.")
    weight_sync_bucket_mb: int = Field(
        512, ge=1, description="Weights go to rollout workers in buckets of at most this many MiB (streamed)."
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on GPU, gloo on CPU."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoint location, frequency and retention."
    )
    megatron: MegatronConfig = Field(
        default_factory=MegatronConfig, description="Parallel layout and FP8 recipe of backend: megatron."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        steps = self.lr_decay_steps
        if self.lr_decay != "constant" and steps is not None and steps <= self.lr_warmup_steps:
            raise ValueError(
                f"lr_decay {self.lr_decay!r} needs lr_decay_steps > lr_warmup_steps ({self.lr_warmup_steps})"
            )
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        if self.backend == "torch" and self.megatron != MegatronConfig():
            raise ValueError(
                "trainer.megatron is set but trainer.backend is torch; set trainer.backend: megatron"
            )
        return self
