"""Render a run directory (see ``metrics_schema`` for its files) into one self-contained ``dashboard.html``.

The page needs no network: plotly.js (from the ``plotly`` Python package) is inlined, and the charts are drawn
from JSON embedded in the page. Served by ``rlplat dashboard`` (``serve.py``), the same page polls
``data.json`` and redraws in place, keeping the user's zoom. Reading is forgiving because the writer may crash
mid-line: malformed lines are skipped and listed on the page. A chart without data says why: its feature is
off in config.yaml (``metrics_schema.Switch``), the run has not logged an RL step yet, or the run does not
record it. Chart titles are HTML above each plot and plotly's toolbar is off, so nothing draws over a title
(drag zooms, a double click resets). The rollout table shows what plain text would hide: an empty response
as ∅, special tokens, whitespace-only responses and control characters, each marked.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import yaml
from markupsafe import Markup

import rlplat.dashboard.metrics_schema as ms

MAX_ROLLOUTS = 50
# Headline numbers shown at the top of the page.
SUMMARY_KEYS = (
    ms.REWARD_MEAN,
    ms.ACCURACY_TRAIN,
    ms.ACCURACY_EVAL,
    ms.KL_REF,
    ms.MISMATCH_MAX_ABS_DLOGP,
    ms.ENTROPY_MEAN,
)
_MAX_NOTED_LINES = 5


@dataclass
class RunData:
    run_dir: Path
    metrics: list[dict[str, Any]]  # one record per step, sorted by step
    rollouts: list[dict[str, Any]]  # newest first, at most MAX_ROLLOUTS
    config_text: str | None
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml parsed; {} when absent or unreadable
    special_tokens: tuple[str, ...] = ()  # from the run's tokenizer, when it has one

    @property
    def name(self) -> str:
        return self.run_dir.name

    def latest(self) -> dict[str, tuple[int, Any]]:
        """Each key's most recent value with the step it was logged at (eval metrics skip steps)."""
        out: dict[str, tuple[int, Any]] = {}
        for record in self.metrics:
            for key, value in record.items():
                if key not in (ms.STEP, ms.TIME):
                    out[key] = (record[ms.STEP], value)
        return out


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run directory as a Path; ``ValueError`` saying what to pass when it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a directory; pass the run directory `rlplat run` created (runs/<name>-...)"
        )
    if not any((path / name).is_file() for name in (ms.METRICS_FILE, ms.ROLLOUTS_FILE, ms.CONFIG_FILE)):
        raise ValueError(
            f"{path} is not a run directory: it has none of {ms.METRICS_FILE}, {ms.ROLLOUTS_FILE}, "
            f"{ms.CONFIG_FILE}; pass the directory `rlplat run` created (runs/<name>-...)"
        )
    return path


def _note_skipped(notes: list[str], filename: str, bad: list[tuple[int, str]]) -> None:
    if not bad:
        return
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_MAX_NOTED_LINES])
    more = f"; and {len(bad) - _MAX_NOTED_LINES} more" if len(bad) > _MAX_NOTED_LINES else ""
    plural = "s" if len(bad) > 1 else ""
    notes.append(f"{filename}: skipped {len(bad)} malformed line{plural} ({shown}{more})")


