"""Per-sequence decode state: a growing KV cache for softmax layers, the linear-attention state for linear ones.

Legend: B sequences, L cached tokens (capacity), G kv heads, H heads, D head dim, C linear-attention chunk size.
Rows are sequences, so an engine can select, drop and concatenate rows (``select`` / ``concat``) as sequences
leave and join the batch. A row's numbers do not depend on the others, and the attention kernels ignore
capacity beyond each row's length.

The layouts are the kernels' own, so a decode step reads them without a copy:
- softmax layers keep keys as fp32 [B, G, L, D] and values as fp32 [B, G, L, D + ONES_COLUMNS], each value
  followed by ones (exact for any model dtype: attention computes in fp32; the block-aligned form gets its row
  sums from the ones in the GEMM with the values), L the whole key blocks of ``kernels.softmax_attention`` that
  the longest row fills;
- linear layers keep what ``kernels.linear_attention`` returns for the kernel mode: in batch-invariant mode a
  ``ChunkState`` (fp32 state at the current chunk's start, plus the chunk's keys and values so far), in the
  plain mode the fp32 state after the last token (``state_BHDD`` alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.linear_attention import ChunkState
from kernels.softmax_attention.reference import KEY_BLOCK, ONES_COLUMNS, values_with_ones


def kv_capacity(tokens: int) -> int:
    """The KV cache's capacity for ``tokens`` positions: the whole key blocks they fill, no more (see
    ``LayerCache.append_kv``)."""
    return -(-tokens // KEY_BLOCK) * KEY_BLOCK


@dataclass
class LayerCache:
    state_BHDD: torch.Tensor | None = (
        None  # linear attention: chunk-start state (invariant) or last state (plain)
    )
    keys_BHCD: torch.Tensor | None = None  # linear attention, invariant mode: the current chunk's keys ...
    values_BHCD: torch.Tensor | None = None  # ... and values (zero beyond its fill)
    k_BGLD: torch.Tensor | None = None  # softmax attention, fp32
    v_BGLD: torch.Tensor | None = None  # ... [B, G, L, D + ONES_COLUMNS]: each value followed by ones

    def linear_state(self) -> ChunkState | torch.Tensor | None:
        if self.state_BHDD is None:
            return None
        if self.keys_BHCD is None:
            return self.state_BHDD
        return ChunkState(self.state_BHDD, self.keys_BHCD, self.values_BHCD)

    def set_linear_state(self, state: ChunkState | torch.Tensor) -> None:
        if isinstance(state, ChunkState):
            self.state_BHDD, self.keys_BHCD, self.values_BHCD = state
        else:
            self.state_BHDD, self.keys_BHCD, self.values_BHCD = state, None, None

    def append_kv(
        self, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, positions_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at their absolute positions; return the whole cache as views, keys [B, L, G, D]
        and values [B, L, G, D + ONES_COLUMNS] (``kernels.softmax_attention`` takes them as they are)."""
        B, T, G, D = k_BTGD.shape
        need = int(positions_BT.max()) + 1 if positions_BT.numel() else 0
        if self.k_BGLD is None:
            self.k_BGLD = k_BTGD.new_zeros(B, G, 0, D, dtype=torch.float32)
            self.v_BGLD = v_BTGD.new_zeros(B, G, 0, D + ONES_COLUMNS, dtype=torch.float32)
        elif self.v_BGLD.shape[-1] != D + ONES_COLUMNS:
            raise ValueError(
                f"KV cache values are [..., {self.v_BGLD.shape[-1]}] but this layout keeps D + {ONES_COLUMNS} = "
                f"{D + ONES_COLUMNS} columns (each value followed by ones): a cache from before that layout; "
                "rebuild it (a prefill), or convert its values with kernels.softmax_attention.reference."
                "values_with_ones"
            )
        capacity = self.k_BGLD.shape[2]
        if capacity < need:
            # exactly the key blocks the longest row needs, not a doubling: a decode step batches its GEMMs over
            # (kv head, key block), which views [G, L, D] memory in place only when L is the blocks it reads;
            # spare blocks would make every step copy the visible keys and values, where growing copies the
            # cache once per KEY_BLOCK tokens
            grown = kv_capacity(need)
            self.k_BGLD = torch.nn.functional.pad(self.k_BGLD, (0, 0, 0, grown - capacity))
            self.v_BGLD = torch.nn.functional.pad(self.v_BGLD, (0, 0, 0, grown - capacity))
        rows = torch.arange(B, device=k_BTGD.device)[:, None].expand(B, T)
        # [B, T, G, D] written at (row, :, position): index with (row, position) on the [B, L, G, D] view
        self.k_BGLD.transpose(1, 2)[rows, positions_BT] = k_BTGD.float()
        self.v_BGLD.transpose(1, 2)[rows, positions_BT] = values_with_ones(v_BTGD)
        return self.k_BGLD.transpose(1, 2), self.v_BGLD.transpose(1, 2)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.state_BHDD, self.keys_BHCD, self.values_BHCD, self.k_BGLD, self.v_BGLD)


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
        """The cache of ``rows`` only; the KV capacity shrinks to the key blocks the longest kept row fills
        (see ``LayerCache.append_kv``), in the copy that selecting rows makes anyway."""
        lengths_B = self.lengths_B[rows]
        kept = kv_capacity(int(lengths_B.max())) if len(lengths_B) else 0

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        def pick_kv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows, :, :kept]

        layers = []
        for c in self.layers:
            *linear, k, v = c.tensors()
            layers.append(LayerCache(*(pick(t) for t in linear), pick_kv(k), pick_kv(v)))
        return ModelCache(lengths_B, layers)

    @staticmethod
    def concat(caches: list[ModelCache]) -> ModelCache:
        def cat(ts: list[torch.Tensor | None], pad_dim: int | None = None) -> torch.Tensor | None:
            if all(t is None for t in ts):
                return None
            if any(t is None for t in ts):
                raise ValueError("cannot concatenate caches of which only some have run a prefill")
            if pad_dim is not None:
                cap = max(t.shape[pad_dim] for t in ts)
                ts = [torch.nn.functional.pad(t, (0, 0, 0, cap - t.shape[pad_dim])) for t in ts]
            return torch.cat(ts)

        num_layers = len(caches[0].layers)
        layers = []
        for i in range(num_layers):
            per_field = list(zip(*(c.layers[i].tensors() for c in caches)))
            *linear, k, v = per_field
            layers.append(LayerCache(*(cat(list(t)) for t in linear), cat(list(k), 2), cat(list(v), 2)))
        return ModelCache(torch.cat([c.lengths_B for c in caches]), layers)
