"""Parity of the Triton group-RMSNorm sigmoid gate (forward and backward) with an fp32 torch formula."""

from __future__ import annotations

import os

import pytest
import torch

import kernels._buffers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.group_norm_gate import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
# (shape of o, num_groups): Cg = 16, 32, 24 (not a power of two), 48, 256.
CASES = [((3, 64), 4), ((2, 5, 96), 3), ((7, 48), 2), ((1, 63, 192), 4), ((4, 2048), 8)]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def torch_group_rms_norm_gate(o, gate, w, num_groups, eps):
    of = o.float().unflatten(-1, (num_groups, -1))
    n = (of / torch.sqrt(of.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    return (n * w.float() * torch.sigmoid(gate.float())).to(o.dtype)


def run_both(shape, num_groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = (torch.randn(shape, generator=g) * 2).to(dtype).to(DEVICE)
    gate = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    results = []
    for fn in (impl.group_rms_norm_gate, torch_group_rms_norm_gate):
        oi, gi, wi = (t.clone().requires_grad_() for t in (o, gate, w))
        y = fn(oi, gi, wi, num_groups, EPS)
        y.backward(dy)
        results.append((y.detach(), oi.grad, gi.grad, wi.grad))
    return results


# fp32 tolerance: only the reduction order differs from torch; 1e-5 relative leaves ~100 ulps of headroom.
@pytest.mark.parametrize("shape,num_groups", CASES)
def test_forward_backward_fp32(shape, num_groups):
    ours, ref = run_both(shape, num_groups, torch.float32)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref[0].shape
    for name, a, b in zip(("y", "do", "dgate", "dw"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def test_row_result_independent_of_batch():
    g = torch.Generator().manual_seed(3)
    o, gate = torch.randn(2, 2, 41, 64, generator=g).to(DEVICE)
    w = torch.rand(64, generator=g).to(DEVICE)
    full = impl.group_rms_norm_gate(o, gate, w, 4, EPS)
    assert torch.equal(impl.group_rms_norm_gate(o[:, 7:9], gate[:, 7:9], w, 4, EPS), full[:, 7:9])


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("shape,num_groups", CASES)
def test_gpu_bf16(shape, num_groups):
    # bf16 outputs carry 8 mantissa bits: one rounding of each result is ~4e-3 relative.
    ours, ref = run_both(shape, num_groups, torch.bfloat16)
    for name, a, b in zip(("y", "do", "dgate", "dw"), ours, ref):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))
