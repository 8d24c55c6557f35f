"""`rlplat reward CASES.jsonl --reward NAME` end to end, with malformed and non-UTF-8 lines."""

from __future__ import annotations

import json

from rewards.cli import main, parse_kv


def test_cli_scores_and_survives_bad_lines(tmp_path, capsys):
    path = tmp_path / "cases.jsonl"
    lines = [
        json.dumps({"id": "ok", "response": "so \\boxed{4}", "label": "4"}).encode(),
        json.dumps({"id": "wrong", "response": "\\boxed{5}", "label": "4"}).encode(),
        b"{not json",
        b'{"response": "\xff\xfe bad bytes", "label": "1"}',
        json.dumps({"id": "nolabel", "response": "4"}).encode(),
        json.dumps({"response": 12}).encode(),
        b"",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out_json = tmp_path / "out.jsonl"
    rc = main(["reward", str(path), "--reward", "math", "--args", "correct=2", "--json-out", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "6 cases" in text and "mean score" in text
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["score"] for r in rows] == [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert (
        "not UTF-8" in rows[3]["error"]
        and "JSONDecodeError" in rows[2]["error"]
        and rows[4]["verdict"] == "no_label"
    )


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["reward", str(tmp_path / "missing.jsonl"), "--reward", "math"]) == 2
    (tmp_path / "c.jsonl").write_text("{}\n")
    assert main(["reward", str(tmp_path / "c.jsonl"), "--reward", "nonexistent_reward"]) == 2
    assert parse_kv(["a=1", "b=x", 'c={"k": [1]}', "d=true"]) == {
        "a": 1,
        "b": "x",
        "c": {"k": [1]},
        "d": True,
    }


def test_cli_takes_plugin_files_and_shows_the_first_error(tmp_path, capsys, monkeypatch):
    """The README's plugin walk-through: a file with an @reward, scored by name (--plugin) and by path."""
    from rewards import registry

    registry.registered()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FILE_MODULES", {})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(
        "from rewards import reward\n\n\n"
        '@reward("exact_match")\n'
        "def exact_match(sample, ignore_case: bool = False):\n"
        "    if sample.label is None:\n"
        "        raise ValueError('[case] has no label')\n"
        "    got, want = sample.response.strip(), str(sample.label)\n"
        "    return float(got.lower() == want.lower() if ignore_case else got == want)\n"
    )
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        "\n".join(
            json.dumps(c)
            for c in (
                {"response": "Paris", "label": "paris"},
                {"response": "Rome", "label": "Paris"},
                {"response": "x"},
            )
        )
    )
    assert (
        main(["reward", str(cases), "--plugin", "my_rewards.py", "--reward", "exact_match", "--quiet"]) == 0
    )
    text = capsys.readouterr().out
    assert "3 cases" in text and "accuracy 0.0000" in text and "errors 1" in text
    assert "first error: ValueError: [case] has no label" in text
    args = ["--reward", "my_rewards.py:exact_match", "--args", "ignore_case=true", "--quiet"]
    assert main(["reward", str(cases), *args]) == 0
    assert "accuracy 0.3333" in capsys.readouterr().out
