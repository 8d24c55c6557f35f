"""The platform's core promise: a sequence's log-probs are bitwise identical however they are computed.

(a) alone, (b) inside a right-padded batch of other lengths, (c) token by token with caches, (d) a prefill of
part of the sequence followed by decode steps, (e) a prefill in pieces, and (f) decode batched with other
sequences at other positions, in fp32, bf16 and FP8 mode, across lengths that cross chunk boundaries. On the
CPU with the reference kernels; on a GPU (marker ``gpu``) the same tests run with the Triton kernels.
"""

import copy

import pytest
import torch

import kernels
from rlplat.models import RingLinearForCausalLM, preset, to_precision

# around the linear-attention chunk (64) and softmax key-block (256) edges, and one long sequence
LENGTHS = (1, 63, 64, 65, 127, 128, 129, 300, 1000)
PRECISIONS = ("fp32", "bf16", "fp8")
SETUPS = [pytest.param((p, "cpu"), id=p) for p in PRECISIONS] + [
    pytest.param((p, "cuda"), id=f"{p}-cuda", marks=pytest.mark.gpu) for p in PRECISIONS
]


class OnDevice:
    """The model on its device with that device's kernels (GPU: Triton), fed CPU tensors, returning CPU tensors."""

    def __init__(self, model: RingLinearForCausalLM, device: str):
        self.model = model.to(device)
        self.device = device
        self.backend = "triton" if device == "cuda" else "reference"

    def token_logprobs(self, ids, targets, cache=None, lengths_B=None):
        to = lambda t: None if t is None else t.to(self.device)
        with kernels.kernel_mode(backend=self.backend):
            logp, entropy = self.model.token_logprobs(
                to(ids), to(targets), cache=cache, lengths_B=to(lengths_B)
            )
        return logp.cpu(), entropy.cpu()

    def new_cache(self, batch: int):
        return self.model.new_cache(batch)


@pytest.fixture(scope="module", params=SETUPS)
def model(request):
    precision, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    m = RingLinearForCausalLM(preset("tiny"))
    m.reset_parameters(seed=0)
    # Random router weights at init route almost uniformly; a bias spreads the choices so group-limited routing
    # and expert selection actually vary between tokens.
    for layer in m.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.expert_bias.copy_(torch.randn(layer.mlp.gate.expert_bias.shape) * 0.05)
            layer.mlp.gate.weight.data.mul_(20)
    m = to_precision(m, precision)
    assert (
        m.model.rope_cos.dtype == torch.float32
        and m.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    )
    return OnDevice(m.eval(), device)


def sequences(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n + 1,), generator=g) for n in lengths]  # n scored tokens each


@torch.no_grad()
def logprobs_alone(model, seq):
    logp, _ = model.token_logprobs(seq[None, :-1], seq[None, 1:])
    return logp[0]


@torch.no_grad()
def logprobs_batched(model, seqs):
    T = max(len(s) for s in seqs) - 1
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    tgt = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s) - 1], tgt[i, : len(s) - 1] = s[:-1], s[1:]
    logp, _ = model.token_logprobs(ids, tgt)
    return [logp[i, : len(s) - 1] for i, s in enumerate(seqs)]


@torch.no_grad()
def logprobs_prefill_then_decode(model, seq, prefill):
    """Prefill the first ``prefill`` inputs with a cache, then decode the rest one token at a time."""
    cache = model.new_cache(1)
    out = []
    if prefill:
        lp, _ = model.token_logprobs(seq[None, :prefill], seq[None, 1 : prefill + 1], cache=cache)
        out.append(lp[0])
    for t in range(prefill, len(seq) - 1):
        lp, _ = model.token_logprobs(seq[None, t : t + 1], seq[None, t + 1 : t + 2], cache=cache)
        out.append(lp[0])
    return torch.cat(out)


