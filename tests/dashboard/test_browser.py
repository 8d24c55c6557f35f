"""The dashboard in a real headless Chromium: the file:// page and the served live page load, every chart draws
its points, nothing covers a chart's title (no plotly toolbar), charts of features that are off say so, the
rollout table shows empty responses, special tokens and whitespace visibly, and the console has no errors.

Needs /usr/bin/chromium and /usr/bin/chromedriver (``scripts/install_browser.sh``) and selenium. Skipped when
they are missing on a developer machine; under CI (env CI set) a missing browser fails instead, so CI cannot
silently stop testing the page.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from rlplat.dashboard import metrics_schema as M
from rlplat.dashboard.render import chart_series, load_run, render_dashboard
from rlplat.dashboard.serve import make_server, serve_in_thread
from rlplat.runlog import RunLog

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,2400",
)
STEPS = 20  # conftest.write_synthetic_run


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the browser test: run scripts/install_browser.sh")
    pytest.skip(f"{why} (run scripts/install_browser.sh)")


@pytest.fixture
def driver(tmp_path):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        _unavailable(f"{', '.join(missing)} not found")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


# Per chart: points in its data, points drawn in the SVG (scatter markers and bars), its text (title, note
# and plot), whether its title is visible and uncovered, and the plotly toolbars (modebars) it shows.
CHART_STATE_JS = """
const boxes = (root, sel) => Array.from(root.querySelectorAll(sel)).map(e => e.getBoundingClientRect())
  .filter(r => r.width > 0 && r.height > 0);
