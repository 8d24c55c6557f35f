"""``rlplat bench …``: benchmarks that report only after a correctness check and write a dated result file
naming the hardware (see ``rlplat.bench.common``)."""

from __future__ import annotations


def register(sub) -> None:
    from rlplat.bench import kernels, model, rollout, train

    p = sub.add_parser("bench", help="benchmarks (results are written to a file naming the hardware)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    kernels.register(bench_sub)
    model.register(bench_sub)
    train.register(bench_sub)
    rollout.register(bench_sub)
