"""The train–inference alignment ablation (issue 15): each variant × seed as an ``rlplat run``, then one figure
and one table.

    python experiments/alignment_ablation/run.py --seeds 0 1 2 --out runs/alignment_ablation
    python experiments/alignment_ablation/run.py --report-only --out runs/alignment_ablation

A variant is ``variants/<name>.yaml``: a ``label`` and ``overrides`` (dotted config keys → values) applied to
the base config (``configs/tiny_chain.yaml``), after ``COMMON`` and before the per-seed keys (``run.seed``,
``model.seed``, ``run.steps``, ``run.name``, ``run.output_dir``). Order of work:

1. every (variant, seed) config is loaded, validated and preflighted exactly as ``rlplat run`` does; any bad
   one (an unknown key, an impossible combination, a typo in the variant file) stops the script before any
   run starts, naming the variant file and the fix;
2. each (variant, seed) runs as a subprocess under ``<out>/<variant>/seed<S>/``: a finished run (its
   metrics.jsonl reached ``run.steps``) is skipped, an interrupted one is continued with
   ``rlplat run --resume``, so the script can be stopped and started again;
3. ``<out>/ablation.png`` (held-out accuracy, reward, mismatch KL, max |Δlogp| and routing disagreement over
   steps; mean line and min–max band over seeds per variant) and ``<out>/results.md`` (final and best
   held-out accuracy, steps to a target accuracy, wall time, mismatch, routing disagreement, the hardware).

Routing is recorded in every variant (``COMMON``), so the routing-disagreement panel shows how often rollout
and trainer send a response token to a different expert set (0 for the exact variant, bitwise).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BASE = ROOT / "configs" / "tiny_chain.yaml"
COMMON = {"rollout.record_routing": True}  # routing disagreement is one of the panels
VARIANT_KEYS = ("label", "overrides")
ATTEMPTS = "attempts.jsonl"  # per run: wall time and exit status of each subprocess, for the table

PANELS = (  # (metric key, panel title, linear range of a symlog y axis: None for a linear axis)
    ("accuracy/eval", "held-out accuracy (greedy)", None),
    ("reward/mean", "reward (train samples)", None),
    ("mismatch/kl", "mismatch KL(π_rollout ‖ π_train)", 1e-9),
    ("mismatch/max_abs_dlogp", "max |Δ log p|", 1e-4),
    ("mismatch/routing_disagreement", "routing disagreement\n(token, MoE layer) pairs", None),
)


@dataclass
class Variant:
    name: str
    label: str
    overrides: dict[str, Any]
    path: Path


@dataclass
class Job:
    variant: Variant
    seed: int
    directory: Path  # run.output_dir of this (variant, seed)
    overrides: list[str] = field(default_factory=list)
    steps: int = 0


def load_variant(path: Path) -> Variant:
    """A variant file; anything but ``label`` and a mapping ``overrides`` is refused, naming the fix."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a variant is a mapping with keys {', '.join(VARIANT_KEYS)}")
    unknown = sorted(set(data) - set(VARIANT_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)}; a variant has only {', '.join(VARIANT_KEYS)} "
            "(config settings go under overrides, as dotted keys: rollout.precision: bf16)"
        )
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(
            f"{path}: overrides must map dotted config keys to values, e.g. rollout.precision: bf16"
        )
    return Variant(path.stem, str(data.get("label", path.stem)), overrides, path)


def variants_in(directory: Path, names: Sequence[str] | None = None) -> list[Variant]:
    available = {p.stem: p for p in sorted(directory.glob("*.yaml"))}
    missing = [n for n in names or () if n not in available]
    if missing:
        raise ValueError(f"unknown variant(s) {', '.join(missing)}; choose from {', '.join(available)}")
    return [load_variant(available[n]) for n in (names or available)]


