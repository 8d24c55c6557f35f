"""AdamW on fp32 master weights, sharded over data-parallel ranks: the layout of Megatron's distributed
optimizer (ZeRO stage 1), for both trainer backends.

Parameters are put in buckets by (data-parallel group, weight decay): the whole model's group for the torch
backend; for Megatron, dense tensors over the data-parallel group and routed experts over the
expert-data-parallel group, whose ranks hold the same experts. A bucket keeps

- one flat fp32 gradient buffer for all its parameters (every rank, all of it): micro-batch gradients are
  added into it and summed over the bucket's group in place (``all_reduce_grads``);
- the fp32 master weights and AdamW's two moments of a contiguous 1/W of it (W ranks in its group).

After AdamW updates its slice, each rank all-gathers the updated slices into the gradient buffer, which is
spent by then, and every rank writes the whole weights into its parameters, rounded once to their dtype.
Memory per parameter: 4 bytes of gradient plus 12 / W of master and moments (16 with one rank). AdamW is
elementwise, so a slice's update is the one it would get unsharded: the weights do not depend on W.

``state_dict`` gathers masters and moments per parameter (a collective), so checkpoints do not depend on W.

Why not Megatron's ``DistributedOptimizer``: it accepts only CUDA tensors (``param.type()`` must be a
``torch.cuda.*Tensor``), takes its gradients from Megatron's ``DistributedDataParallel`` buffers and runs
its own clipping and loss-scale logic, where the trainer's step (NaN refusal, the global norm over
tensor/expert/pipeline shards) is shared by both backends and tested on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlplat.train.dist import DataParallel


@dataclass
class _Bucket:
    dp: DataParallel
    index: list[int]  # positions in the trainer's parameter list
    grad: torch.Tensor  # flat fp32, padded to a multiple of dp.world_size
    views: list[torch.Tensor]  # per-parameter views of ``grad``
    lo: int
    hi: int
    master: torch.Tensor = field(init=False)  # fp32 [hi - lo]: this rank's slice of the weights

    def take_slice(self, tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Write this rank's slice of the flattened ``tensors`` (one per parameter, any device and dtype) into
        ``out``, parameter by parameter (no flat copy of the whole bucket); padding stays zero."""
        out.zero_()
        offset = 0
        for t in tensors:
            lo, hi = max(self.lo, offset), min(self.hi, offset + t.numel())
            if lo < hi:
                out[lo - self.lo : hi - self.lo] = t.reshape(-1)[lo - offset : hi - offset]
            offset += t.numel()
        return out


class ShardedAdamW:
    """AdamW over ``params`` with masters and moments sharded as the module docstring says. ``group_of(i)``
    is the data-parallel group parameter ``i`` is sharded over (its gradient is reduced over that group)."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group_of: Callable[[int], DataParallel],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ):
        self.params = params
        device = params[0].device
        members: dict[tuple[int, bool], list[int]] = {}
        groups: dict[int, DataParallel] = {}
        for i, p in enumerate(params):
            dp = group_of(i)
            groups[id(dp)] = dp
            members.setdefault((id(dp), p.dim() >= 2), []).append(i)  # no decay on norms, biases, gains
        self.buckets: list[_Bucket] = []
        param_groups = []
        for (dp_id, decay), index in members.items():
            dp = groups[dp_id]
            sizes = [params[i].numel() for i in index]
            padded = -(-sum(sizes) // dp.world_size) * dp.world_size
            grad = torch.zeros(padded, dtype=torch.float32, device=device)
            views = [
                v.view_as(params[i]) for v, i in zip(grad[: sum(sizes)].split(sizes), index, strict=True)
            ]
            size = padded // dp.world_size
            bucket = _Bucket(dp, index, grad, views, dp.rank * size, (dp.rank + 1) * size)
            with torch.no_grad():
                master = torch.empty(size, dtype=torch.float32, device=device)
                bucket.master = bucket.take_slice([params[i].detach() for i in index], master)
            self.buckets.append(bucket)
            param_groups.append({"params": [master], "weight_decay": weight_decay if decay else 0.0})
        self.optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
        self._view = {i: v for b in self.buckets for i, v in zip(b.index, b.views, strict=True)}

    # Gradients

    def accumulate(self, i: int) -> None:
        """Add parameter ``i``'s gradient into its fp32 buffer and free it (once per micro-batch)."""
        p = self.params[i]
        self._view[i].add_(p.grad)
        p.grad = None

    def grads(self) -> list[torch.Tensor]:
        """The fp32 gradient of every parameter, in parameter order: views to reduce and clip in place."""
        return [self._view[i] for i in range(len(self.params))]

    def all_reduce_grads(self) -> None:
        """SUM each bucket's gradients over its group, in place in the flat buffer (one call a bucket)."""
        for b in self.buckets:
            if b.dp.world_size > 1:
                dist.all_reduce(b.grad, op=dist.ReduceOp.SUM, group=b.dp.group)

    def scale_grads(self, coef: torch.Tensor) -> None:
        """Multiply every gradient by ``coef`` (clipping by the global norm)."""
        for b in self.buckets:
            b.grad.mul_(coef)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for b in self.buckets:
            b.grad.zero_()

    # The update

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on this rank's slices of the (reduced, clipped) gradients, then every parameter updated."""
        for b, group in zip(self.buckets, self.optimizer.param_groups, strict=True):
            b.master.grad = b.grad[b.lo : b.hi]
            group["lr"] = lr
        self.optimizer.step()
        for b in self.buckets:
            b.master.grad = None
            # the gradients are spent: their buffer takes the gathered weights
            full = self._gather(b, b.master, b.grad)
            for i, view in zip(b.index, b.views, strict=True):
                self.params[i].copy_(view)
            full.zero_()  # the next step's gradients accumulate from zero

    def _gather(self, b: _Bucket, mine: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if b.dp.world_size == 1:
            out.copy_(mine)
        else:  # into the flat buffer itself: ranks' slices are consecutive, in rank order
            dist.all_gather_single(out, mine.contiguous(), group=b.dp.group)
        return out

    # Checkpoints: per parameter, whole (independent of the number of ranks)

    @torch.no_grad()
    def state_dict(self, keep: bool = True) -> dict[str, Any] | None:
        """Masters and moments per parameter, on the CPU. A collective: every rank of every group calls it;
        ranks that write nothing pass ``keep=False`` and get None (no host copy of the whole state)."""
        out: dict[str, Any] = {"step": self.steps, "master": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for b in self.buckets:
            state = self.optimizer.state.get(b.master, {})
            sizes = [v.numel() for v in b.views]
            for key in ("master", "exp_avg", "exp_avg_sq"):
                mine = b.master if key == "master" else state.get(key, torch.zeros_like(b.master))
                full = self._gather(b, mine, b.grad)  # spent between steps: zero before and after
                if keep:
                    for i, t in zip(b.index, full[: sum(sizes)].split(sizes), strict=True):
                        out[key][i] = t.view_as(self.params[i]).cpu().clone()
            b.grad.zero_()
        if not keep:
            return None
        for key in ("master", "exp_avg", "exp_avg_sq"):
            out[key] = [out[key][i] for i in range(len(self.params))]
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's slices of ``state_dict``'s per-parameter tensors (on any device)."""
        if "master" not in state:
            raise ValueError(
                "this checkpoint's optimizer state predates sharded optimizer state (rlplat.train.optim) and "
                "cannot be resumed; start a new run from its weights (checkpoint.export_hf, or the trainer's "
                "model state) instead"
            )
        for key in ("master", "exp_avg", "exp_avg_sq"):
            if len(state[key]) != len(self.params):
                raise ValueError(
                    f"optimizer state has {len(state[key])} {key} tensors for {len(self.params)} parameters"
                )
        step = int(state["step"])
        for b in self.buckets:
            slices = {
                key: b.take_slice([state[key][i] for i in b.index], torch.empty_like(b.master))
                for key in ("master", "exp_avg", "exp_avg_sq")
            }
            b.master.copy_(slices["master"])
            if step > 0:
                self.optimizer.state[b.master] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": slices["exp_avg"],
                    "exp_avg_sq": slices["exp_avg_sq"],
                }
            else:
                self.optimizer.state.pop(b.master, None)

    @property
    def steps(self) -> int:
        """AdamW steps taken (0 before the first, and after a refused first step)."""
        state = self.optimizer.state.get(self.buckets[0].master)
        return int(state["step"]) if state else 0
