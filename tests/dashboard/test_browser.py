"""The dashboard in a real headless Chromium: the file:// page and the served live page load, every chart draws
its points, the rollout table has rows, and the console has no errors.

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
from rlplat.dashboard.render import render_dashboard
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


# Per chart: points in its data, points drawn in the SVG (scatter markers and bars), and its visible text.
CHART_STATE_JS = """
return Array.from(document.querySelectorAll('.plot')).map(p => ({
  id: p.dataset.chart,
  rendered: !!p._fullLayout,
  traces: (p.data || []).length,
  dataPoints: (p.data || []).reduce((n, t) => n + t.x.length, 0),
  svgTraces: p.querySelectorAll('.scatterlayer .trace, .barlayer .trace').length,
  svgPoints: p.querySelectorAll('.scatterlayer .point, .barlayer .point').length,
  text: p.innerText,
}));
"""


def _expected_points(chart) -> int:
    sparse = {M.ACCURACY_EVAL, M.REWARD_EVAL_MEAN}  # logged every EVAL_EVERY=5 steps
    return sum(STEPS // 5 if s.key in sparse else STEPS for s in chart.series)


def _wait_for_charts(drv):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, 30).until(lambda d: all(c["rendered"] for c in d.execute_script(CHART_STATE_JS)))
    return {c["id"]: c for c in drv.execute_script(CHART_STATE_JS)}


def _console_errors(drv) -> list[dict]:
    return [entry for entry in drv.get_log("browser") if entry["level"] == "SEVERE"]


def _check_page(drv, steps: int = STEPS):
    charts = _wait_for_charts(drv)
    assert set(charts) == {c.id for c in M.CHARTS}
    for chart in M.CHARTS:
        state = charts[chart.id]
        expected = _expected_points(chart) + (steps - STEPS) * len(chart.series)
        assert state["traces"] == len(chart.series), state
        assert state["svgTraces"] == len(chart.series), state
        assert state["dataPoints"] == expected, state
        assert state["svgPoints"] == expected, state
        assert "no data yet" not in state["text"], state
    rows = drv.execute_script("return document.querySelectorAll('#rollouts table.rollouts tbody tr').length")
    assert rows > 0
    assert _console_errors(drv) == []


def test_file_page(driver, synthetic_run, tmp_path):
    page = render_dashboard(synthetic_run)
    driver.get(page.as_uri())
    _check_page(driver)
    assert driver.execute_script("return document.getElementById('live').textContent") == ""
    driver.save_screenshot(str(tmp_path / "dashboard-file.png"))


def test_served_page_updates_live(driver, synthetic_run, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(synthetic_run, port=0, refresh_s=0.3)
    serve_in_thread(server)
    try:
        host, port = server.server_address[:2]
        driver.get(f"http://{host}:{port}/")
        _check_page(driver)
        # The run writes one more step; the open page picks it up without a reload.
        with RunLog(synthetic_run, wandb={"mode": "disabled"}) as log:
            log.log_rollouts(STEPS, [{"prompt": "live prompt", "response": "live response", "reward": 1.0}])
            log.log_metrics(STEPS, {chart.series[0].key: 1.0 for chart in M.CHARTS} | {M.ACCURACY_EVAL: 0.9})
        count_js = "return document.getElementById('chart-reward').data[0].x.length"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(count_js) == STEPS + 1)
        state = _wait_for_charts(driver)["accuracy"]
        assert state["svgPoints"] == _expected_points(M.CHARTS[1]) + 2
        assert "live prompt" in driver.find_element("id", "rollouts").text
        assert driver.execute_script("return document.getElementById('live').textContent") == "● live"
        assert _console_errors(driver) == []
        driver.save_screenshot(str(tmp_path / "dashboard-served.png"))
        (tmp_path / "charts.json").write_text(json.dumps(_wait_for_charts(driver), indent=1))
    finally:
        server.shutdown()
        server.server_close()
