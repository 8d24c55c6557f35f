"""Operator kernels shared by the trainer and every rollout engine.

One folder per operator: ``reference.py`` is readable PyTorch and the numerical truth (the CPU path),
``triton.py`` (where present) the GPU implementation, and ``__init__.py`` the public function that validates
its inputs and dispatches. The trainer and the rollout engines call only the public functions, and a single
process-wide :class:`KernelMode` chooses the implementation for both sides, which is what keeps their numerics
identical.

``batch_invariant=True`` (the default, and the mode RL uses) makes every op's result for one token independent
of batch size, padding, and whether the token arrives in a training forward, a prefill or a decode step, at
about the plain path's cost: linear attention in chunks of ``chunk_size`` tokens at absolute positions
(``linear_attention/reference.py``), softmax attention over key blocks at absolute positions
(``softmax_attention/reference.py``), GEMMs whose rows do not depend on their batch
(``batch_invariant/reference.py``), and row-wise ops that are invariant by construction. ``batch_invariant=False``
selects the plain formulations (chunks from the first new token with a recurrent decode, fused SDPA, library
GEMMs); ``rlplat bench kernels`` measures the difference.

With ``backend="triton"`` every op that defines a token's numbers runs a Triton kernel (compiled on a GPU; on a
CPU only under ``TRITON_INTERPRET=1``): the invariant GEMM, chunk-aligned linear attention, block-aligned
softmax attention, RMSNorm, the group-norm gate, MoE routing and FP8 quantisation. The plain path on that
backend uses the chunked Triton linear attention, torch's SDPA and cuBLAS. Every other op (RoPE, SwiGLU, the
LM head's softmax statistics) is elementwise torch on both backends, so that choice cannot differ between
trainer and rollout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

Backend = Literal["reference", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "triton")
# Linear attention's chunk size is part of the numerics: chunks sit at absolute positions, so trainer and rollout
# must agree on it. Powers of two from 16: whole query tiles of the invariant GEMMs, and Triton block shapes.
CHUNK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class KernelMode:
    backend: Backend = "reference"
    batch_invariant: bool = True
    chunk_size: int = 64


_MODE = KernelMode()


def get_mode() -> KernelMode:
    return _MODE


def set_mode(
    backend: Backend | None = None, batch_invariant: bool | None = None, chunk_size: int | None = None
) -> KernelMode:
    """Set the process-wide kernel mode (None leaves a setting as it is); returns the previous mode."""
    global _MODE
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_chunk_size(chunk_size)
    previous = _MODE
    changes = {}
    if backend is not None:
        changes["backend"] = backend
    if batch_invariant is not None:
        changes["batch_invariant"] = bool(batch_invariant)
    if chunk_size is not None:
        changes["chunk_size"] = int(chunk_size)
    _MODE = replace(_MODE, **changes)
    return previous


def restore_mode(mode: KernelMode) -> None:
    """Put back a mode returned by :func:`set_mode`."""
    set_mode(mode.backend, mode.batch_invariant, mode.chunk_size)


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size not in CHUNK_SIZES:
        raise ValueError(
            f"linear-attention chunk size {chunk_size} does not fit the kernels' tiles; choose one of "
            f"{', '.join(map(str, CHUNK_SIZES))} (kernels.chunk_size)"
        )


@contextlib.contextmanager
def kernel_mode(
    backend: Backend | None = None, batch_invariant: bool | None = None, chunk_size: int | None = None
) -> Iterator[KernelMode]:
    previous = set_mode(backend, batch_invariant, chunk_size)
    try:
        yield _MODE
    finally:
        restore_mode(previous)


def triton_module(op: str):
    """Import ``kernels.<op>.triton`` lazily so the reference path never needs Triton installed."""
    import importlib

    try:
        return importlib.import_module(f"kernels.{op}.triton")
    except ImportError as err:
        raise ImportError(
            f"kernel backend 'triton' needs the triton package for op {op!r}: pip install 'rlplat[gpu]' "
            f"(on a CPU machine set TRITON_INTERPRET=1 as well) ({err})"
        ) from err