const overlap = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
return Array.from(document.querySelectorAll('.plot')).map(p => {
  const section = p.closest('section.chart');
  const title = section.querySelector('.chart-title');
  title.scrollIntoView({block: 'center'});  // elementFromPoint only sees the viewport
  const t = title.getBoundingClientRect();
  // What plotly draws or floats over the page: its toolbar, legend, annotations, hover labels.
  const drawn = boxes(section, '.modebar-container, .modebar, .legend, .annotation, .hoverlayer > *');
  return {
    id: p.dataset.chart,
    rendered: !!p._fullLayout,
    traces: (p.data || []).length,
    dataPoints: (p.data || []).reduce((n, t) => n + t.x.length, 0),
    svgTraces: p.querySelectorAll('.scatterlayer .trace, .barlayer .trace').length,
    svgPoints: p.querySelectorAll('.scatterlayer .point, .barlayer .point').length,
    text: section.textContent,
    title: title.textContent,
    titleVisible: t.width > 0 && t.height > 0 && document.elementFromPoint(t.left + 2, t.top + t.height / 2) === title,
    titleCovered: drawn.some(r => overlap(r, t)),
    modebars: boxes(section, '.modebar').length,
  };
});
"""
ABSENT = ("no data yet", "not recorded by this run", "off in this run")
# conftest.write_sync_run's responses, and what the rollout table must show for each.
SHOWN = {"": "∅", "<eos>": "<eos>", "  \n": "␣␣↵", "7\x00": "7\\x00"}


def _expected_points(chart, run) -> int:
    """Points the chart must draw: every logged value of its series (eval ones every EVAL_EVERY=5 steps)."""
    return sum(sum(s.key in r for r in run.metrics) for s in chart_series(chart, run))


def _wait_for_charts(drv):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, 30).until(lambda d: all(c["rendered"] for c in d.execute_script(CHART_STATE_JS)))
    return {c["id"]: c for c in drv.execute_script(CHART_STATE_JS)}


def _console_errors(drv) -> list[dict]:
    return [entry for entry in drv.get_log("browser") if entry["level"] == "SEVERE"]


def _hover_every_chart(drv):
    """Move the mouse over each plot: plotly shows its toolbar and hover labels on hover."""
    from selenium.webdriver.common.action_chains import ActionChains

    for plot in drv.find_elements("css selector", ".plot"):
        drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", plot)
        ActionChains(drv).move_to_element(plot).perform()


def _check_charts(drv, run_dir):
    """Every chart draws all the points the run logged, under an uncovered title, with no toolbar."""
    run = load_run(run_dir)
    charts = _wait_for_charts(drv)
    assert set(charts) == {c.id for c in M.CHARTS}
    _hover_every_chart(drv)
    hovered = {c["id"]: c for c in drv.execute_script(CHART_STATE_JS)}
    for chart in M.CHARTS:
        state = charts[chart.id]
        logged = [s for s in chart_series(chart, run) if any(s.key in r for r in run.metrics)]
        assert state["traces"] == state["svgTraces"] == len(logged), state
        assert state["dataPoints"] == state["svgPoints"] == _expected_points(chart, run), state
        assert state["title"] == chart.title and state["titleVisible"], state
        for s in (state, hovered[chart.id]):
            assert s["modebars"] == 0 and not s["titleCovered"], s
    return charts


def _check_page(drv, run_dir):
    charts = _check_charts(drv, run_dir)
    for state in charts.values():  # every feature of the synthetic run is on and logged
        assert state["traces"] > 0 and not any(a in state["text"] for a in ABSENT), state
    for chart_id, n in (("loss", 1), ("grad_norm", 1), ("lr", 1), ("clip_frac", 4), ("reward_errors", 1)):
        assert charts[chart_id]["svgTraces"] == n, charts[chart_id]
    assert charts["reward_terms"]["svgTraces"] == 2  # conftest.FULL_CONFIG's terms: math, format
    rows = drv.execute_script("return document.querySelectorAll('#rollouts table.rollouts tbody tr').length")
    assert rows > 0
    assert _console_errors(drv) == []


def test_file_page(driver, synthetic_run, tmp_path):
    page = render_dashboard(synthetic_run)
    driver.get(page.as_uri())
    _check_page(driver, synthetic_run)
    assert driver.execute_script("return document.getElementById('live').textContent") == ""
    _screenshots(driver, tmp_path / "dashboard-file")


def _screenshots(drv, stem):
    """The top of the page (headline numbers, first charts) and the rollout table, for a person to look at."""
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(f"{stem}-top.png")
    drv.execute_script("document.getElementById('rollouts').scrollIntoView()")
    drv.save_screenshot(f"{stem}-rollouts.png")


# The response cells of the rollout table: their text and the marked parts' class, text and size on screen.
RESPONSES_JS = """
return Array.from(document.querySelectorAll('#rollouts table.rollouts tbody tr')).map(tr => {
  const cell = tr.children[2];
  return {
    text: cell.innerText,
    marks: Array.from(cell.querySelectorAll('.empty, .special, .ws, .ctl')).map(e => {
      const r = e.getBoundingClientRect();
      return {cls: e.className, text: e.innerText, width: r.width, height: r.height};
    }),
  };
});
"""


def test_features_off_and_hidden_text(driver, sync_run, tmp_path):
    """A sync run without eval, KL, IcePop or per-term rewards: those charts say so; responses that plain
    text hides (empty, <eos>, whitespace, a NUL) are visible in the table."""
    driver.get(render_dashboard(sync_run).as_uri())
    charts = _check_charts(driver, sync_run)
    text = {chart_id: " ".join(state["text"].split()) for chart_id, state in charts.items()}
    for chart_id, why, setting in (
        ("kl_ref", "no reference policy", "(algo.kl.mode: none)"),
        ("stream", "no experience stream in sync mode", "(run.mode: sync)"),
        ("icepop", "IcePop is not the correction", "(algo.correction.method: none)"),
    ):
        assert all(part in text[chart_id] for part in ("off in this run", why, setting)), text[chart_id]
    assert "held-out eval: off in this run (run.eval_every: 0)" in text["accuracy"]
    assert "not recorded by this run" in text["reward_terms"]
    assert not any("no data yet" in t for t in text.values())
    for chart_id in ("loss", "grad_norm", "lr", "clip_frac", "reward_errors", "reward", "accuracy"):
        assert charts[chart_id]["svgPoints"] > 0 and not any(a in text[chart_id] for a in ABSENT[:2])
    raw = [r["response"] for r in load_run(sync_run).rollouts[: len(SHOWN)]]  # newest first, as the table
    assert sorted(raw) == sorted(SHOWN)
    responses = driver.execute_script(RESPONSES_JS)
    newest = responses[: len(SHOWN)]
    for response, raw_text in zip(newest, raw):
        shown = SHOWN[raw_text]
        assert response["text"].strip() == shown.strip(), (raw_text, response)
        assert response["marks"], (raw_text, response)
        assert all(m["width"] > 0 and m["height"] > 0 for m in response["marks"]), (raw_text, response)
    classes = {"": "empty", "<eos>": "special", "  \n": "ws", "7\x00": "ctl"}
    assert [m["cls"] for r in newest for m in r["marks"]] == [classes[t] for t in raw]
    assert _console_errors(driver) == []
    _screenshots(driver, tmp_path / "dashboard-features-off")


def test_served_page_updates_live(driver, synthetic_run, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(synthetic_run, port=0, refresh_s=0.3)
    serve_in_thread(server)
    try:
        host, port = server.server_address[:2]
        driver.get(f"http://{host}:{port}/")
        _check_page(driver, synthetic_run)
        accuracy = next(c for c in M.CHARTS if c.id == "accuracy")
        before = _expected_points(accuracy, load_run(synthetic_run))
        # The run writes one more step; the open page picks it up without a reload.
        with RunLog(synthetic_run, wandb={"mode": "disabled"}) as log:
            log.log_rollouts(STEPS, [{"prompt": "live prompt", "response": "live response", "reward": 1.0}])
            first_keys = {chart.series[0].key: 1.0 for chart in M.CHARTS if chart.series}
            log.log_metrics(STEPS, first_keys | {M.ACCURACY_EVAL: 0.9})
        count_js = "return document.getElementById('chart-reward').data[0].x.length"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(count_js) == STEPS + 1)
        state = _wait_for_charts(driver)["accuracy"]
        assert state["svgPoints"] == before + 2
        assert "live prompt" in driver.find_element("id", "rollouts").text
        assert driver.execute_script("return document.getElementById('live').textContent") == "● live"
        assert _console_errors(driver) == []
        driver.save_screenshot(str(tmp_path / "dashboard-served.png"))
        (tmp_path / "charts.json").write_text(json.dumps(_wait_for_charts(driver), indent=1))
    finally:
        server.shutdown()
        server.server_close()
