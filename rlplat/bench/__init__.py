"""``rlplat bench …``: benchmarks that report only after a correctness check and write a dated result file
naming the hardware (``rlplat.bench.common.write_result``, the one result format). ``rlplat.bench.megatron``
runs under ``torchrun`` instead (one process per rank)."""

from __future__ import annotations


def register(sub) -> None:
    from rlplat.bench import kernels, loop, model, rollout, sandbox, train

    p = sub.add_parser("bench", help="benchmarks (results are written to a file naming the hardware)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    kernels.register(bench_sub)
    model.register(bench_sub)
    train.register(bench_sub)
    rollout.register(bench_sub)
    sandbox.register(bench_sub)
    loop.register(bench_sub)