def _value(v: Any) -> str:
    """A YAML scalar as the override text ``load_config`` parses back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


def make_jobs(
    variants: Sequence[Variant], seeds: Sequence[int], out: Path, steps: int | None, extra: Sequence[str] = ()
) -> list[Job]:
    jobs = []
    # seed-major: a stopped ablation has every variant at the seeds it reached, comparable side by side
    for seed in seeds:
        for v in variants:
            directory = out / v.name / f"seed{seed}"
            overrides = [f"{k}={_value(x)}" for k, x in {**COMMON, **v.overrides}.items()]
            overrides += list(extra)
            overrides += [f"run.seed={seed}", f"model.seed={seed}", f"run.name={v.name}-s{seed}"]
            overrides += [f"run.output_dir={directory}"] + ([f"run.steps={steps}"] if steps else [])
            jobs.append(Job(v, seed, directory, overrides))
    return jobs


def validate(jobs: Sequence[Job], base: Path) -> list[str]:
    """Load, validate and preflight every job's config as ``rlplat run`` does; the errors (empty: all good).
    Sets each job's ``steps``."""
    from rlplat.config import load_config
    from rlplat.run import preflight

    errors = []
    for job in jobs:
        try:
            cfg = load_config(base, job.overrides)
            preflight(cfg)
            job.steps = cfg.run.steps
        except (ValueError, ImportError) as err:
            errors.append(f"variant {job.variant.name} ({job.variant.path}), seed {job.seed}:\n{err}")
    return errors


