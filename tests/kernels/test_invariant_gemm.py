"""The property the invariant GEMMs rest on, re-checked on the machine the tests run on.

A CPU GEMM gives each output row the same bits whatever the number of rows M, provided M is a multiple of 4:
with torch 2.13's MKL, rows of other M differ where the library splits them among threads into pieces of fewer
than four (M in {1, 2, 3} on one thread, {1, 2, 3, 5, 6, 7, 9, 10, 11} on two, 17–19 and 25–27 as well on
sixteen); oneDNN's inner product (the fp32 invariant GEMM on x86) runs M = 1 on another kernel.
``kernels.batch_invariant.ROW_MULTIPLE`` (4) pads every GEMM to a multiple of it: if a machine's library rounds
a multiple of 4 differently, or differently on another thread count, these tests name the M.
Sixteen threads on a two-core machine oversubscribe it, which changes the timing, not the library's split.
"""

import pytest
import torch

from kernels.batch_invariant.reference import ROW_MULTIPLE, library_gemm, linear, rows_matmul

# (K, N): the tiny model's projections, a head dim against a key block (both MKL in fp32), and a wide-K down
# projection (oneDNN in fp32 on x86: at least ONEDNN_MIN_WEIGHT elements)
SHAPES = [(80, 96), (128, 128), (2048, 256)]
ROWS = 48  # the "large" call every smaller one is compared with


@pytest.fixture(params=[1, 2, 16], ids=["1-thread", "2-threads", "16-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}")
def test_library_gemm_rows_agree_at_multiples_of_4(threads, dtype, shape):
    K, N = shape
    gen = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=gen).to(dtype)
    x = torch.randn(ROWS, K, generator=gen).to(dtype)
    xb = torch.randn(2, 4, ROWS, K, generator=gen).to(dtype)
    wb = torch.randn(2, 4, K, N, generator=gen).to(dtype)
    full, full_b = library_gemm(x, w), xb @ wb
    ms = range(ROW_MULTIPLE, ROWS, ROW_MULTIPLE)
    differs = [m for m in ms if not torch.equal(library_gemm(x[:m], w), full[:m])]
    differs_b = [m for m in ms if not torch.equal(xb[:, :, :m] @ wb, full_b[:, :, :m])]
    assert not differs, f"this CPU's GEMM rounds rows differently at M = {differs}: change ROW_MULTIPLE"
    assert not differs_b, (
        f"this CPU's batched GEMM rounds rows differently at M = {differs_b}: change ROW_MULTIPLE"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight", [(96, 128), (512, 256)], ids=["N96-K128", "N512-K256"])
def test_padded_rows_agree_at_every_m(threads, dtype, weight):
    """What the kernels call: every M from 1 on gives the large call's rows, through the padding (the second
    weight has ONEDNN_MIN_WEIGHT elements: oneDNN's path in fp32 on x86)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*weight, generator=gen).to(dtype)
    x = torch.randn(ROWS, weight[1], generator=gen).to(dtype)
    wb = torch.randn(3, 128, 64, generator=gen).to(dtype)
    xb = torch.randn(3, ROWS, 128, generator=gen).to(dtype)
    full, full_b = linear(x, w), rows_matmul(xb, wb)
    for m in range(1, ROWS):
        assert torch.equal(linear(x[:m], w), full[:m]), m
        assert torch.equal(linear(x[m - 1 : m], w), full[m - 1 : m]), m  # one row alone, from anywhere
        assert torch.equal(rows_matmul(xb[:, :m], wb), full_b[:, :m]), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_agree_across_thread_counts(dtype):
    """A rollout worker and a trainer may run different thread counts: a row's bits must not depend on them."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 2048, generator=gen).to(dtype)
    x = torch.randn(ROWS, 2048, generator=gen).to(dtype)
    before = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 16):
            torch.set_num_threads(n)
            results[n] = [linear(x[:m], w) for m in (1, 5, ROWS)]
    finally:
        torch.set_num_threads(before)
    for n in (2, 16):
        for got, want in zip(results[n], results[1]):
            assert torch.equal(got, want), f"{n} threads round a row differently from one thread"
