"""ShardedAdamW with one rank is torch's AdamW on fp32 masters, bitwise; its state round-trips per parameter.
(Two ranks: tests/train/test_dist.py and the Megatron layouts in tests/train/megatron.)"""

import pytest
import torch
from torch import nn

from rlplat.train.dist import DataParallel
from rlplat.train.optim import ShardedAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(dtype: torch.dtype) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,), (33, 9)]  # odd sizes: buckets do not align with anything
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(step: int, params: list[nn.Parameter]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_is_torch_adamw_on_fp32_masters(dtype):
    params = _params(dtype)
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW(
        [
            {"params": [m for m in masters if m.dim() >= 2], "weight_decay": HYPER["weight_decay"]},
            {"params": [m for m in masters if m.dim() < 2], "weight_decay": 0.0},
        ],
        lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
    )  # fmt: skip
    opt = ShardedAdamW(params, lambda i: DataParallel(), **HYPER)
    for step in range(3):
        grads = _grads(step, params)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = g.to(dtype)
            opt.accumulate(i)
            masters[i].grad = g.to(dtype).float()
        opt.step(HYPER["lr"])
        reference.step()
        for p, m in zip(params, masters, strict=True):
            assert torch.equal(p, m.detach().to(dtype))
        assert not any(g.any() for g in opt.grads())  # the buffers start the next step from zero
    state = opt.state_dict()
    assert state["step"] == 3
    for i, m in enumerate(masters):
        assert torch.equal(state["master"][i], m.detach())
        assert torch.equal(state["exp_avg"][i], reference.state[m]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"][i], reference.state[m]["exp_avg_sq"])


def test_state_round_trips_and_old_format_is_refused():
    params = _params(torch.float32)
    opt = ShardedAdamW(params, lambda i: DataParallel(), **HYPER)
    for i, (p, g) in enumerate(zip(params, _grads(0, params), strict=True)):
        p.grad = g
        opt.accumulate(i)
    opt.step(HYPER["lr"])
    saved = opt.state_dict()
    fresh = ShardedAdamW(_params(torch.float32), lambda i: DataParallel(), **HYPER)
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again["step"] == 1
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a, b) for a, b in zip(again[key], saved[key], strict=True)), key
    with pytest.raises(ValueError, match="predates sharded optimizer state"):
        fresh.load_state_dict({"state": {}, "param_groups": []})  # torch AdamW's own format (older rlplat)
