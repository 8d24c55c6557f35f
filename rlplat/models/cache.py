"""Per-sequence decode state: a growing KV cache for softmax layers, the fp32 recurrent state for linear ones.

Legend: B sequences, L cached tokens (capacity), G kv heads, H heads, D head dim.
Rows are sequences, so an engine can select, drop and concatenate rows (``select`` / ``concat``) as sequences
leave and join the batch. A row's numbers do not depend on the others, and the attention kernels ignore
capacity beyond each row's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    state_BHDD: torch.Tensor | None = None  # linear attention
    k_BLGD: torch.Tensor | None = None  # softmax attention
    v_BLGD: torch.Tensor | None = None


@dataclass
class ModelCache:
    lengths_B: torch.Tensor  # tokens already processed per sequence
    layers: list[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, batch: int, num_layers: int, device: torch.device | str = "cpu") -> ModelCache:
        return cls(
            torch.zeros(batch, dtype=torch.long, device=device), [LayerCache() for _ in range(num_layers)]
        )

    def select(self, rows: torch.Tensor) -> ModelCache:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        layers = [LayerCache(pick(c.state_BHDD), pick(c.k_BLGD), pick(c.v_BLGD)) for c in self.layers]
        return ModelCache(self.lengths_B[rows], layers)

    @staticmethod
    def concat(caches: list[ModelCache]) -> ModelCache:
        def cat(ts: list[torch.Tensor | None], pad_dim: int | None = None) -> torch.Tensor | None:
            if all(t is None for t in ts):
                return None
            if any(t is None for t in ts):
                raise ValueError("cannot concatenate caches of which only some have run a prefill")
            if pad_dim is not None:
                cap = max(t.shape[pad_dim] for t in ts)
                ts = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, cap - t.shape[pad_dim])) for t in ts]
            return torch.cat(ts)

        num_layers = len(caches[0].layers)
        layers = [
            LayerCache(
                cat([c.layers[i].state_BHDD for c in caches]),
                cat([c.layers[i].k_BLGD for c in caches], pad_dim=1),
                cat([c.layers[i].v_BLGD for c in caches], pad_dim=1),
            )
            for i in range(num_layers)
        ]
        return ModelCache(torch.cat([c.lengths_B for c in caches]), layers)
