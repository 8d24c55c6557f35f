"""Parity of the Triton blockwise FP8 kernels with torch: quantised bytes and scales bitwise equal."""

from __future__ import annotations

import os

import pytest
import torch

import kernels._buffers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.fp8 import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
TILINGS = [(1, 128), (128, 128)]
SHAPES = [(1, 1), (3, 200), (130, 257), (257, 130), (128, 128)]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def torch_quantize(x: torch.Tensor, block_m: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    n_m, n_k = -(-m // block_m), -(-k // block_k)
    padded = torch.zeros(n_m * block_m, n_k * block_k, dtype=torch.float32, device=x.device)
    padded[:m, :k] = x.float()
    tiles = padded.view(n_m, block_m, n_k, block_k)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    inv = 448.0 / amax
    q = (tiles * inv[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(n_m * block_m, n_k * block_k)[:m, :k], amax / 448.0


def torch_dequantize(q, scale, block_m, block_k, dtype):
    m, k = q.shape
    s = scale.repeat_interleave(block_m, 0)[:m].repeat_interleave(block_k, 1)[:, :k]
    return (q.float() * s).to(dtype)


def awkward_input(m: int, k: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 1000 + k)
    # Magnitudes spanning 1e-8..1e3 across columns put some tiles deep in e4m3's subnormal range.
    x = torch.randn(m, k, generator=g) * torch.logspace(-8, 3, k)
    x[0, : min(k, 3)] = 0.0
    x[0, min(k - 1, 3)] = -0.0
    return x.to(dtype).to(DEVICE)


def assert_bitwise(x: torch.Tensor, block_m: int, block_k: int) -> None:
    q, scale = impl.quantize_blockwise(x, block_m, block_k)
    rq, rscale = torch_quantize(x, block_m, block_k)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == rscale.shape
    n_bad = (q.view(torch.uint8) != rq.view(torch.uint8)).sum().item()
    assert n_bad == 0, f"{n_bad} quantised bytes differ"
    assert torch.equal(scale, rscale)


@pytest.mark.parametrize("block_m,block_k", TILINGS)
@pytest.mark.parametrize("m,k", SHAPES)
def test_quantize_bitwise(m, k, block_m, block_k):
    assert_bitwise(awkward_input(m, k), block_m, block_k)


def test_quantize_rounding_ties_to_even():
    # amax = 448 makes inv = 1, so these values hit the e4m3 grid's halfway points exactly.
    halfway = [17.0, 19.0, 272.0, 304.0, 1.5 * 2**-9, 0.5 * 2**-9, 2.5 * 2**-9, 0.01513671875, 440.0, 447.0]
    vals = torch.tensor([448.0, *halfway, *(-v for v in halfway), 1e-30, -1e-30])
    x = vals.repeat(2, 1).to(DEVICE)
    for block_m, block_k in TILINGS:
        assert_bitwise(x, block_m, block_k)


def test_quantize_all_zero_tile_uses_amax_floor():
    x = torch.zeros(2, 130, device=DEVICE)
    q, scale = impl.quantize_blockwise(x, 1, 128)
    assert torch.equal(scale, torch.full_like(scale, 1e-12) / 448.0)
    assert (q.view(torch.uint8) == 0).all()


@pytest.mark.parametrize("block_m,block_k", TILINGS)
@pytest.mark.parametrize("m,k", [(3, 200), (130, 257)])
def test_dequantize_bitwise(m, k, block_m, block_k):
    q, scale = torch_quantize(awkward_input(m, k), block_m, block_k)
    x = impl.dequantize_blockwise(q, scale, block_m, block_k)
    assert torch.equal(x, torch_dequantize(q, scale, block_m, block_k, torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("block_m,block_k", TILINGS)
@pytest.mark.parametrize("m,k", SHAPES)
def test_gpu_bf16_bitwise(m, k, block_m, block_k):
    x = awkward_input(m, k, torch.bfloat16)
    assert_bitwise(x, block_m, block_k)
    q, scale = impl.quantize_blockwise(x, block_m, block_k)
    out = impl.dequantize_blockwise(q, scale, block_m, block_k, torch.bfloat16)
    assert torch.equal(out, torch_dequantize(q, scale, block_m, block_k, torch.bfloat16))
