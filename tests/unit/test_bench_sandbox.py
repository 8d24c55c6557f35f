"""``rlplat bench sandbox``: the correctness gate runs first, then the result file has the common format."""

import json

from rlplat.cli import main


def test_sandbox_benchmark_writes_the_common_result_format(tmp_path):
    args = ["bench", "sandbox", "--programs", "4", "--workers", "2", "--baseline-programs", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("code_sandbox-*.json")
    doc = json.loads(written.read_text())
    assert doc["benchmark"] == "code_sandbox" and doc["hardware"]["cpu"] and doc["date_utc"]
    assert doc["passed"] == 4 and doc["baseline"]["passed"] == 2  # only correct programs are timed
    assert doc["programs_per_s"] > 0 and doc["sandbox_mode"]
