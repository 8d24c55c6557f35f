"""``rlplat bench kernels --quick``: the correctness gate, then every op on both paths, written to a result file.

No timing is asserted (the machine is shared): the file's shape and the ratios' arithmetic are.
"""

import json
import math

import pytest

import rlplat.bench.kernels as bench_kernels
from rlplat.cli import main


def test_quick_benchmark_covers_every_op_path_and_decode_batch(tmp_path):
    assert main(["bench", "kernels", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels-*.json")
    doc = json.loads(path.read_text())
    assert doc["hardware"]
    quick = bench_kernels.Settings.quick()
    ops, paths = set(bench_kernels.OPS), set(bench_kernels.PATHS)
    assert {(r["op"], r["path"]) for r in doc["fwd_bwd"]} == {(o, p) for o in ops for p in paths}
    decode = {(r["op"], r["context"], r["batch"], r["path"]) for r in doc["decode"]}
    gemm_contexts = quick.contexts[:1]  # a GEMM has no context: measured once
    assert decode == {
        (o, L, b, p)
        for o in ops
        for L in (gemm_contexts if o == "gemm" else quick.contexts)
        for b in quick.decode_batches
        for p in paths
    }
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in doc["decode"])
    ms = {(r["op"], r["context"], r["batch"], r["path"]): r["ms"] for r in doc["decode"]}
    decode_ratios = [r for r in doc["ratios"] if r["phase"] == "decode"]
    assert {(r["op"], r["context"], r["batch"]) for r in decode_ratios} == {key[:3] for key in ms}
    for r in decode_ratios:
        key = (r["op"], r["context"], r["batch"])
        assert r["time_ratio"] == pytest.approx(ms[(*key, "invariant")] / ms[(*key, "plain")])
        assert r["meets_target"] == (r["time_ratio"] <= bench_kernels.TARGET)


def test_phases_choose_what_runs_and_a_bad_one_is_refused(tmp_path, capsys):
    args = ["bench", "kernels", "--quick", "--ops", "gemm", "--phases", "decode", "--decode-repeats", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels-*.json")
    doc = json.loads(path.read_text())
    assert doc["fwd_bwd"] == [] and {r["op"] for r in doc["decode"]} == {"gemm"}
    assert doc["settings"]["decode_repeats"] == 3
    capsys.readouterr()
    assert main(["bench", "kernels", "--quick", "--phases", "backward", "--out", str(tmp_path)]) == 2
    assert "unknown phase(s) ['backward']" in capsys.readouterr().err
    assert main(["bench", "kernels", "--quick", "--decode-repeats", "0", "--out", str(tmp_path)]) == 2
    assert "--decode-repeats 0: give at least 1" in capsys.readouterr().err


def test_an_interrupted_benchmark_writes_what_it_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C, or the SIGINT of a time limit (scripts/gpu_check.sh), mid-decode: the rows measured so far are
    written, marked interrupted, and the command exits 130."""
    measured = bench_kernels.bench_decode

    def interrupted_after_two(settings, log):
        rows = measured(settings, log)
        yield next(rows)
        yield next(rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_kernels, "bench_decode", interrupted_after_two)
    args = ["bench", "kernels", "--quick", "--ops", "gemm", "--phases", "decode", "--decode-repeats", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 130
    (path,) = tmp_path.glob("kernels-*.json")
    doc = json.loads(path.read_text())
    assert doc["interrupted"] is True
    assert {r["path"] for r in doc["decode"]} == set(bench_kernels.PATHS) and len(doc["decode"]) == 2
    assert [r["phase"] for r in doc["ratios"]] == ["decode"]
    assert "partial" in capsys.readouterr().out
