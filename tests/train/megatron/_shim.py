"""The CPU accommodation for megatron-core, for tests only (the library never imports this).

megatron-core 0.16 allocates the outputs of its autograd collectives on ``torch.cuda.current_device()``
(``tensor_parallel.mappings``: the first-dim all-gather and the all-to-all). On a CPU-only torch that call
raises, so the test processes answer it with the CPU device. Nothing else needs stubbing for what the
backend uses: its layers are built with ``use_cpu_initialization`` and without Megatron's initialisers (no
CUDA RNG tracker), and the dense tensor-parallel path has no CUDA call.
"""

from __future__ import annotations

import torch


def cpu_shim() -> None:
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")
