"""Parity of the Triton group-limited top-k router with a torch formulation (forward only, as the kernel)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels._buffers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.moe_routing import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
# (N, E, top_k, n_group, topk_group): top_k not a power of two, a single group, Ring-flash's 256/8/4/8.
CASES = [(37, 64, 6, 8, 4), (5, 16, 2, 4, 2), (70, 256, 8, 8, 4), (3, 8, 3, 1, 1), (1, 32, 5, 4, 3)]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def torch_route(logits, bias, top_k, n_group, topk_group, scaling, norm=True):
    n, e = logits.shape
    scores = torch.sigmoid(logits.float())
    biased = scores + bias
    top2 = torch.sort(biased.view(n, n_group, -1), dim=-1, descending=True).values[..., :2]
    keep = stable_topk(top2.sum(-1), topk_group)
    group_mask = torch.zeros(n, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
    eligible = group_mask.repeat_interleave(e // n_group, dim=1)
    ids = stable_topk(biased.masked_fill(~eligible, float("-inf")), top_k)
    w = scores.gather(1, ids)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, ids


def check(logits, bias, case, norm):
    _, _, top_k, n_group, topk_group = case
    w, ids = impl.group_limited_topk(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    rw, rids = torch_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    # Sigmoid is exp-based in both but not bit-identical across libms: a few ulps.
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_random_logits(case, norm):
    n, e = case[:2]
    g = torch.Generator().manual_seed(e + n)
    logits = torch.randn(n, e, generator=g).to(DEVICE)
    bias = (0.1 * torch.randn(e, generator=g)).to(DEVICE)
    check(logits, bias, case, norm)


@pytest.mark.parametrize("case", CASES)
def test_ties_go_to_lower_expert_and_group(case):
    # Logits from four values make equal biased scores and equal group scores common. Only equal values tie:
    # no two different pairs of sigmoid(0..3) sum alike (from -2..1, sigmoid(1) + sigmoid(-1) = 2 sigmoid(0)
    # would tie or not by an ulp of the GPU's sigmoid, which is not torch's).
    n, e = case[:2]
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 4, (n, e), generator=g).float().to(DEVICE)
    check(logits, torch.zeros(e, device=DEVICE), case, True)


def test_row_result_independent_of_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 64, generator=g).to(DEVICE)
    bias = torch.randn(64, generator=g).to(DEVICE)
    w, ids = impl.group_limited_topk(logits, bias, 6, 8, 4, 1.0)
    w1, ids1 = impl.group_limited_topk(logits[17:18], bias, 6, 8, 4, 1.0)
    assert torch.equal(ids1, ids[17:18]) and torch.equal(w1, w[17:18])


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_gpu_compiled(case):
    # The router is fp32 by design (DESIGN.md), so the GPU variant is the same check compiled for real.
    n, e = case[:2]
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, e, generator=g).to(DEVICE)
    bias = (0.1 * torch.randn(e, generator=g)).to(DEVICE)
    check(logits, bias, case, True)


@pytest.mark.parametrize("norm", [True, False])
def test_public_op_on_triton_backend_has_the_router_gradient(norm):
    """The kernel is forward-only; the public op gives the combine weights their gradient w.r.t. the logits."""
    import kernels
    from kernels.moe_routing import group_limited_topk

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 16, generator=g, dtype=torch.float64).float().to(DEVICE).requires_grad_()
    bias = (torch.randn(16, generator=g) * 0.05).to(DEVICE)
    upstream = torch.randn(9, 4, generator=g).to(DEVICE)
    with kernels.kernel_mode(backend="triton"):
        w, ids = group_limited_topk(logits, bias, 4, 4, 2, 2.5, norm)
    (grad,) = torch.autograd.grad((w * upstream).sum(), logits)
    rw, rids = torch_route(logits, bias, 4, 4, 2, 2.5, norm)
    assert torch.equal(ids, rids)
    (want,) = torch.autograd.grad((rw * upstream).sum(), logits)
    # the two differ only by the forward's few-ulp sigmoid difference, carried through products of O(1) terms
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
