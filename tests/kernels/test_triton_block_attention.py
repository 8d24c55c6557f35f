"""The Triton block-aligned softmax attention: parity with the float64 definition (forward and backward) and
its own batch invariance, bitwise: training forward, padded batch, prefill, chunked prefill and decode."""

from __future__ import annotations

import os

import pytest
import torch

import kernels
import kernels._buffers
from kernels.softmax_attention import reference, softmax_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.softmax_attention import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
# Blocks of 16 so that the tiny T below cross query-tile and key-block edges (the interpreter is ~700x slower
# than torch). Invariance holds for any fixed choice; the defaults get their own test.
SMALL = {"query_tile": 16, "key_block": 16}
# (B, T, H, G, D): T = 1, one short of / one past a block, two blocks and one; D = 48 is padded to 64; GQA
# (H=4, G=2) and MHA.
SHAPES = [(2, 1, 4, 2, 16), (2, 15, 4, 2, 48), (1, 17, 2, 2, 16), (2, 33, 4, 2, 16), (1, 33, 2, 2, 48)]
HEADS = [(4, 2), (2, 2)]
# fp32 tolerance: a score is a D-term dot, an output a ≤ T-term convex combination, so the worst-case
# relative rounding error is about (D + T + a few) · 2^-24 ≈ 6e-6 at D = 48, T = 33 (backward: the same sums
# twice over); observed errors are ~2e-7. A wrong mask, scale or rescaling is off by orders of magnitude more.
FP32_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_qkv(B, T, H, G, D, dtype=torch.float32, seed=0, tk=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).to(DEVICE)
    k, v = (torch.randn(B, tk or T, G, D, generator=g).to(DEVICE) for _ in range(2))
    return q, k, v


def positions(B, start, stop):
    return torch.arange(start, stop, device=DEVICE).expand(B, stop - start).contiguous()


