"""The CPU accommodation for megatron-core, for tests only (the library never imports this).

megatron-core 0.16 allocates on the GPU in places the backend reaches:
- the outputs of its autograd collectives (``tensor_parallel.mappings``: the first-dim all-gather and the
  all-to-all) and the pipeline's point-to-point buffers, on ``torch.cuda.current_device()``;
- the pipeline schedule's token counter, on ``device="cuda"``
  (``forward_backward_pipelining_without_interleaving``);
- and it calls ``torch.cuda.synchronize()`` after the pipeline's shape exchange.
On a CPU-only torch each of those raises, so the test processes answer them with the CPU. Nothing else needs
stubbing for what the backend uses: its layers are built with ``use_cpu_initialization`` and without
Megatron's initialisers (no CUDA RNG tracker), and the dense tensor-parallel path has no CUDA call.
"""

from __future__ import annotations

import types

import torch


class _CpuTorch(types.ModuleType):
    """``torch`` as the pipeline schedule sees it: the same module, with "cuda" allocations on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


def cpu_shim() -> None:
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuTorch("torch")
