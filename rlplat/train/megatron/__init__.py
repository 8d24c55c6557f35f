"""``trainer.backend: megatron`` — Ring-linear on Megatron-core's tensor/expert parallelism, rlplat's kernels.

``layout`` (torch only: preflight checks, HF ⇄ sharded mapping), ``parallelize`` (the parallel model:
rlplat's model blocks on Megatron's layers), ``trainer`` (``init_megatron``, ``MegatronTrainer``), ``convert``
(HF ⇄ sharded directories). Importing this package does not import megatron-core; ``parallelize`` and
``trainer`` do (``pip install 'rlplat[megatron]'``).
"""

from rlplat.train.megatron.layout import ParallelLayout, check_checkpoint_layout, check_layout, layout_of

__all__ = ["ParallelLayout", "check_checkpoint_layout", "check_layout", "layout_of"]