def grads(fn, q, k, v, pos, do, dtype=None):
    """(o, dq, dk, dv) of ``fn`` with leaves cast to ``dtype`` (float64 for the definition)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, pos, q.shape[-1] ** -0.5)
    o.backward(do.to(o.dtype))
    return [o.detach()] + [t.grad for t in leaves]


def kernel(**tiles):
    return lambda q, k, v, pos, scale: impl.block_attention(q, k, v, pos, scale, **tiles)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_definition(shape):
    B, T, H, _, D = shape
    q, k, v = make_qkv(*shape)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pos = positions(B, 0, T)
    ours = grads(kernel(**SMALL), q, k, v, pos, do)
    truth = grads(reference.naive_attention, q, k, v, pos, do, torch.float64)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, truth):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        if T == 1 and name in ("dq", "dk"):
            # one visible key: the softmax is constant, so dq and dk are exactly 0; ours are the rounding of
            # dp - δ (two D-term sums of v·do) times scale·k (or q): at most ~D·2^-24·|v||do|·scale·|k or q|
            qk = max(q.abs().max().item(), k.abs().max().item())
            bound = FP32_RTOL * D**-0.5 * qk * (v.abs().max() * do.abs().max() * D).item()
            assert a.abs().max().item() < bound, (name, a.abs().max().item())
            continue
        assert rel_err(a, b) < FP32_RTOL, (name, rel_err(a, b))
    # and close to the CPU path (its own block size and summation order)
    assert rel_err(ours[0], reference.attention_invariant(q, k, v, pos, D**-0.5)) < FP32_RTOL


def test_chunk_against_longer_cache_matches_definition():
    # Queries at 5..20 against 40 keys: keys past every query get exactly zero gradient, all keys are written.
    B, H, G, D = 2, 4, 2, 16
    q, k, v = make_qkv(B, 16, H, G, D, tk=40)
    do = torch.randn(B, 16, H, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pos = positions(B, 5, 21)
    ours = grads(kernel(**SMALL), q, k, v, pos, do)
    truth = grads(reference.naive_attention, q, k, v, pos, do, torch.float64)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, truth):
        assert rel_err(a, b) < FP32_RTOL, (name, rel_err(a, b))
    assert torch.equal(ours[2][:, 21:], torch.zeros_like(ours[2][:, 21:]))


def test_public_op_dispatches_to_triton_and_is_differentiable():
    B, T, H, G, D = 1, 17, 4, 2, 16
    q, k, v = make_qkv(B, T, H, G, D)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pos = positions(B, 0, T)
    with kernels.kernel_mode(backend="triton", batch_invariant=True):
        public = grads(softmax_attention, q, k, v, pos, do)
    direct = grads(kernel(), q, k, v, pos, do)
    for a, b in zip(public, direct):
        assert torch.equal(a, b)


@pytest.mark.parametrize("heads", HEADS)
def test_rows_alone_equal_rows_in_a_right_padded_batch(heads):
    H, G = heads
    D, lengths = 16, [33, 1, 17, 15]
    q, k, v = make_qkv(len(lengths), max(lengths), H, G, D)
    batch = impl.block_attention(q, k, v, positions(len(lengths), 0, max(lengths)), D**-0.5, **SMALL)
    for b, n in enumerate(lengths):
        alone = impl.block_attention(
            q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], positions(1, 0, n), D**-0.5, **SMALL
        )
        assert torch.equal(alone[0], batch[b, :n]), f"row {b} (length {n}) differs in the padded batch"


@pytest.mark.parametrize("heads", HEADS)
def test_prefix_and_chunked_prefill_equal_training_forward(heads):
    H, G = heads
    B, T, D = 2, 33, 48
    q, k, v = make_qkv(B, T, H, G, D)
    full = impl.block_attention(q, k, v, positions(B, 0, T), D**-0.5, **SMALL)
    for n in (1, 15, 16, 17):
        prefix = impl.block_attention(q[:, :n], k[:, :n], v[:, :n], positions(B, 0, n), D**-0.5, **SMALL)
        assert torch.equal(prefix, full[:, :n]), f"prefix of {n}"
    # chunks s..e-1 against a cache that holds more keys than they see (a cache's spare capacity)
    for s, e in ((0, 7), (7, 16), (16, 17), (17, 33), (5, 30)):
        chunk = impl.block_attention(q[:, s:e], k, v, positions(B, s, e), D**-0.5, **SMALL)
        assert torch.equal(chunk, full[:, s:e]), f"chunk {s}..{e}"


@pytest.mark.parametrize("heads", HEADS)
def test_decode_against_larger_cache_equals_training_forward(heads):
    # The engine's cache: fp32 [B, G, L, D] memory with L past every position, passed as a [B, L, G, D] view;
    # its unused capacity holds garbage here, which no query may see. Rows sit at different positions.
    H, G = heads
    B, T, D, L = 2, 33, 16, 48
    q, k, v = make_qkv(B, T, H, G, D)
    full = impl.block_attention(q, k, v, positions(B, 0, T), D**-0.5, **SMALL)
    g = torch.Generator().manual_seed(2)
    k_BGLD, v_BGLD = (1e3 * torch.randn(B, G, L, D, generator=g).to(DEVICE) for _ in range(2))
    offset = 5  # row 1 runs 5 tokens ahead of row 0
    k_BGLD[1, :, :offset], v_BGLD[1, :, :offset] = (
        k[1, :offset].transpose(0, 1),
        v[1, :offset].transpose(0, 1),
    )
    steps = []
    for t in range(T - offset):
        pos = torch.tensor([[t], [t + offset]], device=DEVICE)
        for b in range(B):
            k_BGLD[b, :, pos[b, 0]], v_BGLD[b, :, pos[b, 0]] = k[b, pos[b, 0]], v[b, pos[b, 0]]
        q_step = torch.stack([q[0, t], q[1, t + offset]])[:, None]
        steps.append(
            impl.block_attention(
                q_step, k_BGLD.transpose(1, 2), v_BGLD.transpose(1, 2), pos, D**-0.5, **SMALL
            )
        )
    steps = torch.cat(steps, 1)
    assert torch.equal(steps[0], full[0, : T - offset]), "decode row 0 differs from the training forward"
    assert torch.equal(steps[1], full[1, offset:]), "decode row 1 differs from the training forward"


def test_query_tile_changes_no_bits():
    B, T, H, G, D = 1, 40, 4, 2, 16
    q, k, v = make_qkv(B, T, H, G, D)
    pos = positions(B, 0, T)
    outs = [impl.block_attention(q, k, v, pos, D**-0.5, query_tile=bm, key_block=16) for bm in (16, 32, 64)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_default_blocks_decode_equals_prefill():
    # The tiles every caller uses: T = 70 crosses the 64-key block edge.
    B, T, H, G, D = 1, 70, 2, 1, 16
    q, k, v = make_qkv(B, T, H, G, D)
    full = impl.block_attention(q, k, v, positions(B, 0, T), D**-0.5)
    k_BGLD = torch.zeros(B, G, 128, D, device=DEVICE)
    v_BGLD = torch.zeros(B, G, 128, D, device=DEVICE)
    k_BGLD[:, :, :T], v_BGLD[:, :, :T] = k.transpose(1, 2), v.transpose(1, 2)
    steps = [
        impl.block_attention(
            q[:, t : t + 1], k_BGLD.transpose(1, 2), v_BGLD.transpose(1, 2), positions(B, t, t + 1), D**-0.5
        )
        for t in range(T)
    ]
    assert torch.equal(torch.cat(steps, 1), full)
    assert rel_err(full, reference.naive_attention(q, k, v, positions(B, 0, T), D**-0.5)) < FP32_RTOL


@pytest.mark.parametrize("size", [8, 48])
def test_bad_block_size_is_a_value_error(size):
    q, k, v = make_qkv(1, 2, 2, 2, 16)
    with pytest.raises(ValueError, match="power of two"):
        impl.block_attention(q, k, v, positions(1, 0, 2), 0.25, key_block=size)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("shape", [*SHAPES, (2, 300, 16, 4, 128)])
def test_gpu_bf16_queries_fp32_cache(shape):
    # bf16 q (the model's dtype) against fp32 k/v (the cache's): everything is computed in fp32, and o and dq
    # are rounded to bf16 (8 mantissa bits, ~4e-3 relative per rounding), hence 1e-2.
    B, T, H, _, D = shape
    q, k, v = make_qkv(*shape, dtype=torch.bfloat16)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pos = positions(B, 0, T)
    ours = grads(kernel(), q, k, v, pos, do)
    truth = grads(reference.naive_attention, q, k, v, pos, do, torch.float64)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, truth):
        assert rel_err(a, b) < 1e-2, (name, rel_err(a, b))
    steps = [
        impl.block_attention(q[:, t : t + 1], k, v, positions(B, t, t + 1), D**-0.5) for t in range(0, T, 7)
    ]
    assert torch.equal(torch.cat(steps, 1), ours[0][:, ::7])
