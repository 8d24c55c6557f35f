"""Chunk-aligned linear attention (reference): its batch-invariance contract, bitwise, and its accuracy.

Every way a token can reach the op — a training forward, alone or in a right-padded batch, a prefill, a prefill
continued at any offset of a chunk, token-by-token decode, decode batched with rows at other positions — must
give the same bits. Accuracy is measured against the float64 recurrence.
"""

import pytest
import torch

import kernels
from kernels.linear_attention import ChunkState, linear_attention
from kernels.linear_attention.reference import naive_linear_attention

LENGTHS = (1, 63, 64, 65, 127, 128, 129, 300, 1000)
H, D = 2, 16


def inputs(T, dtype=torch.float32, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3))
    log_decay = -torch.rand(H, generator=g) * 0.2 - 0.01
    return q, k, v, log_decay


def training(q, k, v, log_decay):
    return linear_attention(q, k, v, log_decay, D**-0.5)[0]


@torch.no_grad()
def prefill(q, k, v, log_decay, state=None, start=0):
    B, T = q.shape[:2]
    starts = torch.full((B,), start)
    return linear_attention(q, k, v, log_decay, D**-0.5, state, starts, torch.full((B,), T))


@torch.no_grad()
def decode_each(q, k, v, log_decay, state, start):
    outs = []
    for t in range(q.shape[1]):
        o, state = prefill(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], log_decay, state, start + t)
        outs.append(o)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", LENGTHS)
