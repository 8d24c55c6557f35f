"""Triton chunk-aligned linear attention: parity with the reference (forward, backward, returned decode state),
and the kernels' own batch invariance, bitwise, across every way a token can arrive.

On a CPU the kernels run under the interpreter in fp32 (bf16 is wrong there); the bf16 cases need a GPU. The chunk
is 16 tokens so that T = 15, 16, 17, 33 cross chunk edges with tiny shapes (the interpreter is slow).
"""

from __future__ import annotations

import os

import pytest
import torch

import kernels._buffers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.linear_attention import reference as ref  # noqa: E402
from kernels.linear_attention import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
C = 16
# a chunk of two 16-row query tiles: a token in its second half exercises a tile offset inside the chunk
WIDE = 32
# the model's D^-0.5 would be a power of two at D = 16 and hide a reordered scaling from the bitwise tests
SCALE = 0.3
# (B, T, H, D): T = 1, a chunk minus one, a chunk, a chunk plus one, two chunks plus one; D = 48 is padded to 64.
SHAPES = [(1, 1, 1, 16), (2, 15, 2, 16), (1, 16, 1, 48), (3, 17, 2, 16), (2, 33, 2, 48)]
# fp32 against the fp32 reference: the same formula, summed in another order (tl.dot's sequential FMA against
# the library GEMM's blocked sums) with another exp. Each output is a few chained sums of at most D + C = 64
# terms, the state a chain of at most 3 folds of C terms, so the worst-case relative rounding bound is about
# (D + 2·C + 3·C)·2^-24 ≈ 8e-6; observed errors are ~1e-7. 2e-5 sits above the bound, far below any real
# mistake (a wrong decay power or a dropped term is an O(1e-2..1) error).
FP32_RTOL = 2e-5
# bf16 inputs on a GPU: both sides compute in fp32 from the same bf16 values; outputs and gradients are rounded
# to bf16 (8 mantissa bits, up to 2^-8 ≈ 4e-3 relative each), hence 1e-2.
BF16_RTOL = 1e-2


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(B, T, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).to(DEVICE) for _ in range(3))
    # a weak decay (λ^C ≈ 0.7) and a strong one (λ^C ≈ e^-16): the Ring slopes lie in between
    log_decay = torch.tensor([-0.02, -1.0][:H], device=DEVICE)
    return q, k, v, log_decay


