"""Batch-invariant primitives: GEMMs whose rows do not depend on their batch, order-fixed reductions, exp-based gates.

Why these exist (measured with torch 2.13's CPU build, whose GEMMs are MKL's and oneDNN's):
- A CPU GEMM gives each output row the same bits however many rows share the call, *provided the number of
  rows M is a multiple of 4*. Swept on an AMD EPYC Zen 4 (AVX-512, K from 80 to 2048, N from 96 to 8192):
  fp32 rows differ from the same rows inside a larger call for M in {1, 2, 3} on one thread, {1, 2, 3, 5, 6, 7,
  9, 10, 11} on 2 to 8 threads, and further M ≡ 1, 2, 3 (mod 4) as the threads grow (17–19 and 25–27 at 12 and
  16 threads, up to 169–171 at 64): MKL splits the rows among its threads and a piece of fewer than four rows
  takes its small-M path. Every multiple of 4 from 4 to 256 agreed with the large call, on 1 to 64 threads,
  across thread counts, for every shape, row position and batched (``bmm``) call tried; bf16 differs only at
  M = 1 (K = 2048, N = 6144). Earlier one- and two-thread measurements on an Intel Xeon (AVX-512), an AMD
  EPYC (AVX2) and a Zen 5 found the same sets, multiples of 4 always agreeing. :func:`rows_matmul` and
  :func:`linear` therefore pad M with zero rows to the next multiple of ``ROW_MULTIPLE``, so a decode step's
  single row goes through the same path as a prefill's many.
  That costs at most three rows at training sizes, and a 4-row GEMM for a decode GEMV (measured with
  ``rlplat bench kernels --phases decode``). An earlier 16-row minimum was not enough beyond 8 threads.
- fp32 on x86 runs on oneDNN's inner product (:func:`library_gemm`) rather than MKL's sgemm. MKL's 4-row GEMM
  takes 2.4× its GEMV's time at 2048 → 6144 (7.2 vs 3.0 ms on 2 Zen 4 cores), which made a single-sequence
  decode step pay for exactness; oneDNN's takes 2.1 ms, and its 2048-row call is 12% faster than MKL's (below
  ``ONEDNN_MIN_WEIGHT`` weight elements MKL stays: oneDNN's fixed cost per call outweighs its gain). Its rows
  agree with a 2048-row call at every multiple of 4 up to 2044, on 1 to 16 threads and across them, for K from 80
  to 2048 and N from 96 to 6144, at any row offset, with its AVX-512 kernel and with its AVX2 kernel (forced with
  ``ONEDNN_MAX_CPU_ISA=AVX2``, as on an AVX2-only CPU); M = 1 goes to another kernel and differs (padded away).
  bf16 ``F.linear`` already is oneDNN on CPUs with bf16 instructions.
  ``tests/kernels/test_invariant_gemm.py`` re-checks the property on the machine it runs on, on 1, 2 and 16
  threads, and names the M if a library rounds a multiple of 4 differently.
- ``torch.sigmoid``, ``F.silu`` and ``torch.rsqrt`` round differently on the scalar tail of a vectorised loop
  than in its vector body, so a value's result depends on its offset in the tensor. ``exp``, ``log``, ``sqrt``,
  ``sin``, ``cos`` and the IEEE operations ``+ - * /`` do not. Gates are therefore written as ``1 / (1 + exp(-x))``
  and norms as ``x / sqrt(ms + eps)``.
- Reductions whose strategy may depend on the number of rows or on threading are replaced by a pairwise
  halving sum (:func:`tree_sum`) built from elementwise additions. Its result does not depend on the other
  rows, and zero padding to any larger power of two leaves it unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ROW_MULTIPLE = 4


def pad_rows(a: torch.Tensor) -> torch.Tensor:
    """``a`` [..., M, K] with zero rows appended up to the next multiple of ``ROW_MULTIPLE`` (``a`` itself if M is
    one already)."""
    extra = -a.shape[-2] % ROW_MULTIPLE
    return F.pad(a, (0, 0, 0, extra)) if extra else a


def rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched like ``torch.matmul``) where each row of ``a`` gets the same bits whatever ``a``'s
    number of rows M: M is padded with zero rows to a multiple of ``ROW_MULTIPLE`` (see the module docstring)."""
    M = a.shape[-2]
    return (pad_rows(a) @ b)[..., :M, :]


# oneDNN's call costs ~10 µs more than MKL's; below this many weight elements (measured crossover at 4 and 256
# rows, 2 Zen 4 cores) MKL is the faster one. The choice depends on the weight's shape, never on M.
ONEDNN_MIN_WEIGHT = 1 << 17


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on an x86 CPU with a weight large enough: the GEMMs swept on (see the module docstring). bf16
    ``F.linear`` is oneDNN already where the CPU has bf16 instructions; elsewhere it is torch's own kernel,
    which the sweep did not cover."""
    return (
        x.dtype == torch.float32
        and weight.numel() >= ONEDNN_MIN_WEIGHT
        and x.device.type == "cpu"
        and _x86_with_onednn()
    )


@functools.cache
def _x86_with_onednn() -> bool:
    """oneDNN is built in and ATen runs x86 vector code (``ATEN_CPU_CAPABILITY`` can lower it): fixed for the
    life of the process, so asked once."""
    capability = torch.backends.cpu.get_cpu_capability()
    return torch.backends.mkldnn.is_available() and capability in ("AVX2", "AVX512")


def library_gemm(x_MK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for M a multiple of ``ROW_MULTIPLE``, on the library GEMM the module docstring measured."""
    if _uses_onednn(x_MK, weight_NK):
        # oneDNN's inner product (the op Inductor's CPU backend calls): no bias, no fused activation
        return torch.ops.mkldnn._linear_pointwise(x_MK, weight_NK.contiguous(), None, "none", [], "")
    return F.linear(x_MK, weight_NK)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x [..., K], weight [N, K], each row's result independent of how many rows come with it."""
    *lead, k = x.shape
    return _PaddedLinear.apply(x.reshape(-1, k), weight).reshape(*lead, weight.shape[0])


class _PaddedLinear(torch.autograd.Function):
    """The forward pads the rows; the backward, which only needs to be deterministic, is two library GEMMs on the
    rows as they are (padding there would only add zero rows to allocate and multiply)."""

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_MK, weight_NK)
        return library_gemm(pad_rows(x_MK), weight_NK)[: x_MK.shape[0]]

    @staticmethod
    def backward(ctx, grad_MN: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_MK, weight_NK = ctx.saved_tensors
        grad_x = grad_MN @ weight_NK if ctx.needs_input_grad[0] else None
        grad_w = grad_MN.t() @ x_MK if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


class _TreeSum(torch.autograd.Function):
    """Pairwise-halving sum over the last dim; its backward broadcasts the gradient (d sum / d x_i = 1) in one op
    instead of unwinding every halving level's slices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        ctx.n = n
        size = 1 << max(n - 1, 0).bit_length()
        if size != n:
            x = F.pad(x, (0, size - n))
        while size > 1:
            size //= 2
            x = x[..., :size] + x[..., size:]
        return x[..., 0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.unsqueeze(-1).expand(*grad.shape, ctx.n)


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` by pairwise halving (first half + second half), zero-padded to a power of two."""
    return _TreeSum.apply(x.movedim(dim, -1))


class _Sigmoid(torch.autograd.Function):
    """``1 / (1 + exp(-x))`` forward (see the module docstring); the usual s·(1 − s) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = 1.0 / (1.0 + torch.exp(-x))
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return grad * s * (1.0 - s)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return _Sigmoid.apply(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)
