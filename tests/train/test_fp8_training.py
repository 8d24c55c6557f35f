"""FP8 training: the forward is the inference forward bit for bit; the backward follows the blockwise recipe.

Tolerance of the FP8 gradients against exact fp32 gradients: e4m3 keeps 3 mantissa bits, so rounding one
operand to e4m3 has a relative error up to 2^-4 and about 2^-4/sqrt(12)*2 ≈ 3.6% rms for values spread over a
tile (measured: 3.3–3.7% relative Frobenius error on random data). Each gradient GEMM rounds two operands;
their errors are independent and add in quadrature, but the result is a sum over the contraction dim that
averages them back to ≈ 3.7%. A 6% bound leaves margin over the measurement without hiding a broken recipe
(using the wrong tiles or skipping a quantisation moves the error to 0% or above 10%).
"""

import pytest
import torch

import kernels
from kernels.fp8 import fp8_linear, reference
from kernels.fp8.reference import quantize_blockwise
from kernels.fp8.training import FP8LinearFunction
from rlplat.algos.config import AlgoConfig
from rlplat.train import Trainer, TrainerConfig

SHAPES = [(63, 128, 96), (200, 384, 256), (37, 48, 80)]  # awkward M, K or N not multiples of 128


def dq(x, bm, bk):
    q, s = quantize_blockwise(x.float(), bm, bk)
    return reference.dequantize_blockwise(q, s, bm, bk)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("invariant", [True, False])
def test_forward_is_the_inference_forward_bitwise(dtype, invariant):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 160, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(96, 160, generator=g) * 0.05).to(dtype).requires_grad_(True)
    with kernels.kernel_mode(batch_invariant=invariant):
        y = fp8_linear(x, w)
    assert y.grad_fn is not None and y.dtype == dtype
    assert torch.equal(y, reference.fp8_linear(x.detach(), w.detach(), invariant=invariant))


@pytest.mark.parametrize("M, K, N", SHAPES)
def test_backward_is_the_blockwise_recipe(M, K, N):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).requires_grad_(True)
    w = (torch.randn(N, K, generator=g) * 0.05).requires_grad_(True)
    dy = torch.randn(M, N, generator=g)
    FP8LinearFunction.apply(x, w, True).backward(dy)
    # dgrad: dy in 1x128 tiles along N, W in 128x128 blocks; wgrad: dy^T and x^T in 1x128 tiles along M
    expected_dx = dq(dy, 1, 128) @ dq(w.detach(), 128, 128)
    expected_dw = dq(dy.t().contiguous(), 1, 128) @ dq(x.detach().t().contiguous(), 1, 128).t()
    torch.testing.assert_close(x.grad, expected_dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, expected_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_close_to_exact(M, K, N, dtype):
    g = torch.Generator().manual_seed(M + 1)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g)
    xq, wq = x.to(dtype).clone().requires_grad_(True), w.to(dtype).clone().requires_grad_(True)
    fp8_linear(xq, wq).backward(dy.to(dtype))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (xr @ wr.t()).backward(dy)
    assert rel(xq.grad, xr.grad) < 0.06
    assert rel(wq.grad, wr.grad) < 0.06
    assert xq.grad.dtype == dtype and wq.grad.dtype == dtype


def test_no_grad_path_unchanged():
    x, w = torch.randn(5, 130), torch.randn(70, 130)
    with torch.no_grad():
        assert torch.equal(fp8_linear(x, w), reference.fp8_linear(x, w))


def test_fp8_model_trains_close_to_bf16(tiny_model, make_batch):
    """One step of the FP8 model from the same bf16 weights: same loss up to FP8 forward error, a gradient
    norm within 10%, and the router and LM head stay out of FP8."""
    batch = make_batch(B=4, T=12)
    outs = {}
    for precision in ("bf16", "fp8"):
        trainer = Trainer(tiny_model(), AlgoConfig(), TrainerConfig(lr=1e-3), precision=precision)
        outs[precision] = trainer.train_step(batch)
        if precision == "fp8":
            assert not hasattr(trainer.model.lm_head, "fp8")
            assert trainer.model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    assert outs["fp8"]["grad_norm"] == pytest.approx(outs["bf16"]["grad_norm"], rel=0.1)
    assert outs["fp8"]["entropy"] == pytest.approx(outs["bf16"]["entropy"], rel=1e-2)
