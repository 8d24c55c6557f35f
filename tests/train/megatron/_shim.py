"""The CPU accommodation for megatron-core, for tests only (the library never imports this).

megatron-core 0.16 allocates on the GPU in places the backend reaches:
- the outputs of its autograd collectives (``tensor_parallel.mappings``: the first-dim all-gather and the
  all-to-all) and the pipeline's point-to-point buffers, on ``torch.cuda.current_device()``;
- the pipeline schedule's token counter, on ``device="cuda"``
  (``forward_backward_pipelining_without_interleaving``);
- it calls ``torch.cuda.synchronize()`` after the pipeline's shape exchange;
- and the all-to-all token dispatcher creates a ``torch.cuda.Stream`` for its device-to-host copies of the
  split counts and records and waits on an event there; the copies (``maybe_move_tensor_to_cpu``) turn the
  counts into numpy arrays, the form its all-to-all takes split sizes in, but only for GPU tensors.
On a CPU-only torch each of those raises, so the test processes answer them with the CPU. Nothing else needs
stubbing for what the backend uses: its layers are built with ``use_cpu_initialization`` and without
Megatron's initialisers (no CUDA RNG tracker), and the dense tensor-parallel path has no CUDA call.
"""

from __future__ import annotations

import contextlib
import types

import torch


class _CpuTorch(types.ModuleType):
    """``torch`` as the pipeline schedule sees it: the same module, with "cuda" allocations on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


class _CpuStream:
    """A stream for work that the CPU runs in program order: waiting and events are no-ops."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self):
        return self

    def synchronize(self) -> None:
        pass


def cpu_shim() -> None:
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _CpuStream
    stream = _CpuStream()
    torch.cuda.current_stream = lambda device=None: stream
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import token_dispatcher

    schedules.torch = _CpuTorch("torch")
    token_dispatcher.maybe_move_tensor_to_cpu = _counts_to_host


def _counts_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """The dispatcher's device-to-host copy for tensors already on the CPU."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor
