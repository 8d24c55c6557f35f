"""``rlplat bench loop``: what the RL loop itself costs, around the work it orchestrates.

Runs ``rlplat run CONFIG`` for a few steps as a child process, once per batch scale (``--scales 1,4``:
``data.prompts_per_step`` times 1 and 4), and reports per scale

- the driver's peak resident memory (``VmHWM`` of the ``rlplat run`` process, read until it exits; Ray's
  workers are other processes and not counted) and its resident memory when the run ends;
- the loop's overhead per step: the step's wall time (between consecutive ``metrics.jsonl`` lines) minus its
  rollout, reward and train times (weight sync, metrics and the driver's own work), weight sync beside it.

A driver that holds samples grows with the batch; one that holds refs does not. ``--tree DIR`` runs another
checkout's ``rlplat`` (e.g. an older commit in a ``git worktree``) with the same settings, for a before and
after. The first RL step is left out of the means (workers warm up; it has no previous line). The correctness check: every run exits 0
and trains every step on every prompt (``prompts/scored``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from rlplat.bench.common import CorrectnessError, csv_ints, run_reported, write_result


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _watch(proc: subprocess.Popen, out: dict[str, int]) -> None:
    """Keep the driver's latest peak and current RSS (KiB) until it exits."""
    while proc.poll() is None:
        for field, key in (("VmHWM", "peak_kib"), ("VmRSS", "last_kib")):
            value = _status_kib(proc.pid, field)
            if value is not None:
                out[key] = value
        time.sleep(0.05)


def run_once(config: str, overrides: list[str], tree: Path | None, log: Path) -> dict[str, Any]:
    """One ``rlplat run`` child; its driver memory and its metrics lines."""
    with tempfile.TemporaryDirectory(prefix="rlplat-bench-loop-") as tmp:
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "rlplat.cli", "run", config, f"run.output_dir={tmp}", *overrides]
        memory: dict[str, int] = {}
        t0 = time.perf_counter()
        with log.open("a") as sink:
            sink.write(f"$ {' '.join(cmd)}\n")
            sink.flush()
            proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=sink, stderr=subprocess.STDOUT)
            watcher = threading.Thread(target=_watch, args=(proc, memory), daemon=True)
            watcher.start()
            code = proc.wait()
            watcher.join()
        wall = time.perf_counter() - t0
        if code != 0:
            raise CorrectnessError(f"rlplat run exited {code} (see {log})")
        (run_dir,) = Path(tmp).iterdir()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"wall_s": wall, "memory": memory, "steps": [m for m in lines if "time/train_s" in m]}


def summarize(result: dict[str, Any], prompts: int, steps: int) -> dict[str, Any]:
    rl = result["steps"]
    if len(rl) != steps or any(m.get("prompts/scored") != prompts for m in rl):
        raise CorrectnessError(
            f"expected {steps} steps of {prompts} prompts, metrics.jsonl has {len(rl)} steps"
        )
    # A step's wall time is the gap between its metrics line and the previous one (``time``, written by
    # RunLog as each line is logged): everything the loop did for it, in any version of the loop.
    timed = [(m, m["time"] - prev["time"]) for prev, m in itertools.pairwise(rl)]
    work = ("time/rollout_s", "time/reward_s", "time/train_s")

    def mean(f) -> float:
        return statistics.fmean(f(m, dt) for m, dt in timed)

    return {
        "prompts_per_step": prompts,
        "driver_peak_rss_mib": result["memory"].get("peak_kib", 0) / 1024,
        "driver_final_rss_mib": result["memory"].get("last_kib", 0) / 1024,
        "step_s": mean(lambda m, dt: dt),
        "overhead_s": mean(lambda m, dt: dt - sum(m[k] for k in work)),
        "weight_sync_s": mean(lambda m, dt: m["time/weight_sync_s"]),
        **{k.removeprefix("time/"): mean(lambda m, dt, k=k: m[k]) for k in work},
        "wall_s": result["wall_s"],
    }


def bench(args: argparse.Namespace, console: Console) -> None:
    from rlplat.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any run
    tree = Path(args.tree).resolve() if args.tree else None
    log = Path(args.out) / "loop-runs.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in csv_ints(args.scales):
        prompts = cfg.data.prompts_per_step * scale
        overrides = [
            *args.overrides,
            f"run.steps={args.steps}",
            f"data.prompts_per_step={prompts}",
            "run.eval_every=0",
            "run.checkpoint_every=0",
        ]
        console.print(f"prompts_per_step={prompts}: {args.steps} steps …")
        row = summarize(run_once(args.config, overrides, tree, log), prompts, args.steps)
        console.print(
            f"  driver peak {row['driver_peak_rss_mib']:.0f} MiB, step {row['step_s']:.3f} s, "
            f"overhead {row['overhead_s']:.3f} s (weight sync {row['weight_sync_s']:.3f} s)"
        )
        rows.append(row)
    path = write_result(
        "loop",
        {
            "config": args.config,
            "overrides": args.overrides,
            "tree": str(tree) if tree else None,
            "steps": args.steps,
            "note": "means over RL steps 2..N; step = gap between metrics lines; overhead = step - rollout - reward - train",
            "rows": rows,
        },
        args.out,
    )
    console.print(f"wrote {path}")


def register(sub) -> None:
    p = sub.add_parser(
        "loop", help="the RL loop's own cost: driver memory and per-step overhead by batch size"
    )
    p.add_argument("config", nargs="?", default="configs/tiny_math.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument(
        "--steps", type=int, default=8, help="RL steps per run (the first is left out of the means)"
    )
    p.add_argument("--scales", default="1,4", help="multiples of data.prompts_per_step to run")
    p.add_argument("--tree", default=None, help="another checkout whose rlplat to run (before/after)")
    p.add_argument("--out", default="bench_results")
    p.set_defaults(func=lambda args: run_reported(lambda console: bench(args, console)))
