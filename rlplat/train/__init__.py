"""The trainer: RL steps on the rollout's own model code and kernels, FP8 training, data parallelism,
exact checkpoints and checkpoint merging (see ``trainer.py`` for the step, ``checkpoint.py`` for the files)."""

from rlplat.train.batch import TrainBatch
from rlplat.train.checkpoint import (
    Checkpointable,
    latest_checkpoint,
    load_checkpoint,
    merge_checkpoints,
    merge_coefficients,
    save_checkpoint,
)
from rlplat.train.config import CheckpointConfig, TrainerConfig
from rlplat.train.dist import DataParallel, init_data_parallel
from rlplat.train.experts import ExpertLoadCounter, expert_bias_update
from rlplat.train.trainer import NonFiniteError, RowProbe, Trainer, TrainerBackend

__all__ = [
    "CheckpointConfig",
    "Checkpointable",
    "DataParallel",
    "ExpertLoadCounter",
    "NonFiniteError",
    "RowProbe",
    "TrainBatch",
    "Trainer",
    "TrainerBackend",
    "TrainerConfig",
    "expert_bias_update",
    "init_data_parallel",
    "latest_checkpoint",
    "load_checkpoint",
    "merge_checkpoints",
    "merge_coefficients",
    "save_checkpoint",
]
