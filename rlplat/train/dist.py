"""Data parallelism for the trainer: every rank holds the whole model and a contiguous slice of the batch.

Each rank receives the same global ``TrainBatch`` and computes the same advantages, filters and shard plan
(cheap, and it keeps group statistics global), then trains on its own rows. Per optimizer step there are
three SUM all-reduces — the loss normaliser (``rlplat.algos.aggregation``), the gradients and the expert
token counts — plus one MAX for the non-finite-loss flag and one SUM for the metrics, and the all-gather of
the updated weights from the ranks' optimizer shards (``rlplat.train.optim``; one per bucket). Summing per-rank
gradients of losses that are already divided by the global normaliser gives exactly the single-process
gradient of the whole batch, up to fp32 summation order.

``gloo`` on CPU, ``nccl`` on GPU (NCCL needs CUDA tensors: reductions happen on the model's device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist


class GradBuffers(Protocol):
    """What the gradient reduction needs of the optimizer (``rlplat.train.optim.ShardedAdamW``, which builds
    on this module, so it is named by its shape here)."""

    def all_reduce_grads(self) -> None: ...


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group (world_size 1: no communication at all)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed group (None: the default group); Megatron's data-parallel group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, num_rows: int) -> torch.Tensor:
        """Row indices of this rank: contiguous, sizes differ by at most one (a rank may get none)."""
        return torch.tensor_split(torch.arange(num_rows), self.world_size)[self.rank]

    def shard_group(self, param_index: int) -> DataParallel:
        """The ranks that share parameter ``param_index``'s optimizer state (``rlplat.train.optim``): all."""
        return self

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (SUM or MAX); returns ``t``. A no-op for one rank."""
        if self.enabled:
            reduce_op = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}[op]
            torch_dist.all_reduce(t, op=reduce_op, group=self.group)
        return t

    def all_reduce_tensors(self, tensors: list[torch.Tensor]) -> None:
        """SUM-all-reduce several tensors of one dtype and device through one flat buffer."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def all_reduce_grads(self, optimizer: GradBuffers) -> None:
        """SUM the fp32 gradients over ranks, in place in the optimizer's flat buffers."""
        optimizer.all_reduce_grads()

    def reduce_expert_counts(self, counts: list[torch.Tensor]) -> None:
        """Tokens per expert counted on this rank → over the whole step's batch (in place)."""
        self.all_reduce_tensors(counts)

    def barrier(self) -> None:
        """Wait for every rank of the group (a no-op for one rank)."""
        if self.enabled:
            torch_dist.barrier(group=self.group)


def init_data_parallel(
    rank: int,
    world_size: int,
    backend: str = "auto",
    master_addr: str | None = None,
    master_port: int | None = None,
) -> DataParallel:
    """Join (or create) the default process group; ``auto`` picks nccl with CUDA, gloo otherwise."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if world_size == 1:
        return DataParallel()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown torch.distributed backend {backend!r}; choose gloo or nccl")
    if not torch_dist.is_initialized():
        if master_addr is not None:
            os.environ["MASTER_ADDR"] = master_addr
        if master_port is not None:
            os.environ["MASTER_PORT"] = str(master_port)
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("data parallelism needs MASTER_ADDR and MASTER_PORT (or pass them)")
        torch_dist.init_process_group(backend, rank=rank, world_size=world_size)
    elif torch_dist.get_world_size() != world_size or torch_dist.get_rank() != rank:
        raise ValueError(
            f"torch.distributed is already initialised as rank {torch_dist.get_rank()} of "
            f"{torch_dist.get_world_size()}, not {rank} of {world_size}"
        )
    return DataParallel(rank=rank, world_size=world_size)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for local multi-process runs and tests)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