def _parse_record(line: bytes) -> dict[str, Any] | str:
    """The JSON object on ``line``, or why it is not a valid record."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"not JSON ({err.msg if isinstance(err, json.JSONDecodeError) else err.reason})"
    if not isinstance(record, dict):
        return "not a JSON object"
    step = record.get(ms.STEP)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"no integer '{ms.STEP}'"
    return record


def read_metrics(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    bad: list[tuple[int, str]] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_record(line)
            if isinstance(record, str):
                bad.append((number, record))
            else:
                by_step[record[ms.STEP]] = record  # a resumed run may redo a step: the later line wins
    _note_skipped(notes, path.name, bad)
    return [by_step[s] for s in sorted(by_step)]


def _tail_lines(path: Path, n: int, block: int = 1 << 16) -> list[bytes]:
    """The last ``n`` non-empty lines, reading backwards: rollouts.jsonl grows without bound."""
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf = b""
        while pos > 0 and buf.count(b"\n") <= n:
            size = min(block, pos)
            pos -= size
            f.seek(pos)
            buf = f.read(size) + buf
    lines = buf.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # starts mid-line
    return [line for line in lines if line.strip()][-n:]


def read_latest_rollouts(path: Path, notes: list[str], limit: int = MAX_ROLLOUTS) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records, bad = [], []
    for i, line in enumerate(_tail_lines(path, limit)):
        record = _parse_record(line)
        if isinstance(record, str):
            bad.append((i + 1, record))
        else:
            records.append(record)
    if bad:
        # Line numbers are counted within the tail, which is all that is read.
        _note_skipped(notes, f"{path.name} (last {limit} lines)", bad)
    records.reverse()
    return records


def parse_config(text: str | None, notes: list[str]) -> dict[str, Any]:
    """config.yaml as a dict; {} (and a note) when it is not a YAML mapping, so the page still renders."""
    if text is None:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        why = str(err).splitlines()[0]
        notes.append(f"{ms.CONFIG_FILE}: not valid YAML ({why}); charts cannot tell which features are off")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        notes.append(f"{ms.CONFIG_FILE}: not a YAML mapping; charts cannot tell which features are off")
        return {}
    return data


def read_special_tokens(path: Path) -> tuple[str, ...]:
    """The special tokens of a ``tokenizer.json`` (its ``added_tokens`` marked special); () if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    added = data.get("added_tokens") if isinstance(data, dict) else None
    if not isinstance(added, list):
        return ()
    return tuple(
        t["content"]
        for t in added
        if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str) and t["content"]
    )


def load_run(run_dir: str | os.PathLike) -> RunData:
    path = check_run_dir(run_dir)
    notes: list[str] = []
    metrics = read_metrics(path / ms.METRICS_FILE, notes)
    rollouts = read_latest_rollouts(path / ms.ROLLOUTS_FILE, notes)
    config_file = path / ms.CONFIG_FILE
    config_text = config_file.read_text(errors="replace") if config_file.is_file() else None
    config = parse_config(config_text, notes)
    specials = read_special_tokens(path / ms.TOKENIZER_FILE)
    return RunData(path, metrics, rollouts, config_text, notes, config, specials)


