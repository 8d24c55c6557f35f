"""Parity of the Triton chunked linear attention (forward and backward) with a token-by-token recurrence."""

from __future__ import annotations

import os

import pytest
import torch

import kernels._buffers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from kernels.linear_attention import triton as impl  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cpu" if INTERPRET else "cuda"
# (B, T, H, D): T around the 64-token chunk edges; D = 48 is padded to 64; D = 128 splits S over two programs.
SHAPES = [(2, 1, 2, 16), (1, 63, 2, 16), (1, 64, 1, 32), (2, 65, 1, 32), (1, 130, 2, 16), (1, 40, 1, 48)]
SHAPES_SPLIT = [(1, 20, 1, 128)]
# fp32 tolerance: chunking reorders the sums (intra-chunk matmuls versus a running state), which changes
# rounding only; observed errors are ~2e-7, so 2e-5 relative leaves two orders of magnitude of headroom.
FP32_RTOL = 2e-5


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels._buffers, "POISON_OUTPUTS", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def naive_recurrence(q, k, v, log_decay, scale, initial_state=None):
    """S_t = λ_h S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t, one token at a time in fp32."""
    B, T, H, D = q.shape
    S = q.new_zeros(B, H, D, D, dtype=torch.float32) if initial_state is None else initial_state.float()
    lam = log_decay.float().exp()[None, :, None, None]
    outs = []
    for t in range(T):
        S = lam * S + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(outs, 1).to(q.dtype), S


def make_inputs(shape, dtype, with_state, seed=0):
    B, T, H, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).to(DEVICE) for _ in range(3))
    # Head decays from none (λ = 1) to strong; the Ring slopes lie in between.
    log_decay = -torch.linspace(0.0, 3.0, H).to(DEVICE) if H > 1 else torch.tensor([-0.05], device=DEVICE)
    h0 = torch.randn(B, H, D, D, generator=g).to(DEVICE) if with_state else None
    return q, k, v, log_decay, h0


def run(fn, q, k, v, log_decay, h0, do, dht, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if h0 is not None:
        leaves.append(h0.clone().requires_grad_())
    o, state = fn(*leaves[:3], log_decay, q.shape[-1] ** -0.5, leaves[3] if h0 is not None else None, **kw)
    outputs, grads = ([o, state], [do, dht]) if dht is not None else ([o], [do])
    torch.autograd.backward(outputs, grads)
    return [o.detach(), state.detach()] + [t.grad for t in leaves]


def compare(shape, dtype, with_state, final_grad, rtol, chunk_size=64):
    q, k, v, log_decay, h0 = make_inputs(shape, dtype, with_state)
    g = torch.Generator().manual_seed(1)
    B, T, H, D = shape
    do = torch.randn(B, T, H, D, generator=g).to(dtype).to(DEVICE)
    dht = torch.randn(B, H, D, D, generator=g).to(DEVICE) if final_grad else None
    ours = run(impl.chunk_linear_attention, q, k, v, log_decay, h0, do, dht, chunk_size=chunk_size)
    ref = run(naive_recurrence, q, k, v, log_decay, h0, do, dht)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < rtol, (name, rel_err(a, b))


@pytest.mark.parametrize("shape", SHAPES + SHAPES_SPLIT)
def test_fp32_with_state(shape):
    compare(shape, torch.float32, with_state=True, final_grad=True, rtol=FP32_RTOL)


@pytest.mark.parametrize("shape", [(2, 65, 2, 16), (1, 1, 1, 32)])
def test_fp32_without_state(shape):
    compare(shape, torch.float32, with_state=False, final_grad=False, rtol=FP32_RTOL)


def test_fp32_small_chunks():
    compare((1, 50, 2, 16), torch.float32, with_state=True, final_grad=True, rtol=FP32_RTOL, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [8, 48])
def test_bad_chunk_size_is_a_value_error(chunk_size):
    q, k, v, log_decay, _ = make_inputs((1, 4, 1, 16), torch.float32, with_state=False)
    with pytest.raises(ValueError, match="power of two"):
        impl.chunk_linear_attention(q, k, v, log_decay, 0.25, chunk_size=chunk_size)


def test_state_handoff_matches_one_pass():
    # Prefill of a prefix then continuation from its state equals one pass (up to rounding).
    q, k, v, log_decay, _ = make_inputs((1, 130, 2, 32), torch.float32, with_state=False)
    scale = 32**-0.5
    o, s = impl.chunk_linear_attention(q, k, v, log_decay, scale)
    o1, s1 = impl.chunk_linear_attention(q[:, :70], k[:, :70], v[:, :70], log_decay, scale)
    o2, s2 = impl.chunk_linear_attention(q[:, 70:], k[:, 70:], v[:, 70:], log_decay, scale, s1)
    assert rel_err(torch.cat([o1, o2], 1), o) < FP32_RTOL
    assert rel_err(s2, s) < FP32_RTOL


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("shape", [*SHAPES, *SHAPES_SPLIT, (2, 300, 4, 128)])
def test_gpu_bf16(shape):
    # Both sides compute in fp32 from the same bf16 inputs; the bf16 outputs and gradients carry 8 mantissa
    # bits (~4e-3 relative per rounding), hence 1e-2.
    compare(shape, torch.bfloat16, with_state=True, final_grad=True, rtol=1e-2)
