"""``rlplat merge CKPT... [--weights ...] [--schedule ...] --out DIR``: Warmup-Stable-Merge averaging."""

from __future__ import annotations

import argparse

from rich.console import Console


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="average checkpoints (Warmup-Stable-Merge) into a loadable HF checkpoint",
        description=(
            "Average HF checkpoint directories (or trainer checkpoints with an hf/ export), oldest first. "
            "Coefficients come from a decay schedule over the k = N-1 updates between them "
            "(c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k) or from explicit --weights summing to 1."
        ),
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories, oldest first")
    p.add_argument("--out", required=True, help="output directory (HF format)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="explicit merge coefficients")
    p.add_argument(
        "--schedule",
        default="linear",
        choices=("linear", "cosine", "inverse-sqrt"),
        help="decay schedule the merge emulates (ignored with --weights)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlplat.train.checkpoint import merge_checkpoints

    out, coeffs = merge_checkpoints(args.checkpoints, args.out, weights=args.weights, schedule=args.schedule)
    shown = ", ".join(f"{c:.4f}" for c in coeffs)
    Console().print(f"merged {len(coeffs)} checkpoint(s) with coefficients [{shown}] into {out}")
    return 0