def test_training_prefill_and_decode_agree_bitwise(T, dtype):
    q, k, v, ld = inputs(T, dtype)
    full = training(q, k, v, ld)
    assert full.dtype == dtype
    assert torch.equal(prefill(q, k, v, ld)[0], full)
    tokens, _ = decode_each(q, k, v, ld, None, 0)
    assert torch.equal(tokens, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_in_a_padded_batch_equal_rows_alone(dtype):
    lengths = (65, 1, 128, 300)
    seqs = [inputs(T, dtype, seed=i) for i, T in enumerate(lengths)]
    T = max(lengths)
    batch = [torch.zeros(len(lengths), T, H, D, dtype=dtype) for _ in range(3)]
    for i, (q, k, v, _) in enumerate(seqs):
        for b, x in zip(batch, (q, k, v)):
            b[i, : x.shape[1]] = x[0]
    ld = seqs[0][3]
    out = training(*batch, ld)
    pre, _ = prefill(*batch, ld)
    with torch.no_grad():
        _, lens_state = linear_attention(*batch, ld, D**-0.5, lengths_B=torch.tensor(lengths))
    for i, (q, k, v, _) in enumerate(seqs):
        alone = training(q, k, v, ld)[0]
        assert torch.equal(out[i, : lengths[i]], alone)
        assert torch.equal(pre[i, : lengths[i]], alone)
        _, alone_state = prefill(q, k, v, ld)
        for a, b in zip(lens_state, alone_state):
            assert torch.equal(a[i], b[0]), "the state after a row's real tokens ignores its padding"


@pytest.mark.parametrize(("chunk", "offsets"), [(16, range(17)), (64, (0, 1, 31, 62, 63, 64))])
def test_prefill_then_decode_split_at_every_offset_of_a_chunk(chunk, offsets):
    T = 2 * chunk + 5
    q, k, v, ld = inputs(T)
    with kernels.kernel_mode(chunk_size=chunk):
        full = training(q, k, v, ld)
        for split in (chunk + 1 + i for i in offsets):
            head, state = prefill(q[:, :split], k[:, :split], v[:, :split], ld)
            tail, _ = decode_each(q[:, split:], k[:, split:], v[:, split:], ld, state, split)
            assert torch.equal(torch.cat([head, tail], 1), full), f"split at {split}"


def test_chunked_prefill_continues_at_any_offset():
    """vLLM-style chunked prefill: the prompt arrives in pieces of arbitrary sizes."""
    q, k, v, ld = inputs(300)
    full = training(q, k, v, ld)
    outs, state, start = [], None, 0
    for piece in (37, 64, 1, 90, 108):
        s = slice(start, start + piece)
        o, state = prefill(q[:, s], k[:, s], v[:, s], ld, state, start)
        outs.append(o)
        start += piece
    assert torch.equal(torch.cat(outs, 1), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_at_mixed_positions(dtype):
    """Rows at different fills of their chunks (one about to fold, one padding row) decode together."""
    starts = (0, 63, 64, 200, 127)
    T = max(starts) + 1
    seqs = [inputs(T, dtype, seed=10 + i) for i in range(len(starts))]
    ld = seqs[0][3]
    states, expect = [], []
    for (q, k, v, _), s in zip(seqs, starts):
        _, st = prefill(q[:, :s], k[:, :s], v[:, :s], ld) if s else (None, None)
        states.append(st or kernels.linear_attention.empty_state(1, H, D, 64, dtype, "cpu"))
        expect.append(training(q[:, : s + 1], k[:, : s + 1], v[:, : s + 1], ld)[0, s])
    state = ChunkState(*(torch.cat([getattr(st, f) for st in states]) for f in ChunkState._fields))
    step = [torch.stack([seq[i][0, s] for seq, s in zip(seqs, starts)])[:, None] for i in range(3)]
    lengths = torch.tensor([1, 1, 1, 1, 0])  # the last row is padding: its state must not move
    with torch.no_grad():
        o, new = linear_attention(*step, ld, D**-0.5, state, torch.tensor(starts), lengths)
    for i in range(4):
        assert torch.equal(o[i, 0], expect[i])
    for f in ChunkState._fields:
        assert torch.equal(getattr(new, f)[4], getattr(state, f)[4])


def test_accuracy_against_float64_forward_and_backward():
    q, k, v, ld = inputs(300, B=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = training(q, k, v, ld)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    truth = naive_linear_attention(q64, k64, v64, ld, D**-0.5)
    truth_grads = torch.autograd.grad((truth * w.double()).sum(), (q64, k64, v64))
    # fp32 sums of ≤ C + D = 80 terms of O(1) size, with decays ≤ 1: relative error ~ 80 · 6e-8 ≈ 5e-6
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(o, truth) < 2e-5
    for a, b in zip(grads, truth_grads):
        assert rel(a, b) < 2e-5


def test_plain_mode_matches_the_definition_and_hands_its_state_to_decode():
    q, k, v, ld = inputs(130)
    with kernels.kernel_mode(batch_invariant=False), torch.no_grad():
        full = training(q, k, v, ld)
        head, state = linear_attention(
            q[:, :70], k[:, :70], v[:, :70], ld, D**-0.5, lengths_B=torch.tensor([70])
        )
        tail = []
        for t in range(70, 130):
            o, state = linear_attention(
                q[:, t : t + 1],
                k[:, t : t + 1],
                v[:, t : t + 1],
                ld,
                D**-0.5,
                state,
                lengths_B=torch.tensor([1]),
            )
            tail.append(o)
    truth = naive_linear_attention(q, k, v, ld, D**-0.5)
    assert ((torch.cat([head, *tail], 1).double() - truth).abs().max()) < 1e-5
    assert (full.double() - truth).abs().max() < 1e-5


def test_bad_input_is_refused_with_the_fix():
    q, k, v, ld = inputs(4)
    with pytest.raises(ValueError, match="old layout"):
        linear_attention(q, k, v, ld, 1.0, torch.zeros(1, H, D, D), torch.tensor([0]), torch.tensor([4]))
    state = kernels.linear_attention.empty_state(1, H, D, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="another chunk size"):
        linear_attention(q, k, v, ld, 1.0, state, torch.tensor([0]), torch.tensor([4]))
    with kernels.kernel_mode(batch_invariant=False), pytest.raises(ValueError, match="ChunkState"):
        linear_attention(q, k, v, ld, 1.0, state, torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(ValueError, match="share a dtype"):
        linear_attention(q, k.bfloat16(), v, ld, 1.0)
    with pytest.raises(ValueError, match="chunk size 48"):
        kernels.set_mode(chunk_size=48)
    with pytest.raises(ValueError, match="no_grad"):
        linear_attention(q.requires_grad_(), k, v, ld, 1.0, lengths_B=torch.tensor([4]))
