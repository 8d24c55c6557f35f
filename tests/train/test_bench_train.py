import argparse
import json

from rlplat.bench.train import register


def test_quick_bench_writes_a_result(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["train", "--quick", "--out", str(tmp_path)])
    assert args.func(args) == 0
    (path,) = tmp_path.glob("train-*.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "train" and doc["hardware"]["cpu"]
    assert {r["precision"] for r in doc["throughput"]} == {"fp32", "fp8"}
    assert all(r["tokens_per_s"] > 0 for r in doc["throughput"])
    assert all(c["logprobs_bitwise"] for c in doc["correctness"])
    gap = doc["fp8_vs_bf16_loss"]["final_loss_relative_gap"]
    assert gap == gap and abs(gap) < 0.5