def setting(config: dict[str, Any], path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key path in the parsed config."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def off_setting(switch: ms.Switch | None, config: dict[str, Any]) -> str | None:
    """``"<path>: <value>"`` when config.yaml turns the switch's feature off; None when on or not stated."""
    if switch is None:
        return None
    found, value = setting(config, switch.path)
    if not found or switch.on(value):
        return None
    return f"{switch.path}: {'null' if value is None else value}"


_TERM_MEAN = re.compile("^" + re.escape(ms.REWARD_TERM_MEAN).replace(re.escape("{term}"), "([^/]+)") + "$")


def reward_terms(run: RunData) -> list[str]:
    """Reward terms to chart: config.yaml's rewards.terms (label, else name) in order, then any other term
    whose ``reward/<term>_mean`` is in metrics.jsonl. Names whose key is another canonical metric (a term
    called "eval" would be ``reward/eval_mean``) are left out."""
    canonical = set(ms.CANONICAL_KEYS)
    terms: list[str] = []
    found, specs = setting(run.config, "rewards.terms")
    for spec in specs if found and isinstance(specs, list) else ():
        term = (spec.get("label") or spec.get("name")) if isinstance(spec, dict) else None
        if isinstance(term, str) and term not in terms:
            terms.append(term)
    logged = {m.group(1) for r in run.metrics for k in r if (m := _TERM_MEAN.match(k))}
    terms += sorted(logged - set(terms))
    return [t for t in terms if ms.REWARD_TERM_MEAN.format(term=t) not in canonical]


def chart_series(chart: ms.Chart, run: RunData) -> tuple[ms.Series, ...]:
    if chart.per_term:
        return chart.series + tuple(ms.Series(chart.per_term.format(term=t), t) for t in reward_terms(run))
    return chart.series


def _has_rl_steps(run: RunData) -> bool:
    # Line 0 is the starting policy (warm-start eval); an RL step has been logged once line 1 exists.
    return any(r[ms.STEP] >= 1 for r in run.metrics)


def absent_text(run: RunData, off: str | None) -> str:
    """Why a chart or card has no data: its feature is off (``off``: the setting), nothing is logged yet, or
    the run lacks it."""
    if off is not None:
        return f"off in this run ({off})"
    return "not recorded by this run" if _has_rl_steps(run) else "no data yet"


def key_absent_text(run: RunData, key: str) -> str:
    """``absent_text`` for one metric key (a summary card), using its chart's and series' switches."""
    for chart in ms.CHARTS:
        for series in chart.series:
            if series.key == key:
                switch = series.switch or chart.switch
                return absent_text(run, off_setting(switch, run.config))
    return absent_text(run, None)


def _number(value: Any) -> float | None:
    """A plottable value: numbers as float, anything else (null, NaN written as null) as a gap."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def chart_figure(chart: ms.Chart, run: RunData) -> dict[str, Any]:
    """A plotly figure (plain JSON) for one chart, plus ``note``: a line shown under the chart's title."""
    metrics, series_list = run.metrics, chart_series(chart, run)
    traces, notes = [], []
    for series in series_list:
        off = off_setting(series.switch, run.config)
        if off is not None:
            notes.append(f"{series.label}: off in this run ({off})")
        rows = [r for r in metrics if series.key in r]
        if not rows:
            continue
        trace = {
            "name": series.label,
            "x": [r[ms.STEP] for r in rows],
            "y": [_number(r[series.key]) for r in rows],
            "hovertemplate": f"{series.key}<br>step %{{x}}: %{{y:.4g}}<extra></extra>",
        }
        if chart.kind == "stacked_bar":
            trace["type"] = "bar"
        else:
            trace.update(type="scatter", mode="lines+markers" if len(rows) <= 100 else "lines")
        traces.append(trace)
    layout: dict[str, Any] = {
        # The title is the <h3> above the plot (the template), not plotly's, so nothing can draw over it.
        "xaxis": {"title": {"text": "step"}, "zeroline": False},
        "yaxis": {"title": {"text": chart.y_title}, "zeroline": False},
        "margin": {"l": 60, "r": 20, "t": 30, "b": 45},
        "height": 290,
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
        "hovermode": "x unified",
        "uirevision": chart.id,  # keeps the user's zoom when a live page redraws
        "paper_bgcolor": "white",
        "plot_bgcolor": "#fafafa",
    }
    if chart.kind == "stacked_bar":
        layout["barmode"] = "stack"
    if len(series_list) > 2:  # too many entries for the line above the plot
        layout["legend"] = {"orientation": "h", "x": 0, "y": -0.3, "yanchor": "top", "traceorder": "normal"}
        layout["margin"]["b"] = 75
    if not traces:
        chart_off = off_setting(chart.switch, run.config)
        text = absent_text(run, None)
        if chart_off is not None:  # three short lines: a long one is cut off on a narrow chart
            text = f"off in this run<br>{chart.switch.off}<br>({chart_off})"
        layout["annotations"] = [
            {
                "text": text,
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
                "showarrow": False,
                "font": {"size": 15, "color": "#888"},
            }
        ]
        layout["xaxis"]["showticklabels"] = False
        layout["yaxis"]["showticklabels"] = False
    return {"data": traces, "layout": layout, "note": "; ".join(notes)}


def figures(run: RunData) -> dict[str, dict[str, Any]]:
    return {chart.id: chart_figure(chart, run) for chart in ms.CHARTS}


def signature(run_dir: Path) -> str:
    """Changes whenever one of the run's files does: a live page redraws only then."""
    parts = []
    for name in (ms.METRICS_FILE, ms.ROLLOUTS_FILE, ms.CONFIG_FILE):
        try:
            st = (run_dir / name).stat()
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append("-")
    return "|".join(parts)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:,.4g}"


def _when(timestamp: Any) -> str:
    if _number(timestamp) is None:
        return "—"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


# Special-token spellings marked even without the run's tokenizer (e.g. a model.path run): <|...|> markers
# and the usual bracketed names. The tokenizer's own special tokens are added per run.
_COMMON_SPECIALS = r"<\|[^<>|\s]{1,64}\|>|</?s>|<(?:eos|bos|pad|unk|mask|sep|cls|eot|eom)>"
# C0 controls other than tab and newline, DEL, and zero-width characters: present in the text, invisible.
_INVISIBLE = "[\x00-\x08\x0b-\x1f\x7f\u200b-\u200d\u2060\ufeff]"
_WHITESPACE_MARKS = {" ": "␣", "\t": "⇥", "\n": "↵\n"}
_EMPTY_TITLE = (
    "empty response: the model ended at once (e.g. an <eos> first), or produced only special tokens, which "
    "are not decoded"
)


@cache
def _visible_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    exact = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
    special = f"{exact}|{_COMMON_SPECIALS}" if exact else _COMMON_SPECIALS
    return re.compile(f"(?P<special>{special})|(?P<invisible>{_INVISIBLE})")


