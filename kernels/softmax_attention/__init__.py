"""Public softmax-attention op (training, prefill and decode share it; see reference.py for the masking rule)."""

from __future__ import annotations

import torch

import kernels
from kernels._checks import check_float, check_ndim
from kernels.softmax_attention import reference


def softmax_attention(
    q_BTHD: torch.Tensor, k_BTGD: torch.Tensor, v_BTGD: torch.Tensor, q_pos_BT: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal GQA attention. q [B,Tq,H,D], k/v [B,Tk,G,D] (H divisible by G), q_pos [B,Tq] absolute positions.

    v may also come as the KV cache keeps it (``rlplat.models.cache``): [B,Tk,G,D + ONES_COLUMNS], each value
    followed by that many ones (``reference.values_with_ones``), which the block-aligned CPU form multiplies by
    the probabilities in the same GEMM as the values to get their row sums; the other forms ignore them."""
    check_ndim("q", q_BTHD, 4, "B, Tq, H, D")
    check_ndim("k", k_BTGD, 4, "B, Tk, G, D")
    for name, t in (("q", q_BTHD), ("k", k_BTGD), ("v", v_BTGD)):
        check_float(name, t)
    B, Tq, H, D = q_BTHD.shape
    if (
        k_BTGD.shape[0] != B
        or k_BTGD.shape[3] != D
        or v_BTGD.shape[:3] != k_BTGD.shape[:3]
        or v_BTGD.shape[3] not in (D, D + reference.ONES_COLUMNS)
    ):
        raise ValueError(
            f"softmax_attention: k must be [B={B}, Tk, G, D={D}] and v the same, or [B, Tk, G, "
            f"D + {reference.ONES_COLUMNS}] as the KV cache keeps values (followed by ones); "
            f"got k {tuple(k_BTGD.shape)}, v {tuple(v_BTGD.shape)}"
        )
    if H % k_BTGD.shape[2]:
        raise ValueError(
            f"softmax_attention: {H} query heads are not divisible by {k_BTGD.shape[2]} kv heads"
        )
    if tuple(q_pos_BT.shape) != (B, Tq):
        raise ValueError(f"softmax_attention: q_pos must be [B={B}, Tq={Tq}], got {tuple(q_pos_BT.shape)}")
    if k_BTGD.dtype != v_BTGD.dtype:
        raise ValueError(f"softmax_attention: k is {k_BTGD.dtype} but v is {v_BTGD.dtype}; cache them alike")
    if q_pos_BT.numel() and int(q_pos_BT.max()) >= k_BTGD.shape[1]:
        raise ValueError(
            f"softmax_attention: a query sits at position {int(q_pos_BT.max())} but only {k_BTGD.shape[1]} keys "
            "were given; append the new keys to the cache first"
        )
    mode = kernels.get_mode()
    if mode.batch_invariant:
        if mode.backend == "triton":
            return kernels.triton_module("softmax_attention").block_attention(
                q_BTHD, k_BTGD, v_BTGD[..., :D], q_pos_BT, scale
            )
        return reference.attention_invariant(q_BTHD, k_BTGD, v_BTGD, q_pos_BT, scale)
    return reference.attention_plain(q_BTHD, k_BTGD, v_BTGD, q_pos_BT, scale)
