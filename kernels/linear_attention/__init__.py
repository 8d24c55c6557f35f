"""Public linear-attention op: validates, then dispatches by the kernel mode (see ``kernels/__init__.py``).

The decode state's layout follows the mode: batch-invariant mode keeps a :class:`ChunkState` (S at the chunk
boundary plus the chunk's keys and values so far, see ``reference.py``), the plain mode a bare fp32 [B, H, D, D]
state after the last token. A state of the other layout is refused, never reinterpreted.
"""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_ndim, check_shape
from kernels.linear_attention import reference
from kernels.linear_attention.reference import ChunkState, empty_state

__all__ = ["ChunkState", "empty_state", "linear_attention"]

State = ChunkState | torch.Tensor


def linear_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    state: State | None = None,
    start_B: torch.Tensor | None = None,
    lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Linear attention over T new tokens per row.

    Training: no ``state`` and no ``lengths_B``; the tokens are positions 0..T-1 and no state is returned.
    Rollout: row b continues at absolute position ``start_B[b]`` (default 0) from ``state`` (default empty),
    ``lengths_B[b]`` of its T tokens are real (right padding; default T), and the state after them is returned.
    Returns (o [B, T, H, D] in q's dtype, state or None).
    """
    check_ndim("q", q_BTHD, 4, "B, T, H, D")
    for name, t in (("q", q_BTHD), ("k", k_BTHD), ("v", v_BTHD)):
        check_float(name, t)
    check_shape("k", k_BTHD, tuple(q_BTHD.shape), "B, T, H, D (same as q)")
    check_shape("v", v_BTHD, tuple(q_BTHD.shape), "B, T, H, D (same as q)")
    if k_BTHD.dtype != q_BTHD.dtype or v_BTHD.dtype != q_BTHD.dtype:
        raise ValueError(
            f"linear_attention: q, k, v must share a dtype, got {q_BTHD.dtype}, {k_BTHD.dtype}, {v_BTHD.dtype}"
        )
    B, T, H, D = q_BTHD.shape
    check_shape("log_decay", log_decay_H, (H,), "H")
    for name, t in (("start", start_B), ("lengths", lengths_B)):
        if t is not None:
            check_shape(name, t, (B,), "B")
    if lengths_B is not None and T and (int(lengths_B.min()) < 0 or int(lengths_B.max()) > T):
        raise ValueError(f"linear_attention: lengths must be in [0, T={T}], got {lengths_B.tolist()}")
    mode = kernels.get_mode()
    rollout = state is not None or lengths_B is not None or start_B is not None
    if rollout and torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHD, k_BTHD, v_BTHD)):
        raise ValueError(
            "linear_attention: gradients flow only through the training form (positions 0..T-1, no state, "
            "no lengths); run rollout prefill and decode under torch.no_grad()"
        )
    if mode.batch_invariant:
        state = _check_chunk_state(state, B, H, D, mode.chunk_size)
        if mode.backend == "triton":
            impl = kernels.triton_module("linear_attention")
            return impl.aligned_linear_attention(
                q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, mode.chunk_size, state, start_B, lengths_B
            )
        return reference.aligned_linear_attention(
            q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, mode.chunk_size, state, start_B, lengths_B
        )
    state = _check_plain_state(state, B, H, D)
    return _plain(q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, state, lengths_B, mode, rollout)


def _plain(q, k, v, log_decay, scale, state, lengths_B, mode, rollout):
    if not rollout:
        # Training: from position 0 the chunk-aligned form *is* the chunked form, with its lean backward.
        if mode.backend == "triton":
            return kernels.triton_module("linear_attention").chunk_linear_attention(
                q, k, v, log_decay, scale, None, mode.chunk_size
            )[0], None
        return reference.AlignedLinearAttention.apply(q, k, v, log_decay, scale, mode.chunk_size), None
    if q.shape[1] == 1 and state is not None:
        return reference.recurrent_step(q, k, v, log_decay, scale, state, lengths_B)
    if mode.backend == "triton" and lengths_B is None:
        return kernels.triton_module("linear_attention").chunk_linear_attention(
            q, k, v, log_decay, scale, state, mode.chunk_size
        )
    return reference.chunk_linear_attention(q, k, v, log_decay, scale, state, mode.chunk_size, lengths_B)


def _check_chunk_state(state, B: int, H: int, D: int, C: int) -> ChunkState | None:
    if state is None:
        return None
    if not isinstance(state, ChunkState):
        raise ValueError(
            "linear_attention: this decode state has the old layout (one recurrent [B, H, D, D] state, from "
            "before chunk-aligned linear attention or from the plain kernel mode); batch-invariant mode keeps "
            "a ChunkState (chunk-start state, chunk keys and values). Drop the cache and prefill again"
        )
    check_shape("state.state", state.state_BHDD, (B, H, D, D), "B, H, D, D")
    if tuple(state.keys_BHCD.shape) != (B, H, C, D) or state.values_BHCD.shape != state.keys_BHCD.shape:
        raise ValueError(
            f"linear_attention: the decode state's chunk buffers are {tuple(state.keys_BHCD.shape)} and "
            f"{tuple(state.values_BHCD.shape)}, expected {(B, H, C, D)} [B, H, chunk, D]: it was made with "
            f"another chunk size than kernels.chunk_size={C}; use the same chunk size for the whole generation"
        )
    if state.state_BHDD.dtype != torch.float32:
        raise ValueError(
            f"linear_attention: the chunk-start state must be fp32, got {state.state_BHDD.dtype}"
        )
    return state


def _check_plain_state(state, B: int, H: int, D: int) -> torch.Tensor | None:
    if state is None:
        return None
    if isinstance(state, ChunkState):
        raise ValueError(
            "linear_attention: this decode state is a ChunkState from batch-invariant mode, but the kernel mode "
            "is plain; keep one mode for a whole generation (drop the cache and prefill again)"
        )
    check_shape("state", state, (B, H, D, D), "B, H, D, D")
    return state
