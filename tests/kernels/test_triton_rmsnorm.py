"""Parity of the Triton RMSNorm (forward and backward) with an fp32 torch formula, and its batch invariance."""

from __future__ import annotations

import os

import pytest
import torch

import kernels._buffers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.rmsnorm import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
SHAPES = [(3, 48), (2, 5, 128), (4, 2048), (70, 96)]
EPS = 1e-6


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def torch_rms_norm(x, w, eps):
    xf = x.float()
    return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def run_both(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    results = []
    for fn in (impl.rms_norm, torch_rms_norm):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, EPS)
        y.backward(dy)
        results.append((y.detach(), xi.grad, wi.grad))
    return results


# fp32 tolerance: the kernel sums squares in its own order (and in dw over row blocks), so results differ
# from torch's by rounding only; 1e-5 relative is ~100 ulps of headroom.
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_fp32(shape):
    (y, dx, dw), (ry, rdx, rdw) = run_both(shape, torch.float32)
    assert y.dtype == torch.float32 and y.shape == ry.shape
    for name, a, b in (("y", y, ry), ("dx", dx, rdx), ("dw", dw, rdw)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def test_row_result_independent_of_batch():
    x = torch.randn(37, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w = torch.rand(128, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    full = impl.rms_norm(x, w, EPS)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 30)):
        assert torch.equal(impl.rms_norm(x[rows], w, EPS), full[rows])


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_bf16(shape):
    # bf16 outputs carry 8 mantissa bits: one rounding of y (and of dx) is ~4e-3 relative.
    (y, dx, dw), (ry, rdx, rdw) = run_both(shape, torch.bfloat16)
    for name, a, b in (("y", y, ry), ("dx", dx, rdx), ("dw", dw, rdw)):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))