def _invisible(ch: str) -> Markup:
    # A Python-style escape, in ASCII: Unicode's control pictures (␀) are missing from common fonts.
    code = ord(ch)
    escape = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return Markup('<span class="ctl" title="invisible character U+{:04X}">{}</span>').format(code, escape)


def visible_text(text: Any, specials: tuple[str, ...] = ()) -> Markup:
    """``text`` as escaped HTML in which nothing is invisible: an empty string is a marked ∅, special tokens
    (``specials`` and common spellings) are marked, a whitespace-only text shows its whitespace as ␣ ⇥ ↵, and
    control or zero-width characters show as escapes (``\\x00``, ``\\u200b``)."""
    text = "" if text is None else str(text)
    if not text:
        return Markup('<span class="empty" title="{}">∅</span>').format(_EMPTY_TITLE)
    if not text.strip():
        marks = Markup("").join(_WHITESPACE_MARKS.get(c) or _invisible(c) for c in text)
        return Markup('<span class="ws" title="whitespace-only text">{}</span>').format(marks)
    out, pos = [], 0
    for m in _visible_pattern(specials).finditer(text):
        out.append(text[pos : m.start()])
        if m.group("special") is not None:
            out.append(Markup('<span class="special" title="special token">{}</span>').format(m.group()))
        else:
            out.append(_invisible(m.group()))
        pos = m.end()
    out.append(text[pos:])
    return Markup("").join(out)  # join escapes the plain str parts


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("rlplat.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["when"] = _when
    env.filters["duration"] = _duration
    env.filters["visible"] = visible_text
    return env


def _template(name: str = "dashboard.html.jinja") -> jinja2.Template:
    return _environment().get_template(name)


def _elapsed(run: RunData) -> float | None:
    times = [t for t in (_number(r.get(ms.TIME)) for r in run.metrics) if t is not None]
    return times[-1] - times[0] if len(times) > 1 else None


def _context(run: RunData) -> dict[str, Any]:
    return {
        "run": run,
        "latest": run.latest(),
        "summary_keys": SUMMARY_KEYS,
        "summary_absent": {key: key_absent_text(run, key) for key in SUMMARY_KEYS},
        "last_record": run.metrics[-1] if run.metrics else None,
        "elapsed": _elapsed(run),
        "mismatch_keys": ms.ROLLOUT_MISMATCH_KEYS,
        "rollout_keys": ms.ROLLOUT_KEYS,
    }


def sections(run: RunData) -> dict[str, str]:
    """The HTML of the page's parts that change as the run goes (element id -> inner HTML)."""
    module = _template("sections.html.jinja").make_module(_context(run))
    return {name: str(getattr(module, name)()) for name in ("summary", "notes", "rollouts", "all_metrics")}


def _script_json(value: Any) -> str:
    # "<" only occurs inside JSON strings, where \u003c is the same character: no "</script>" can end the tag.
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


@cache
def _plotly_js() -> str:
    import plotly.offline

    return plotly.offline.get_plotlyjs()


def render_html(run_dir: str | os.PathLike, *, live: bool = False, refresh_s: float = 5.0) -> str:
    """The whole page; ``live`` adds polling of ``data.json`` (only when served over http)."""
    run = load_run(run_dir)
    return _template().render(
        **_context(run),
        charts=ms.CHARTS,
        plotly_js=_plotly_js(),
        figures_json=_script_json(figures(run)),
        signature_json=_script_json(signature(run.run_dir)),
        live=live,
        refresh_ms=int(refresh_s * 1000),
    )


def dashboard_data(run_dir: str | os.PathLike, since: str | None = None) -> dict[str, Any]:
    """What a live page fetches: new figures and sections, or ``unchanged`` when no file changed."""
    path = check_run_dir(run_dir)
    sig = signature(path)
    if since == sig:
        return {"unchanged": True, "signature": sig}
    run = load_run(path)
    return {"unchanged": False, "signature": sig, "figures": figures(run), "sections": sections(run)}


def render_dashboard(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/dashboard.html`` (atomically: a reader never sees half a page) and return its path."""
    path = check_run_dir(run_dir)
    html = render_html(path)
    out = path / ms.DASHBOARD_FILE
    fd, tmp = tempfile.mkstemp(prefix=".dashboard-", suffix=".html", dir=path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
