"""The Triton batch-invariant GEMMs: parity with float64 (forward and backward), a row's bits independent of
the number of rows (and of its group's size, for the grouped MoE variant), and the dispatch of
``kernels.batch_invariant.linear``."""

from __future__ import annotations

import os

import pytest
import torch

import kernels
import kernels._buffers
from kernels.batch_invariant import linear as public_linear
from kernels.batch_invariant import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.batch_invariant import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
# 16-wide tiles make the tiny sizes below cross row, column and K tile edges; None is the dtype's default.
SMALL = (16, 16, 16)
ROW_COUNTS = [1, 2, 3, 5, 16, 17, 40]
# (M, K, N): K = 40 and 48 leave a partial last K step at 16; N = 24 and 33 a partial column tile.
SHAPES = [(1, 16, 16), (17, 40, 24), (40, 48, 33)]
# fp32 tolerance: an output is a K-term dot, whose worst-case relative rounding error is about K · 2^-24
# ≈ 3e-6 at K = 48 (the backward's torch GEMMs likewise); observed errors are ~1e-7.
FP32_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def with_grads(fn, dy, *leaves):
    """fn's output and the gradients of its leaves for the output gradient dy."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def grouped_definition(x, counts, w):
    return torch.cat([xe @ we.t() for xe, we in zip(x.split(counts), w)])


@pytest.mark.parametrize("tiles", [SMALL, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_float64(shape, tiles):
    M, K, N = shape
    x, w, dy = randn(M, K), randn(N, K, seed=1), randn(M, N, seed=2)
    ours = with_grads(lambda a, b: impl.linear(a, b, tiles=tiles), dy, x, w)
    truth = with_grads(lambda a, b: a @ b.t(), dy.double(), x.double(), w.double())
    for name, a, b in zip(("y", "dx", "dw"), ours, truth):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a, b) < FP32_RTOL, (name, rel_err(a, b))


@pytest.mark.parametrize("tiles", [SMALL, None])
def test_linear_rows_do_not_depend_on_the_number_of_rows(tiles):
    x, w = randn(48, 40), randn(24, 40, seed=1)
    full = impl.linear(x, w, tiles=tiles)
    for M in ROW_COUNTS:
        assert torch.equal(impl.linear(x[:M], w, tiles=tiles), full[:M]), f"first {M} rows"
        # the same rows at another offset inside their tiles
        assert torch.equal(impl.linear(x[3 : 3 + M], w, tiles=tiles), full[3 : 3 + M]), f"rows 3..{3 + M}"


def test_linear_strided_and_batched_inputs():
    # A row's bits depend on its values only: not on the input's strides or leading dims.
    x, w = randn(40, 3, 16), randn(24, 16, seed=1)
    strided = x.transpose(0, 1)  # [3, 40, 16], rows 64 floats apart
    out = impl.linear(strided, w, tiles=SMALL)
    assert out.shape == (3, 40, 24)
    assert torch.equal(out, impl.linear(strided.contiguous(), w, tiles=SMALL))
    assert torch.equal(out.reshape(-1, 24), impl.linear(strided.reshape(-1, 16), w, tiles=SMALL))


def test_public_linear_dispatches_by_backend():
    x, w = randn(5, 32), randn(24, 32, seed=1)
    with kernels.kernel_mode(backend="triton", batch_invariant=True):
        tri = public_linear(x, w)
    with kernels.kernel_mode(backend="reference", batch_invariant=True):
        ref = public_linear(x, w)
    assert torch.equal(tri, impl.linear(x, w))
    assert torch.equal(ref, reference.linear(x, w))
    assert rel_err(tri, ref) < FP32_RTOL


@pytest.mark.parametrize("tiles", [SMALL, None])
def test_grouped_matches_float64(tiles):
    counts = [5, 0, 17, 1, 17]  # an empty group, one of a single row, groups crossing a 16-row tile edge
    K, N = 40, 24
    x, w, dy = randn(sum(counts), K), randn(len(counts), N, K, seed=1), randn(sum(counts), N, seed=2)
    ours = with_grads(lambda a, b: impl.grouped_linear(a, counts, b, tiles=tiles), dy, x, w)
    truth = with_grads(lambda a, b: grouped_definition(a, counts, b), dy.double(), x.double(), w.double())
    for name, a, b in zip(("y", "dx", "dw"), ours, truth):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a, b) < FP32_RTOL, (name, rel_err(a, b))
    assert torch.equal(ours[2][1], torch.zeros_like(ours[2][1])), "an empty group gets a zero weight gradient"


@pytest.mark.parametrize("tiles", [SMALL, None])
def test_grouped_rows_do_not_depend_on_the_group_size(tiles):
    K, N = 40, 24
    x, w = randn(3 * 40, K), randn(3, N, K, seed=1)
    counts = [40, 40, 40]
    full = impl.grouped_linear(x, counts, w, tiles=tiles)
    for M in ROW_COUNTS:
        # group 1 keeps its first M rows, its neighbours keep theirs: the rows move to other offsets
        rows = torch.cat([x[:40], x[40 : 40 + M], x[80:]])
        part = impl.grouped_linear(rows, torch.tensor([40, M, 40], device=DEVICE), w, tiles=tiles)
        assert torch.equal(part[40 : 40 + M], full[40 : 40 + M]), f"group of {M} rows"
        assert torch.equal(part[40 + M :], full[80:]), f"group 2 after a group of {M} rows"
        # a group alone equals the same rows through the plain GEMM with the group's weight
        alone = impl.grouped_linear(x[40 : 40 + M], [0, M, 0], w, tiles=tiles)
        assert torch.equal(alone, full[40 : 40 + M])
        assert torch.equal(alone, impl.linear(x[40 : 40 + M], w[1], tiles=tiles))


@pytest.mark.parametrize(
    ("counts", "match"),
    [([3, 3], "one count per weight"), ([3, 3, 4], "sum to"), ([8, -1, 2], "non-negative")],
)
def test_grouped_bad_counts_are_value_errors(counts, match):
    with pytest.raises(ValueError, match=match):
        impl.grouped_linear(randn(9, 16), counts, randn(3, 8, 16))


def test_bad_tiles_are_value_errors():
    with pytest.raises(ValueError, match="powers of two"):
        impl.linear(randn(4, 16), randn(8, 16), tiles=(16, 24, 16))


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_invariance_at_model_sizes(dtype):
    # Ring-mini's shapes: hidden 2048 into a 6144-wide projection, and 256 experts' 512-wide FFN rows.
    x, w = randn(600, 2048, dtype=dtype), randn(6144, 2048, dtype=dtype, seed=1)
    full = impl.linear(x, w)
    for M in [*ROW_COUNTS, 64, 65, 599]:
        assert torch.equal(impl.linear(x[:M], w), full[:M]), f"{dtype} first {M} rows"
    # 16-bit: products exact in fp32, the sum and the output rounded; 1e-2 covers bf16's 8-bit output
    assert rel_err(full, x.double() @ w.double().t()) < (1e-2 if dtype == torch.bfloat16 else FP32_RTOL)
    counts = torch.tensor([1, 0, 63, 64, 65, 200, 207], device=DEVICE)
    we = randn(7, 512, 2048, dtype=dtype, seed=2)
    grouped = impl.grouped_linear(x, counts, we)
    assert rel_err(grouped, grouped_definition(x.double(), counts.tolist(), we.double())) < 1e-2
    for e, (start, n) in enumerate(zip((counts.cumsum(0) - counts).tolist(), counts.tolist())):
        assert torch.equal(grouped[start : start + n], impl.linear(x[start : start + n], we[e]))


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
def test_gpu_bf16_backward():
    x, w, dy = (
        randn(70, 256, dtype=torch.bfloat16),
        randn(96, 256, dtype=torch.bfloat16, seed=1),
        randn(70, 96),
    )
    ours = with_grads(impl.linear, dy, x, w)
    truth = with_grads(lambda a, b: a @ b.t(), dy.to(torch.bfloat16).double(), x.double(), w.double())
    for name, a, b in zip(("y", "dx", "dw"), ours, truth):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))
