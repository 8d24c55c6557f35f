"""Public linear-attention op: validates, then dispatches by the kernel mode (see ``kernels/__init__.py``)."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_ndim, check_shape
from kernels.linear_attention import reference


def linear_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    lengths_B: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention over a prefill (T ≥ 1) or a decode step (T = 1) continuing from ``initial_state``.

    Returns (o [B,T,H,D], state [B,H,D,D] fp32). ``lengths_B`` gives each right-padded sequence's true length,
    so the returned state is the one after its last real token.
    """
    check_ndim("q", q_BTHD, 4, "B, T, H, D")
    for name, t in (("q", q_BTHD), ("k", k_BTHD), ("v", v_BTHD)):
        check_float(name, t)
    check_shape("k", k_BTHD, tuple(q_BTHD.shape), "B, T, H, D (same as q)")
    check_shape("v", v_BTHD, tuple(q_BTHD.shape), "B, T, H, D (same as q)")
    B, _, H, D = q_BTHD.shape
    check_shape("log_decay", log_decay_H, (H,), "H")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (B, H, D, D), "B, H, D, D")
    if lengths_B is not None:
        check_shape("lengths", lengths_B, (B,), "B")
    mode = kernels.get_mode()
    if mode.batch_invariant or lengths_B is not None:
        return reference.recurrent_linear_attention(
            q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, initial_state, lengths_B
        )
    if mode.backend == "triton":
        impl = kernels.triton_module("linear_attention")
        return impl.chunk_linear_attention(
            q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, initial_state, chunk_size
        )
    return reference.chunk_linear_attention(
        q_BTHD, k_BTHD, v_BTHD, log_decay_H, scale, initial_state, chunk_size
    )