def run_dirs(directory: Path) -> list[Path]:
    """The run directories under a job's output_dir, oldest first."""
    return sorted(p.parent for p in directory.glob("*/config.yaml"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, one dict per step (a repeated step: the later line wins; a line cut short is skipped)."""
    by_step: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    packed = run_dir / "metrics.jsonl.gz"  # how results kept in the repository store it
    if path.exists():
        text = path.read_text(encoding="utf-8")
    elif packed.exists():
        text = gzip.decompress(packed.read_bytes()).decode("utf-8")
    else:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def finished(run_dir: Path, steps: int) -> bool:
    rows = read_metrics(run_dir)
    return bool(rows) and rows[-1]["step"] >= steps


def run_job(job: Job, base: Path, log: Any = print) -> int:
    """Run (or continue, or skip) one job; returns the exit status."""
    job.directory.mkdir(parents=True, exist_ok=True)
    existing = run_dirs(job.directory)
    if existing and finished(existing[-1], job.steps):
        log(f"skip {job.variant.name} seed {job.seed}: {existing[-1]} is complete")
        return 0
    rlplat = [sys.executable, "-m", "rlplat.cli", "run"]
    if existing:  # interrupted: continue from its latest checkpoint, with the same config
        command = [*rlplat, "--resume", str(existing[-1])]
        log(f"resume {job.variant.name} seed {job.seed}: {existing[-1]}")
    else:
        command = [*rlplat, str(base), *job.overrides]
        log(f"start {job.variant.name} seed {job.seed}")
    started = time.time()
    with open(job.directory / "run.log", "a", encoding="utf-8") as out:
        rc = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    record = {"started": started, "wall_s": round(time.time() - started, 2), "rc": rc, "command": command}
    with open(job.directory / ATTEMPTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    status = "done" if rc == 0 else f"FAILED (exit {rc}, see {job.directory / 'run.log'})"
    log(f"{status}: {job.variant.name} seed {job.seed} in {record['wall_s']:.0f} s")
    return rc


# Reading the results back


@dataclass
class SeedRun:
    seed: int
    rows: list[dict[str, Any]]
    wall_s: float | None
    steps: int  # run.steps of its config.yaml: the run is finished when its metrics reach it

    @property
    def finished(self) -> bool:
        return self.rows[-1]["step"] >= self.steps


def collect(out: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> dict[str, list[SeedRun]]:
    """Each variant's runs that logged anything (the latest run directory per seed)."""
    results: dict[str, list[SeedRun]] = {}
    for v in variants:
        runs = []
        for seed in seeds:
            directory = out / v.name / f"seed{seed}"
            dirs = run_dirs(directory)
            rows = read_metrics(dirs[-1]) if dirs else []
            if rows:
                steps = yaml.safe_load((dirs[-1] / "config.yaml").read_text())["run"]["steps"]
                runs.append(SeedRun(seed, rows, wall_time(directory, rows), steps))
        results[v.name] = runs
    return results


def wall_time(directory: Path, rows: list[dict[str, Any]]) -> float | None:
    """Seconds the run's subprocesses took in all (attempts.jsonl), else the span of its metrics' timestamps."""
    path = directory / ATTEMPTS
    if path.exists():
        return sum(json.loads(line)["wall_s"] for line in path.read_text().splitlines() if line.strip())
    times = [r["time"] for r in rows if isinstance(r.get("time"), int | float)]
    return max(times) - min(times) if len(times) > 1 else None


def series(runs: Sequence[SeedRun], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds of ``key`` at each step some seed logged it (null/NaN skipped)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            v = row.get(key)
            if isinstance(v, int | float) and math.isfinite(v):
                by_step.setdefault(row["step"], []).append(float(v))
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def plot(results: dict[str, list[SeedRun]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a headless machine
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    for ax, (key, title, linthresh) in zip(axes, PANELS):
        for i, (name, runs) in enumerate(results.items()):
            steps, mean, lo, hi = series(runs, key)
            if not steps:
                continue
            color = f"C{i % 10}"
            ax.plot(steps, mean, color=color, label=f"{labels[name]} ({len(runs)} seeds)")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if linthresh is not None:  # the exact variant sits at 0; misaligned ones span decades
            ax.set_yscale("symlog", linthresh=linthresh)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Train–inference alignment ablation (mean line, min–max band over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def _values(run: SeedRun, key: str) -> list[tuple[int, float]]:
    return [
        (r["step"], float(r[key]))
        for r in run.rows
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]


def default_target(results: dict[str, list[SeedRun]], reference: str = "exact") -> float | None:
    """Halfway from the reference variant's mean starting accuracy (line 0) to its mean best: a level every
    variant that learns at all passes, so "steps to target" compares speed."""
    runs = results.get(reference) or next((r for r in results.values() if r), [])
    acc = [_values(r, "accuracy/eval") for r in runs]
    acc = [a for a in acc if a]
    if not acc:
        return None
    start = sum(a[0][1] for a in acc) / len(acc)
    best = sum(max(v for _, v in a) for a in acc) / len(acc)
    return round(start + (best - start) / 2, 3) if best > start else None  # nothing learned: no target


def table(results: dict[str, list[SeedRun]], labels: dict[str, str], target: float | None) -> str:
    head = (
        "| variant | seeds | start acc | final acc | gain | best acc | steps to target | wall time (s) | "
        "mismatch KL | max \\|Δlogp\\| | routing disagreement |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, runs in results.items():
        acc = [_values(r, "accuracy/eval") for r in runs]
        # start: the warm-started policy (line 0), evaluated by this variant's own rollout engine
        start = [a[0][1] for a in acc if a and a[0][0] == 0]
        final = [a[-1][1] for a in acc if a]
        # final − start per seed: the starts differ by engine (a bf16 engine scores the same policy differently)
        gain = [a[-1][1] - a[0][1] for a in acc if a and a[0][0] == 0]
        best = [max(v for _, v in a) for a in acc if a]
        # a seed whose warm-started policy (line 0) already scores the target took no RL step to reach it: it is
        # named beside the mean, not averaged in as 0
        seeds = [a for a in acc if a] if target is not None else []
        starts_there = [a[0][0] == 0 and a[0][1] >= target for a in seeds]
        reached = [
            next((s for s, v in a if s > 0 and v >= target), None)
            for a, there in zip(seeds, starts_there)
            if not there
        ]
        hit = [s for s in reached if s is not None]
        to_target = "–"
        if target is not None:
            to_target = f"{sum(hit) / len(hit):.1f}" if hit else "never"
            to_target += f" ({len(hit)}/{len(reached)} seeds)"
            if any(starts_there):
                to_target += f"; {sum(starts_there)} started at or above it"
        walls = [r.wall_s for r in runs if r.wall_s is not None]
        kl = [v for r in runs for _, v in _values(r, "mismatch/kl")]
        dlogp = [v for r in runs for _, v in _values(r, "mismatch/max_abs_dlogp")]
        routing = [v for r in runs for _, v in _values(r, "mismatch/routing_disagreement")]
        lines.append(
            f"| {labels[name]} | {len(runs)} | {_mean_std(start)} | {_mean_std(final)} | {_mean_std(gain)} | "
            f"{_mean_std(best)} | {to_target} | "
            f"{f'{sum(walls) / len(walls):.0f}' if walls else '–'} | "
            f"{f'{sum(kl) / len(kl):.2e}' if kl else '–'} | {f'{max(dlogp):.3g}' if dlogp else '–'} | "
            f"{f'{sum(routing) / len(routing):.4f}' if routing else 'not recorded'} |"
        )
    return head + "\n".join(lines) + "\n"


def hardware() -> str:
    from rlplat.bench.common import hardware as machine

    info = machine()
    return (
        f"{info['cpu']}; {info['cpu_count']} logical CPUs visible; {platform.system()} {platform.release()}"
    )


def report(
    out: Path, variants: Sequence[Variant], seeds: Sequence[int], target: float | None, argv: str
) -> str:
    """Write ablation.png and results.md under ``out``; returns the table."""
    collected = collect(out, variants, seeds)
    # a run still going (or stopped) has no final accuracy yet: it is named, not averaged in
    results = {name: [r for r in runs if r.finished] for name, runs in collected.items()}
    unfinished = [
        f"{name} seed {r.seed} (step {r.rows[-1]['step']} of {r.steps})"
        for name, runs in collected.items()
        for r in runs
        if not r.finished
    ]
    labels = {v.name: v.label for v in variants}
    target = target if target is not None else default_target(results)
    plot(results, labels, out / "ablation.png")
    body = table(results, labels, target)
    wall = "sum of the run's `rlplat run` subprocesses (warm start, Ray start-up and evaluations included)"
    text = (
        f"# Train–inference alignment ablation\n\n"
        f"Written {_dt.datetime.now().isoformat(timespec='seconds')} by `{argv}`.\n\n"
        f"Hardware: {hardware()}.\n\n"
        f"Held-out accuracy: greedy, on the config's `data.eval_prompts` held-out problems, evaluated by "
        f"each variant's own rollout engine (so a bf16 or FP8 engine scores the same warm-started policy "
        f"differently). Start: line 0, the warm-started policy; final: the last evaluation; gain: final − start, per seed; best: the highest; mean ± sample std over seeds. Steps to target: "
        + (
            f"first RL step whose held-out accuracy ≥ {target} (mean over the seeds that reach it; seeds whose "
            f"warm-started policy already scores it are counted beside the mean). "
            if target is not None
            else "none (no run improved on its starting accuracy). "
        )
        + f"Wall time: {wall}. Mismatch KL: mean over steps and seeds; max |Δlogp|: over all steps and seeds; "
        f"routing disagreement: mean share of (response token, MoE layer) pairs whose expert sets differ "
        f"between rollout and trainer.\n\n{body}\n"
        + (f"Left out, unfinished: {', '.join(unfinished)}.\n\n" if unfinished else "")
        + "![ablation](ablation.png)\n"
    )
    (out / "results.md").write_text(text, encoding="utf-8")
    return body


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (run.seed and model.seed)")
    p.add_argument("--steps", type=int, help="RL steps per run (default: the base config's run.steps)")
    p.add_argument("--variants", nargs="+", help="variant names (default: every variants/*.yaml)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "alignment_ablation", help="output directory")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at once (each takes the CPUs its workers ask for)"
    )
    p.add_argument("--base", type=Path, default=BASE, help="base experiment config")
    p.add_argument("--set", dest="extra", nargs="*", default=[], help="key=value overrides for every variant")
    p.add_argument("--target", type=float, help="accuracy for 'steps to target' (default: see results.md)")
    p.add_argument("--report-only", action="store_true", help="only write ablation.png and results.md")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be ≥ 1")
    try:
        variants = variants_in(HERE / "variants", args.variants)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    jobs = make_jobs(variants, args.seeds, out, args.steps, args.extra)
    if not args.report_only:
        errors = validate(jobs, args.base)
        if errors:
            print("error: no run started; fix these variant configs first:\n", file=sys.stderr)
            print("\n\n".join(errors), file=sys.stderr)
            return 2
        print(f"{len(jobs)} runs validated ({len(variants)} variants × {len(args.seeds)} seeds) → {out}")
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda j: run_job(j, args.base), jobs))
        if any(codes):
            print(f"{sum(c != 0 for c in codes)} run(s) failed; rerun the same command to continue them")
    out.mkdir(parents=True, exist_ok=True)
    print(report(out, variants, args.seeds, args.target, " ".join(["run.py", *(argv or sys.argv[1:])])))
    print(f"wrote {out / 'ablation.png'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
