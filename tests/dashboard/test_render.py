import json
import re

import pytest

from rlplat.dashboard import metrics_schema as M
from rlplat.dashboard import render
from rlplat.dashboard.render import dashboard_data, render_dashboard, render_html


def _figures(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S)
    assert match
    return json.loads(match.group(1))


def test_page_is_self_contained_and_has_every_chart(synthetic_run):
    path = render_dashboard(synthetic_run)
    assert path == synthetic_run / M.DASHBOARD_FILE
    html = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html), "scripts must be inline (no network)"
    assert not re.search(r"<link[^>]*href=\"(https?:)?//", html)
    assert "Plotly" in html and "plotly.js" in html
    figs = _figures(html)
    assert set(figs) == {c.id for c in M.CHARTS}
    for chart in M.CHARTS:
        fig = figs[chart.id]
        assert fig["data"], chart.id
        assert "annotations" not in fig["layout"]
        for trace, series in zip(fig["data"], chart.series):
            every_step = series.key not in (M.ACCURACY_EVAL, M.REWARD_EVAL_MEAN)
            assert trace["x"] == (list(range(20)) if every_step else [0, 5, 10, 15])
            assert all(isinstance(y, float) for y in trace["y"])
    assert figs["step_time"]["layout"]["barmode"] == "stack"
    assert [t["type"] for t in figs["step_time"]["data"]] == ["bar"] * 5


def test_rollout_table_is_escaped_newest_first(synthetic_run):
    html = render_html(synthetic_run)
    table = html[html.index('<div id="rollouts">') :]
    assert "&lt;answer&gt;" in table and "<answer>" not in table
    steps = [int(s) for s in re.findall(r'<td class="num">(\d+)</td>\s*<td><pre>Q', table)]
    assert steps[0] == 19 and steps == sorted(steps, reverse=True)
    assert len(steps) == min(20 * 4, render.MAX_ROLLOUTS)
    assert "policy_version: 19" in table
    assert '<details id="config"><summary>config.yaml</summary>' in html and "seed: 0" in html


def test_missing_metrics_give_empty_charts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / M.METRICS_FILE).write_text(json.dumps({"step": 0, M.REWARD_MEAN: 0.5}) + "\n")
    figs = _figures(render_html(run))
    assert figs["reward"]["data"][0]["y"] == [0.5]
    assert figs["entropy"]["data"] == []
    assert figs["entropy"]["layout"]["annotations"][0]["text"] == "no data yet"
    assert "no rollouts yet" in render_html(run)


def test_fresh_run_with_empty_files_renders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / M.METRICS_FILE).touch()
    (run / M.ROLLOUTS_FILE).touch()
    figs = _figures(render_dashboard(run).read_text())
    assert all(f["data"] == [] for f in figs.values())


def test_malformed_lines_are_skipped_and_noted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        json.dumps({"step": 0, M.KL_REF: 0.1}),
        "[1, 2]",
        json.dumps({M.KL_REF: 0.3}),  # no step
        json.dumps({"step": 1, M.KL_REF: 0.2, "note": "text"}),
        json.dumps({"step": 1, M.KL_REF: 0.25}),  # a resumed run redid step 1: this line wins
        json.dumps({"step": 2, M.KL_REF: None}),  # NaN written as null: a gap
        '{"step": 3, "kl/r',  # crash mid-write
    ]
    (run / M.METRICS_FILE).write_text("\n".join(lines))
    (run / M.ROLLOUTS_FILE).write_text(
        '{"step": 0, "prompt": "p", "response": "r", "reward": 1}\n{"step": 1, "pro\n'
    )
    html = render_html(run)
    fig = _figures(html)["kl_ref"]
    assert fig["data"][0]["x"] == [0, 1, 2]
    assert fig["data"][0]["y"] == [0.1, 0.25, None]
    assert "metrics.jsonl: skipped 3 malformed lines (line 2: not a JSON object; line 3: no integer" in html
    assert "line 7: not JSON" in html
    assert "rollouts.jsonl (last 50 lines): skipped 1 malformed line" in html


def test_tail_reader_crosses_blocks(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"step": i, "prompt": "x" * (i % 7)}) + "\n" for i in range(100)))
    lines = render._tail_lines(path, 10, block=16)
    assert [json.loads(line)["step"] for line in lines] == list(range(90, 100))
    assert len(render._tail_lines(path, 1000, block=16)) == 100


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        render_dashboard(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a run directory"):
        render_dashboard(tmp_path)


def test_data_endpoint_reports_changes(synthetic_run):
    first = dashboard_data(synthetic_run)
    assert not first["unchanged"] and set(first["sections"]) == {
        "summary",
        "notes",
        "rollouts",
        "all_metrics",
    }
    assert dashboard_data(synthetic_run, first["signature"]) == {
        "unchanged": True,
        "signature": first["signature"],
    }
    with (synthetic_run / M.METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": 20, M.REWARD_MEAN: 0.9}) + "\n")
    second = dashboard_data(synthetic_run, first["signature"])
    assert not second["unchanged"]
    assert second["figures"]["reward"]["data"][0]["x"][-1] == 20