@torch.no_grad()
def logprobs_batched_decode(model, seqs, prefill_lengths):
    """Prefill a right-padded batch (different lengths), then decode all rows together at different positions."""
    B = len(seqs)
    cache = model.new_cache(B)
    P = max(prefill_lengths)
    ids = torch.zeros(B, P, dtype=torch.long)
    tgt = torch.zeros(B, P, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prefill_lengths)):
        ids[i, :p], tgt[i, :p] = s[:p], s[1 : p + 1]
    lp, _ = model.token_logprobs(ids, tgt, cache=cache, lengths_B=torch.tensor(prefill_lengths))
    out = [[lp[i, :p]] for i, p in enumerate(prefill_lengths)]
    steps = max(len(s) - 1 - p for s, p in zip(seqs, prefill_lengths))
    pos = list(prefill_lengths)
    for _ in range(steps):
        ids = torch.tensor([[s[min(p, len(s) - 2)]] for s, p in zip(seqs, pos)])
        tgt = torch.tensor([[s[min(p, len(s) - 2) + 1]] for s, p in zip(seqs, pos)])
        active = torch.tensor([int(p < len(s) - 1) for s, p in zip(seqs, pos)])
        lp, _ = model.token_logprobs(ids, tgt, cache=cache, lengths_B=active)
        for i, s in enumerate(seqs):
            if pos[i] < len(s) - 1:
                out[i].append(lp[i])
                pos[i] += 1
    return [torch.cat(o) for o in out]


def assert_bitwise(a, b, what):
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    if not torch.equal(a, b):
        diff = (a - b).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (max |Δ| = {diff:.3e})")


def test_alone_equals_padded_batch(model):
    seqs = sequences(LENGTHS)
    alone = [logprobs_alone(model, s) for s in seqs]
    for n, a, b in zip(LENGTHS, alone, logprobs_batched(model, seqs)):
        assert_bitwise(a, b, f"length {n}: alone vs padded batch")


@pytest.mark.parametrize("n", LENGTHS)
def test_alone_equals_token_by_token(model, n):
    (seq,) = sequences([n], seed=2)
    assert_bitwise(
        logprobs_alone(model, seq), logprobs_prefill_then_decode(model, seq, 0), f"length {n}: token by token"
    )


@pytest.mark.parametrize(
    ("n", "prefill"), [(65, 64), (129, 65), (300, 63), (300, 200), (300, 255), (300, 256)]
)
def test_alone_equals_prefill_then_decode(model, n, prefill):
    (seq,) = sequences([n], seed=3)
    got = logprobs_prefill_then_decode(model, seq, prefill)
    assert_bitwise(logprobs_alone(model, seq), got, f"length {n}: prefill {prefill} + decode")


@torch.no_grad()
def test_alone_equals_chunked_prefill(model):
    """A prompt prefilled in pieces of any size (as vLLM schedules a long prompt), then decoded."""
    (seq,) = sequences([300], seed=6)
    cache, out, start = model.new_cache(1), [], 0
    for piece in (37, 64, 1, 90, 108):
        s = slice(start, start + piece)
        lp, _ = model.token_logprobs(seq[None, s], seq[None, s.start + 1 : s.stop + 1], cache=cache)
        out.append(lp[0])
        start += piece
    assert_bitwise(logprobs_alone(model, seq), torch.cat(out), "chunked prefill")


def test_alone_equals_batched_decode(model):
    seqs = sequences([20, 70, 9], seed=4)
    alone = [logprobs_alone(model, s) for s in seqs]
    got = logprobs_batched_decode(model, seqs, [5, 64, 1])
    for a, b in zip(alone, got):
        assert_bitwise(a, b, "batched decode at mixed positions")


def test_plain_mode_is_not_invariant_by_accident(tiny_model_fp32):
    """Sanity check that the tests above can fail: the plain (non-invariant) kernels differ between paths."""
    m = OnDevice(copy.deepcopy(tiny_model_fp32), "cpu")
    (seq,) = sequences([65], seed=5)
    with kernels.kernel_mode(batch_invariant=False):
        alone = logprobs_alone(m, seq)
        stepwise = logprobs_prefill_then_decode(m, seq, 0)
    assert not torch.equal(alone, stepwise)
    assert torch.allclose(alone, stepwise, atol=1e-4)