def training(fn, q, k, v, log_decay, do, chunk=C):
    """(o, dq, dk, dv) of a training forward and backward."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, state = fn(*leaves, log_decay, SCALE, chunk)
    assert state is None
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


@torch.no_grad()
def rollout(fn, q, k, v, log_decay, state=None, start=0, lengths=None, chunk=C):
    """A prefill (for T = 1 a decode step) of all rows from ``start``, ``lengths`` real tokens (default T)."""
    B, T = q.shape[:2]
    start, lengths = (
        torch.as_tensor(x, device=DEVICE).expand(B).clone()
        for x in (start, T if lengths is None else lengths)
    )
    return fn(q, k, v, log_decay, SCALE, chunk, state, start, lengths)


def decode_each(q, k, v, log_decay, state, start, chunk=C):
    """Token by token through the decode path; returns (o of every token, state after the last)."""
    outs = []
    for t in range(q.shape[1]):
        step = (x[:, t : t + 1] for x in (q, k, v))
        o, state = rollout(impl.aligned_linear_attention, *step, log_decay, state, start + t, 1, chunk)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def assert_state_close(ours, theirs):
    assert ours.state_BHDD.dtype == torch.float32
    assert rel_err(ours.state_BHDD, theirs.state_BHDD) < FP32_RTOL
    # the chunk buffers are copies of the inputs: exact
    assert torch.equal(ours.keys_BHCD, theirs.keys_BHCD)
    assert torch.equal(ours.values_BHCD, theirs.values_BHCD)


def assert_states_equal(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(("shape", "chunk"), [*((s, C) for s in SHAPES), ((2, 40, 2, 16), WIDE)])
def test_training_forward_and_backward_match_reference(shape, chunk):
    q, k, v, log_decay = inputs(*shape)
    do = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = training(impl.aligned_linear_attention, q, k, v, log_decay, do, chunk)
    theirs = training(ref.aligned_linear_attention, q, k, v, log_decay, do, chunk)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name}: an element was not written"
        assert rel_err(a, b) < FP32_RTOL, (name, rel_err(a, b))
    again = training(impl.aligned_linear_attention, q, k, v, log_decay, do, chunk)
    assert all(torch.equal(a, b) for a, b in zip(ours, again)), "the backward is not deterministic"


@pytest.mark.parametrize(
    ("shape", "chunk"), [((3, 17, 2, 16), C), ((2, 15, 1, 48), C), ((3, 17, 1, 16), WIDE)]
)
def test_prefill_continuation_and_decode_match_reference(shape, chunk):
    """Right-padded prefill from empty, a continuation at each row's own offset inside a chunk, then one batched
    decode step with a padding row; outputs of real tokens and the returned states against the reference."""
    B, T, H, D = shape
    q, k, v, log_decay = inputs(*shape)
    lengths = torch.tensor([T, 1, T - 4][:B], device=DEVICE)
    ours = rollout(impl.aligned_linear_attention, q, k, v, log_decay, None, 0, lengths, chunk)
    theirs = rollout(ref.aligned_linear_attention, q, k, v, log_decay, None, 0, lengths, chunk)
    real = (torch.arange(T, device=DEVICE)[None, :] < lengths[:, None])[..., None, None]
    assert torch.isfinite(ours[0]).all()
    assert rel_err(ours[0] * real, theirs[0] * real) < FP32_RTOL
    assert_state_close(ours[1], theirs[1])

    q2, k2, v2, _ = inputs(*shape, seed=1)
    lengths2 = torch.tensor([T - 2, T, 3][:B], device=DEVICE)
    ours = rollout(impl.aligned_linear_attention, q2, k2, v2, log_decay, ours[1], lengths, lengths2, chunk)
    theirs = rollout(ref.aligned_linear_attention, q2, k2, v2, log_decay, theirs[1], lengths, lengths2, chunk)
    real = (torch.arange(T, device=DEVICE)[None, :] < lengths2[:, None])[..., None, None]
    assert rel_err(ours[0] * real, theirs[0] * real) < FP32_RTOL
    assert_state_close(ours[1], theirs[1])

    q3, k3, v3, _ = inputs(B, 1, H, D, seed=2)
    start, step = lengths + lengths2, torch.ones(B, dtype=torch.long, device=DEVICE)
    step[-1] = 0  # the last row is padding in this step
    ours = rollout(impl.aligned_linear_attention, q3, k3, v3, log_decay, ours[1], start, step, chunk)
    theirs = rollout(ref.aligned_linear_attention, q3, k3, v3, log_decay, theirs[1], start, step, chunk)
    assert rel_err(ours[0][:-1], theirs[0][:-1]) < FP32_RTOL
    assert_state_close(ours[1], theirs[1])


@pytest.mark.parametrize("chunk_size", [8, 48])
def test_bad_chunk_size_is_a_value_error(chunk_size):
    q, k, v, log_decay = inputs(1, 4, 1, 16)
    with pytest.raises(ValueError, match="power of two"):
        impl.aligned_linear_attention(q, k, v, log_decay, 0.25, chunk_size)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 33])
def test_training_prefill_and_decode_agree_bitwise(T):
    q, k, v, log_decay = inputs(1, T, 2, 16)
    full, _ = impl.aligned_linear_attention(q, k, v, log_decay, SCALE, C)
    pre, pre_state = rollout(impl.aligned_linear_attention, q, k, v, log_decay)
    tokens, tok_state = decode_each(q, k, v, log_decay, None, 0)
    assert torch.equal(pre, full)
    assert torch.equal(tokens, full)
    assert_states_equal(tok_state, pre_state)


def test_rows_in_a_padded_batch_equal_rows_alone():
    lengths = (17, 1, 33)
    T = max(lengths)
    rows = [inputs(1, n, 2, 48, seed=i) for i, n in enumerate(lengths)]
    batch = [torch.zeros(len(lengths), T, 2, 48, device=DEVICE) for _ in range(3)]
    for i, row in enumerate(rows):
        for x, r in zip(batch, row[:3]):
            x[i, : lengths[i]] = r[0]
    log_decay = rows[0][3]
    out, _ = impl.aligned_linear_attention(*batch, log_decay, SCALE, C)
    pre, state = rollout(impl.aligned_linear_attention, *batch, log_decay, None, 0, torch.tensor(lengths))
    for i, (q, k, v, _) in enumerate(rows):
        alone, _ = impl.aligned_linear_attention(q, k, v, log_decay, SCALE, C)
        assert torch.equal(out[i, : lengths[i]], alone[0])
        assert torch.equal(pre[i, : lengths[i]], alone[0])
        _, alone_state = rollout(impl.aligned_linear_attention, q, k, v, log_decay)
        assert_states_equal((x[i] for x in state), (x[0] for x in alone_state))


@pytest.mark.parametrize(
    ("chunk", "split"), [(C, 1), (C, 7), (C, 15), (C, 16), (C, 17), (C, 30), (WIDE, 20), (WIDE, 31)]
)
def test_prefill_split_at_any_offset_then_prefill_or_decode(chunk, split):
    T = 33
    q, k, v, log_decay = inputs(1, T, 2, 16)
    full, _ = impl.aligned_linear_attention(q, k, v, log_decay, SCALE, chunk)
    head, state = rollout(
        impl.aligned_linear_attention, *(x[:, :split] for x in (q, k, v)), log_decay, chunk=chunk
    )
    tail = [x[:, split:] for x in (q, k, v)]
    rest, end_state = rollout(impl.aligned_linear_attention, *tail, log_decay, state, split, chunk=chunk)
    assert torch.equal(torch.cat([head, rest], dim=1), full)
    _, whole_state = rollout(impl.aligned_linear_attention, q, k, v, log_decay, chunk=chunk)
    assert_states_equal(end_state, whole_state)
    if split in (7, 16, 20):  # and the same continuation token by token
        tokens, tok_state = decode_each(*tail, log_decay, state, split, chunk)
        assert torch.equal(torch.cat([head, tokens], dim=1), full)
        assert_states_equal(tok_state, whole_state)


@pytest.mark.parametrize("chunk", [C, WIDE])
def test_batched_continuation_at_mixed_offsets_equals_rows_alone(chunk):
    """Rows continue at offsets 3, 16 and 21 in one right-padded prefill: each real token equals its training
    output, and each row's state equals the one a prefill of its real tokens alone leaves."""
    prefixes, lengths, T = (3, 16, 21), (14, 5, 9), 14
    seqs = [inputs(1, 40, 2, 16, seed=i) for i in range(3)]
    log_decay = seqs[0][3]
    states, x = [], [[], [], []]
    for (q, k, v, _), n in zip(seqs, prefixes):
        states.append(
            rollout(impl.aligned_linear_attention, q[:, :n], k[:, :n], v[:, :n], log_decay, chunk=chunk)[1]
        )
        for xs, t in zip(x, (q, k, v)):
            xs.append(t[:, n : n + T])
    state = ref.ChunkState(*(torch.cat(s) for s in zip(*states)))
    batch = [torch.cat(xs) for xs in x]
    o, state = rollout(impl.aligned_linear_attention, *batch, log_decay, state, prefixes, lengths, chunk)
    for b, ((q, k, v, _), n, m) in enumerate(zip(seqs, prefixes, lengths)):
        full, _ = impl.aligned_linear_attention(
            q[:, : n + m], k[:, : n + m], v[:, : n + m], log_decay, SCALE, chunk
        )
        assert torch.equal(o[b, :m], full[0, n:])
        _, alone = rollout(
            impl.aligned_linear_attention, q[:, : n + m], k[:, : n + m], v[:, : n + m], log_decay, chunk=chunk
        )
        assert_states_equal((s[b] for s in state), (s[0] for s in alone))


