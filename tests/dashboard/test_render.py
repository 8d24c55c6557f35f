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
    run = render.load_run(synthetic_run)
    for chart in M.CHARTS:
        fig = figs[chart.id]
        assert fig["data"], chart.id
        assert "annotations" not in fig["layout"] and fig["note"] == ""
        assert "title" not in fig["layout"], "titles are HTML above the plot, where nothing draws over them"
        # Every series the run logs is drawn (kl_ref: the loss-mode KL only; per_term: one per reward term).
        logged = [s for s in render.chart_series(chart, run) if any(s.key in r for r in run.metrics)]
        assert [t["name"] for t in fig["data"]] == [s.label for s in logged]
        for trace, series in zip(fig["data"], logged):
            every_step = series.key not in (M.ACCURACY_EVAL, M.REWARD_EVAL_MEAN)
            assert trace["x"] == (list(range(20)) if every_step else [0, 5, 10, 15])
            assert all(isinstance(y, int | float) for y in trace["y"])
        assert f'<h3 class="chart-title">{chart.title}</h3>' in html
    assert figs["step_time"]["layout"]["barmode"] == "stack"
    assert [t["type"] for t in figs["step_time"]["data"]] == ["bar"] * 5
    assert [t["name"] for t in figs["reward_terms"]["data"]] == ["math", "format"]
    assert [t["name"] for t in figs["clip_frac"]["data"]] == [
        "any",
        "low (A < 0)",
        "high (A > 0)",
        "dual (A < 0)",
    ]
    for chart_id, key in (("loss", M.TRAIN_LOSS), ("grad_norm", M.TRAIN_GRAD_NORM), ("lr", M.TRAIN_LR)):
        assert figs[chart_id]["data"][0]["y"] == [r[key] for r in run.metrics]
    assert "displayModeBar: false" in html


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


def _annotation(fig) -> str:
    return fig["layout"]["annotations"][0]["text"]


def test_features_off_in_the_config_say_so(sync_run):
    html = render_html(sync_run)
    figs = _figures(html)
    assert _annotation(figs["kl_ref"]) == "off in this run<br>no reference policy<br>(algo.kl.mode: none)"
    assert (
        _annotation(figs["stream"])
        == "off in this run<br>no experience stream in sync mode<br>(run.mode: sync)"
    )
    assert (
        _annotation(figs["icepop"])
        == "off in this run<br>IcePop is not the correction<br>(algo.correction.method: none)"
    )
    assert figs["accuracy"]["note"] == "held-out eval: off in this run (run.eval_every: 0)"
    assert figs["reward"]["note"] == "eval: off in this run (run.eval_every: 0)"
    assert [t["name"] for t in figs["accuracy"]["data"]] == ["train"]
    # Not a switch: the run has RL steps but logs no per-term means (older runs, or not added yet).
    assert _annotation(figs["reward_terms"]) == "not recorded by this run"
    assert not any("no data yet" in json.dumps(f) for f in figs.values())
    for chart_id in ("loss", "grad_norm", "lr", "clip_frac", "reward_errors"):
        assert figs[chart_id]["data"] and "annotations" not in figs[chart_id]["layout"], chart_id
    summary = html[html.index('<div id="summary">') : html.index('<div id="notes">')]
    assert "off in this run (algo.kl.mode: none)" in summary
    assert "off in this run (run.eval_every: 0)" in summary


def test_reward_terms_come_from_config_and_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / M.CONFIG_FILE).write_text(
        "rewards:\n  terms:\n    - {name: math}\n    - {name: think_format, label: format}\n"
        "    - {name: length}\n"
    )
    record = {"step": 1, "reward/math_mean": 0.5, "reward/length_mean": 0.1, "reward/judge_mean": 0.7}
    record |= {M.REWARD_EVAL_MEAN: 0.4, "reward/math/score_mean": 0.5, M.REWARD_ERRORS: 3}
    record |= {"reward/math_errors": 0, "reward/judge_errors": 3}
    (run / M.METRICS_FILE).write_text(json.dumps(record) + "\n")
    figs = _figures(render_html(run))
    # Config order, then logged terms; format has no data; reward/eval_mean is the eval reward, not a term.
    assert render.reward_terms(render.load_run(run)) == ["math", "format", "length", "judge"]
    assert [t["name"] for t in figs["reward_terms"]["data"]] == ["math", "length", "judge"]
    assert figs["reward_errors"]["data"][0]["y"] == [3.0]
    # per term too, after the total: which term fails
    assert [(t["name"], t["y"]) for t in figs["reward_errors"]["data"]] == [
        ("errors", [3.0]),
        ("math", [0.0]),
        ("judge", [3.0]),
    ]


def test_not_recorded_differs_from_no_data_yet(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / M.METRICS_FILE).write_text(json.dumps({"step": 0, M.ACCURACY_EVAL: 0.25}) + "\n")
    assert _annotation(_figures(render_html(run))["loss"]) == "no data yet"  # only the starting policy
    with (run / M.METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": 1, M.REWARD_MEAN: 0.3}) + "\n")
    assert _annotation(_figures(render_html(run))["loss"]) == "not recorded by this run"


def test_bad_config_is_noted_and_decides_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / M.CONFIG_FILE).write_text("algo: {kl: [unclosed\n")
    (run / M.METRICS_FILE).write_text(json.dumps({"step": 1, M.REWARD_MEAN: 0.3}) + "\n")
    html = render_html(run)
    assert "config.yaml: not valid YAML" in html
    assert _annotation(_figures(html)["kl_ref"]) == "not recorded by this run"


def test_hidden_text_is_made_visible(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer").mkdir()
    added = [{"id": 0, "content": "[END]", "special": True}, {"id": 1, "content": "plain", "special": False}]
    (run / M.TOKENIZER_FILE).write_text(json.dumps({"added_tokens": added}))
    responses = ["", "<eos>", "  \n", "7\x00\u200b", "<answer>7</answer>[END]<|im_end|>", "plain"]
    (run / M.ROLLOUTS_FILE).write_text(
        "".join(json.dumps({"step": 1, "prompt": "p", "response": r, "reward": 0}) + "\n" for r in responses)
    )
    table = render_html(run)
    table = table[table.index('<div id="rollouts">') :]
    cells = re.findall(r"<td><pre>(.*?)</pre></td>", table, re.S)[1::2]  # response cells, newest first
    cells.reverse()
    assert re.fullmatch(r'<span class="empty" title="empty response[^"]*">∅</span>', cells[0])
    assert cells[1] == '<span class="special" title="special token">&lt;eos&gt;</span>'
    assert cells[2] == '<span class="ws" title="whitespace-only text">␣␣↵\n</span>'
    assert cells[3] == (
        '7<span class="ctl" title="invisible character U+0000">\\x00</span>'
        '<span class="ctl" title="invisible character U+200B">\\u200b</span>'
    )
    assert cells[4] == (
        "&lt;answer&gt;7&lt;/answer&gt;"  # an ordinary tag stays plain text
        '<span class="special" title="special token">[END]</span>'  # the run's tokenizer's special token
        '<span class="special" title="special token">&lt;|im_end|&gt;</span>'
    )
    assert cells[5] == "plain"  # an added token that is not special


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
