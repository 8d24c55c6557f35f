"""Aux-loss-free expert load balancing (Ling 2.0, after DeepSeek-V3): count tokens per expert, nudge the bias.

Legend: E experts, N tokens, k experts per token. Per MoE layer, with load_i the number of tokens routed to
expert i over the step's batch (all micro-batches and data-parallel ranks):

    e_i = mean_j load_j − load_i,    b_i ← b_i + u · (sign(e_i) − mean_j sign(e_j))

so under-loaded experts gain selection bias and over-loaded ones lose it; subtracting the mean sign keeps
the biases centred. The bias only affects which experts are chosen, never the mixing weights.

The counts come from a forward hook on each ``MoE.gate`` (the router) that re-runs the routing function on
the router's logits: same function, same inputs, so the same expert ids as the model's own call. The model
file is untouched. Only real tokens (prompt and response, not padding) are counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rlplat.models.ring_linear import MoE
from rlplat.models.routing import chosen_experts


def expert_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """The new bias b + u·(sign(e) − mean sign(e)), e = mean load − load (fp32, same device as ``bias_E``)."""
    load = load_E.to(device=bias_E.device, dtype=torch.float32)
    sign_E = torch.sign(load.mean() - load)
    return bias_E + rate * (sign_E - sign_E.mean())


class ExpertLoadCounter:
    """Counts routed tokens per expert in every MoE layer while ``counting(valid_BT)`` is active."""

    moe_types: tuple[type, ...] = (MoE,)  # modules with ``cfg`` and a ``gate`` router (``Router``)

    def __init__(self, model: nn.Module):
        self.moes = {name: m for name, m in model.named_modules() if isinstance(m, self.moe_types)}
        self.counts: dict[str, torch.Tensor] = {}
        self._valid_N: torch.Tensor | None = None
        self._active = False
        self._handles = [moe.gate.register_forward_hook(self._hook(name)) for name, moe in self.moes.items()]
        self.reset()

    def reset(self) -> None:
        self.counts = {
            name: torch.zeros(m.cfg.num_experts, dtype=torch.long, device=m.gate.expert_bias.device)
            for name, m in self.moes.items()
        }

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def counting(self, valid_BT: torch.Tensor) -> Iterator[None]:
        """Count during this block, only tokens where ``valid_BT`` (the forward's [B, T] input) is True."""
        self._valid_N, self._active = valid_BT.reshape(-1), True
        try:
            yield
        finally:
            self._valid_N, self._active = None, False

    def _hook(self, name: str):
        moe = self.moes[name]

        def hook(router: nn.Module, inputs, logits_NE: torch.Tensor) -> None:
            if not self._active:
                return
            ids_Nk = chosen_experts(moe.cfg, router, logits_NE)
            if self._valid_N is not None:
                ids_Nk = ids_Nk[self.routed_rows(self._valid_N).to(ids_Nk.device)]
            self.counts[name] += torch.bincount(ids_Nk.reshape(-1), minlength=moe.cfg.num_experts)

        return hook

    def routed_rows(self, valid_N: torch.Tensor) -> torch.Tensor:
        """Which rows the router saw are real tokens, from the forward's flattened mask: all of them here."""
        return valid_N

    @torch.no_grad()
    def apply_update(self, rate: float) -> None:
        """Apply the bias update from the current counts (sum them over ranks first: ``reduce_expert_counts``)."""
        for name, moe in self.moes.items():
            bias = moe.gate.expert_bias
            bias.copy_(expert_bias_update(bias, self.counts[name], rate))

    def imbalance(self) -> float:
        """Mean over MoE layers of max load / mean load (1.0 is perfectly balanced; 0 with no MoE layer)."""
        ratios = self.load_ratios()
        return float(torch.stack(ratios).mean()) if ratios else 0.0

    def load_ratios(self) -> list[torch.Tensor]:
        """max load / mean load of each MoE layer that routed tokens."""
        return [
            c.max().float() / c.float().mean().clamp_min(1e-9) for c in self.counts.values() if c.sum() > 0
        ]
