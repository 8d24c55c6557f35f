"""What every benchmark result file carries: date, hardware, software versions."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

# kernel mode of each benchmarked path: the batch-invariant one RL uses, and the plain one it is compared with
PATHS = {"invariant": True, "plain": False}


class CorrectnessError(RuntimeError):
    """The benchmarked code failed its correctness check; no figure may be reported."""


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return info


def write_result(kind: str, payload: dict[str, Any], out_dir: str | Path = "bench_results") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{kind}-{stamp}.json"
    doc = {"benchmark": kind, "date_utc": stamp, "hardware": hardware(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def csv_names(csv: str) -> tuple[str, ...]:
    """``"tiny, mid"`` → ``("tiny", "mid")`` (command-line lists)."""
    return tuple(p.strip() for p in csv.split(",") if p.strip())


def csv_ints(csv: str) -> tuple[int, ...]:
    """``"1,8, 64"`` → ``(1, 8, 64)`` (command-line lists)."""
    return tuple(int(p) for p in csv_names(csv))


def run_reported(run: Callable[[Console], Any], console: Console | None = None) -> int:
    """Exit status of a benchmark: 0, or 1 after saying which correctness check failed (nothing is reported)."""
    console = console or Console()
    try:
        run(console)
    except CorrectnessError as err:
        console.print("correctness check failed, nothing reported:", style="bold red", end=" ")
        console.print(str(err), markup=False, highlight=False)
        return 1
    return 0
