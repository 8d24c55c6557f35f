"""Which experts each token is routed to, recorded from outside the model: forward hooks on the MoE routers.

Applied from outside the architecture, as ``rlplat.train.experts.ExpertLoadCounter`` counts expert load: the
hook re-runs the routing function on the router's fp32 logits (same function, same inputs, so the same
expert ids as the model's own call). Hooks exist only inside ``recording()``, so a model that is not being
recorded pays nothing. The rollout engine records each sampled token's experts, the trainer those of the
same tokens in its training forward; ``routing_disagreement`` compares them.

Legend: N tokens of one forward (B·T flattened, row-major), L MoE layers, k experts per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from kernels.moe_routing import group_limited_topk
from rlplat.models.ring_linear import MoE

ROUTE_DTYPE = torch.int16  # expert ids; production models have 256 experts


class RoutingRecorder:
    """Records, during ``recording()``, the top-k expert ids of every token in each MoE layer of ``model``."""

    def __init__(self, model: nn.Module):
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.k = self.moes[0].cfg.num_experts_per_tok if self.moes else 0
        self._ids: list[torch.Tensor | None] = [None] * len(self.moes)

    @contextlib.contextmanager
    def recording(self) -> Iterator[RoutingRecorder]:
        handles = [moe.gate.register_forward_hook(self._hook(i)) for i, moe in enumerate(self.moes)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def take_shape(self) -> tuple[int, int]:
        """(L, k): the trailing shape of what ``take`` returns."""
        return len(self.moes), self.k

    def take(self, num_tokens: int) -> torch.Tensor:
        """Expert ids [N, L, k] of the last forward recorded (``num_tokens`` = N), and forget them."""
        if not self.moes:
            return torch.zeros(num_tokens, 0, 0, dtype=ROUTE_DTYPE)
        missing = [i for i, ids in enumerate(self._ids) if ids is None]
        assert not missing, f"MoE layers {missing} were not run while recording"
        ids_NLk = torch.stack(self._ids, dim=1)  # type: ignore[arg-type]
        assert ids_NLk.shape[0] == num_tokens, (ids_NLk.shape, num_tokens)
        self._ids = [None] * len(self.moes)
        return ids_NLk

    def _hook(self, i: int):
        cfg = self.moes[i].cfg

        def hook(router: nn.Module, inputs, logits_NE: torch.Tensor) -> None:
            self._ids[i] = chosen_experts(cfg, router, logits_NE).to(ROUTE_DTYPE)

        return hook


def chosen_experts(cfg, router: nn.Module, logits_NE: torch.Tensor) -> torch.Tensor:
    """[N, k] expert ids the MoE layer of ``cfg`` picks from its router's output (what a forward hook on the
    router sees): the model's own routing function, recomputed without gradient."""
    with torch.no_grad():
        _, ids_Nk = group_limited_topk(
            logits_NE.detach(),
            router.expert_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
        )
    return ids_Nk


def routing_differs(a_NLk: torch.Tensor, b_NLk: torch.Tensor) -> torch.Tensor:
    """Bool [N, L]: whether the two recordings chose different expert SETS (the order within k is irrelevant:
    the expert outputs are weighted and summed)."""
    if a_NLk.shape != b_NLk.shape:
        raise ValueError(f"routing records of shapes {tuple(a_NLk.shape)} and {tuple(b_NLk.shape)} differ")
    return (a_NLk.sort(dim=-1).values != b_NLk.sort(dim=-1).values).any(dim=-1)
