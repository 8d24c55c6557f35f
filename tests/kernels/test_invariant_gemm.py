"""The property the invariant GEMMs rest on, re-checked on the machine the tests run on.

A CPU BLAS gives each output row the same bits whatever the number of rows M, except on its small-M paths.
Measured with torch 2.13's MKL on the AMD EPYC (AVX-512), two threads: fp32 rows differ for M in {1, 2, 3, 5,
6, 7, 9, 10, 11} (one thread: {1, 2, 3}); batched (``bmm``) fp32 for M in {1, 2, 3}; bf16 batched once, at
M = 1 with K = 2048 on one thread. ``kernels.batch_invariant.MIN_ROWS`` (16) must sit above all of them: if a
machine's library has a small-M path at or beyond it, these tests name the M.
"""

import pytest
import torch

from kernels.batch_invariant.reference import MIN_ROWS, linear, rows_matmul

# (K, N): the tiny model's projections, a head dim against a key block, and a wide-K down projection
SHAPES = [(80, 96), (128, 128), (2048, 256)]
ROWS = 48  # the "large" call every smaller one is compared with


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}")
def test_library_gemm_rows_agree_from_min_rows_on(threads, dtype, shape):
    K, N = shape
    gen = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=gen).to(dtype)
    x = torch.randn(ROWS, K, generator=gen).to(dtype)
    xb = torch.randn(2, 4, ROWS, K, generator=gen).to(dtype)
    wb = torch.randn(2, 4, K, N, generator=gen).to(dtype)
    full, full_b = torch.nn.functional.linear(x, w), xb @ wb
    differs = [
        m for m in range(MIN_ROWS, ROWS) if not torch.equal(torch.nn.functional.linear(x[:m], w), full[:m])
    ]
    differs_b = [m for m in range(MIN_ROWS, ROWS) if not torch.equal(xb[:, :, :m] @ wb, full_b[:, :, :m])]
    assert not differs, f"this CPU's GEMM rounds rows differently at M = {differs}: raise MIN_ROWS above them"
    assert not differs_b, (
        f"this CPU's batched GEMM rounds rows differently at M = {differs_b}: raise MIN_ROWS"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_rows_agree_at_every_m(threads, dtype):
    """What the kernels call: every M from 1 on gives the large call's rows, through the padding."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen).to(dtype)
    x = torch.randn(ROWS, 128, generator=gen).to(dtype)
    wb = torch.randn(3, 128, 64, generator=gen).to(dtype)
    xb = torch.randn(3, ROWS, 128, generator=gen).to(dtype)
    full, full_b = linear(x, w), rows_matmul(xb, wb)
    for m in range(1, ROWS):
        assert torch.equal(linear(x[:m], w), full[:m]), m
        assert torch.equal(linear(x[m - 1 : m], w), full[m - 1 : m]), m  # one row alone, from anywhere
        assert torch.equal(rows_matmul(xb[:, :m], wb), full_b[:, :m]), m