def test_batched_decode_at_mixed_positions_with_a_padding_row():
    """Rows at positions 15, 16, 30 and a padding row decode two steps together (row 0 folds its chunk in the
    first step, row 2 in the second); each row equals its own decode alone. The padding row sits at the last
    position of a chunk, where a real token would fold it: its state must stay as it was."""
    prefixes, T = (15, 16, 30, 31), 33
    seqs = [inputs(1, T, 2, 16, seed=i) for i in range(len(prefixes))]
    log_decay = seqs[0][3]
    states, alone = [], []
    for (q, k, v, _), n in zip(seqs, prefixes):
        _, s = rollout(impl.aligned_linear_attention, q[:, :n], k[:, :n], v[:, :n], log_decay)
        states.append(s)
        alone.append(decode_each(q[:, n : n + 2], k[:, n : n + 2], v[:, n : n + 2], log_decay, s, n))
    state = ref.ChunkState(*(torch.cat(x) for x in zip(*states)))
    lengths = torch.tensor([1, 1, 1, 0], device=DEVICE)
    for step in range(2):
        x = [torch.cat([s[i][:, n + step : n + step + 1] for s, n in zip(seqs, prefixes)]) for i in range(3)]
        start = torch.tensor(prefixes, device=DEVICE) + step * lengths
        before = state
        o, state = rollout(impl.aligned_linear_attention, *x, log_decay, state, start, lengths)
        for b in range(3):
            assert torch.equal(o[b], alone[b][0][0, step : step + 1])
        assert_states_equal((s[3] for s in state), (s[3] for s in before))
    for b in range(3):
        assert_states_equal((s[b] for s in state), (s[0] for s in alone[b][1]))


gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="bf16 Triton needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("shape", "chunk"), [*((s, C) for s in SHAPES), ((2, 300, 4, 128), C), ((2, 300, 4, 128), 64)]
)
def test_gpu_bf16_training_matches_reference(shape, chunk):
    q, k, v, log_decay = inputs(*shape, dtype=torch.bfloat16)
    do = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    ours = training(impl.aligned_linear_attention, q, k, v, log_decay, do, chunk)
    theirs = training(ref.aligned_linear_attention, q, k, v, log_decay, do, chunk)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, theirs, strict=True):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), name
        assert rel_err(a, b) < BF16_RTOL, (name, rel_err(a, b))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("T", "chunk"), [(1, C), (17, C), (100, C), (150, 64)])
def test_gpu_bf16_training_prefill_and_decode_agree_bitwise(T, chunk):
    q, k, v, log_decay = inputs(2, T, 2, 128, dtype=torch.bfloat16)
    full, _ = impl.aligned_linear_attention(q, k, v, log_decay, SCALE, chunk)
    pre, pre_state = rollout(impl.aligned_linear_attention, q, k, v, log_decay, chunk=chunk)
    split = T // 3  # 0 for T = 1: an empty prefill, then decode
    head, state = rollout(
        impl.aligned_linear_attention, *(x[:, :split] for x in (q, k, v)), log_decay, chunk=chunk
    )
    tokens, tok_state = decode_each(*(x[:, split:] for x in (q, k, v)), log_decay, state, split, chunk)
    assert torch.equal(pre, full)
    assert torch.equal(torch.cat([head, tokens], dim=1), full)
    assert_states_equal(tok_state, pre_state)
