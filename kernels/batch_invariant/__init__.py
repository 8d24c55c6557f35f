"""Batch-invariant matmul and the primitives the other invariant kernels are built from.

``linear`` runs the Triton GEMM (fixed tiles, see ``triton.py``) when the kernel backend is "triton", else the
reference (library GEMM, rows padded to a multiple of 4). Every invariant GEMM of the model goes through it:
the projections, the experts, the router, the FP8 linear after dequantisation, and the LM head.
"""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float
from kernels.batch_invariant import reference
from kernels.batch_invariant.reference import ROW_MULTIPLE, pad_rows, rows_matmul, sigmoid, silu, tree_sum

__all__ = ["ROW_MULTIPLE", "linear", "pad_rows", "rows_matmul", "sigmoid", "silu", "tree_sum"]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x [..., K], weight [N, K]; batch-invariant unless the kernel mode turns it off."""
    check_float("x", x)
    check_float("weight", weight)
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x [..., K] and weight [N, K] must share K; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(f"linear: x is {x.dtype} but weight is {weight.dtype}; cast one of them first")
    mode = kernels.get_mode()
    if mode.batch_invariant:
        if mode.backend == "triton":
            return kernels.triton_module("batch_invariant").linear(x, weight)
        return reference.linear(x, weight)
    return reference.plain_linear(x, weight)
