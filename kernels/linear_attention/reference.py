"""Lightning-style linear attention with a per-head scalar decay (Ring-linear).

Legend: B batch, T time, H heads, D head dim (keys and values share it), C chunk size.
Per (b, h):  S_t = λ_h · S_{t-1} + k_tᵀ v_t   (S is [D_k, D_v], kept in fp32)
             o_t = scale · q_t S_t
``recurrent_linear_attention`` runs the recurrence token by token. It is the batch-invariant form, because a
decode step *is* one step of it and each step uses only elementwise products and :func:`tree_sum`.
``chunk_linear_attention`` is the classic chunked form (intra-chunk decay-masked attention plus an inter-chunk
state), which is faster for training but rounds differently from decode.
"""

from __future__ import annotations

import torch

from kernels.batch_invariant.reference import tree_sum


def recurrent_linear_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o [B,T,H,D] in q's dtype, state [B,H,D,D] fp32 after each sequence's ``lengths`` tokens, default T)."""
    B, T, H, D = q_BTHD.shape
    decay = torch.exp(log_decay_H.float()).view(1, H, 1, 1)
    if initial_state is None:
        state = q_BTHD.new_zeros(B, H, D, v_BTHD.shape[-1], dtype=torch.float32)
    else:
        state = initial_state.float()
    q, k, v = q_BTHD.float(), k_BTHD.float(), v_BTHD.float()
    final = state
    outs = []
    for t in range(T):
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(tree_sum(q[:, t, :, :, None] * state, dim=-2) * scale)
        if lengths_B is not None:
            final = torch.where((lengths_B == t + 1).view(B, 1, 1, 1), state, final)
    if lengths_B is None:
        final = state
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return o.to(q_BTHD.dtype), final


def chunk_linear_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    log_decay_H: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form of the same recurrence; differentiable through autograd. Returns (o, final state)."""
    B, T, H, D = q_BTHD.shape
    C = chunk_size
    g = log_decay_H.float().view(1, H, 1, 1)  # broadcast over [B, H, C, C]
    q = q_BTHD.float().transpose(1, 2)  # [B, H, T, D]
    k = k_BTHD.float().transpose(1, 2)
    v = v_BTHD.float().transpose(1, 2)
    state = q.new_zeros(B, H, D, v.shape[-1]) if initial_state is None else initial_state.float()
    outs = []
    for c0 in range(0, T, C):
        qc, kc, vc = q[:, :, c0 : c0 + C], k[:, :, c0 : c0 + C], v[:, :, c0 : c0 + C]
        n = qc.shape[2]
        idx = torch.arange(n, device=q.device, dtype=torch.float32)
        diff = idx[:, None] - idx[None, :]
        # clamp before exp so the masked (future) entries never overflow into inf * 0 in backward
        intra_decay = torch.where(diff >= 0, torch.exp(g * diff.clamp(min=0)), 0.0)  # [1, H, n, n]
        intra = ((qc @ kc.transpose(-1, -2)) * intra_decay) @ vc
        inter = (qc * torch.exp(g * (idx + 1)[:, None])) @ state
        outs.append((intra + inter) * scale)
        k_decayed = kc * torch.exp(g * (n - 1 - idx)[:, None])
        state = torch.exp(g * n) * state + k_decayed.transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return o.transpose(1, 2).to(q_BTHD.dtype), state
