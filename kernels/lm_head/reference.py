"""Fused LM head: per-token log-prob of a target and entropy, in fp32, one chunk of rows at a time.

Legend: N tokens, D hidden, V vocab, c rows per chunk.
z = (h · Wᵀ) / temperature (fp32); logp(y) = z_y − logsumexp(z); entropy = −Σ p·log p with p = softmax(z).
Forward and backward both walk the rows in chunks and recompute the chunk's logits, so at most one
[c, V] block of logits (plus its softmax) is alive, never [N, V]. Backward, with p = softmax(z) and
H the entropy: ∂logp/∂z = onehot(y) − p, ∂H/∂z_k = −p_k (log p_k + H).
"""

from __future__ import annotations

import torch

from kernels.batch_invariant import linear as invariant_linear
from kernels.batch_invariant.reference import tree_sum


def _chunk_stats(h: torch.Tensor, w: torch.Tensor, temperature: float, invariant: bool):
    z = (invariant_linear(h.float(), w) if invariant else h.float() @ w.t()) / temperature
    zmax = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - zmax)
    total = tree_sum(e, dim=-1) if invariant else e.sum(-1)
    lse = zmax[:, 0] + torch.log(total)
    return z, lse


class _FusedLMHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, temperature, chunk_rows, invariant):
        w = w_VD.float()
        logp = h_ND.new_empty(h_ND.shape[0], dtype=torch.float32)
        entropy = torch.empty_like(logp)
        for r0 in range(0, h_ND.shape[0], chunk_rows):
            z, lse = _chunk_stats(h_ND[r0 : r0 + chunk_rows], w, temperature, invariant)
            t = targets_N[r0 : r0 + chunk_rows]
            logp[r0 : r0 + chunk_rows] = z.gather(1, t[:, None])[:, 0] - lse
            # −Σ p·(z − lse), not lse − Σ p·z: the latter cancels two numbers of the size of the logits
            log_p = z - lse[:, None]
            plogp = torch.exp(log_p) * log_p
            entropy[r0 : r0 + chunk_rows] = -(tree_sum(plogp, dim=-1) if invariant else plogp.sum(-1))
        ctx.save_for_backward(h_ND, w_VD, targets_N, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.invariant = temperature, chunk_rows, invariant
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        h_ND, w_VD, targets_N, entropy = ctx.saved_tensors
        w = w_VD.float()
        grad_h = torch.zeros_like(h_ND, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for r0 in range(0, h_ND.shape[0], ctx.chunk_rows):
            rows = slice(r0, r0 + ctx.chunk_rows)
            h = h_ND[rows].float()
            z, lse = _chunk_stats(h_ND[rows], w, ctx.temperature, ctx.invariant)
            log_p = z - lse[:, None]
            p = torch.exp(log_p)
            g_z = -p * (log_p + entropy[rows, None]) * g_entropy[rows, None]
            g_z = g_z - p * g_logp[rows, None]
            g_z.scatter_add_(1, targets_N[rows, None], g_logp[rows, None])
            g_z = g_z / ctx.temperature
            if grad_h is not None:
                grad_h[rows] = g_z @ w
            if grad_w is not None:
                grad_w += g_z.t() @ h
        grad_h = grad_h.to(h_ND.dtype) if grad_h is not None else None
        grad_w = grad_w.to(w_VD.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def lm_head_logprobs(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = 256,
    invariant: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FusedLMHead.apply(h_ND, w_VD, targets_N, temperature, chunk_rows, invariant)


def lm_head_logits(h_ND: torch.Tensor, w_VD: torch.Tensor, invariant: bool = True) -> torch.Tensor:
    """Full fp32 logits (sampling needs them for the last position only; tests use them whole)."""
    return invariant_linear(h_ND.float(), w_VD.float()) if invariant else h_ND.float() @ w_VD.float().t()
