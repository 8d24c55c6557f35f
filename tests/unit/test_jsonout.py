"""stdout of a JSON command holds the JSON alone, whatever writes to stdout while the work runs: Python prints,
a logging handler bound to sys.stdout before the redirect (as vLLM's is), raw writes to file descriptor 1 and
child processes (as vLLM's engine processes are). Run in a subprocess so the real descriptors are tested."""

import json
import os
import subprocess
import sys

import pytest

from rlplat.jsonout import print_json, stdout_to_stderr

SCRIPT = """
import logging, os, subprocess, sys
from rlplat.jsonout import print_json, stdout_to_stderr

handler = logging.StreamHandler(sys.stdout)  # bound before the redirect, like vLLM's logger
log = logging.getLogger("backend")
log.addHandler(handler)
log.setLevel(logging.INFO)
print("before", flush=True)
with stdout_to_stderr():
    print("python print")
    log.info("logger line")
    sys.__stdout__.write("unflushed text on the original stdout object\\n")
    os.write(1, b"raw fd 1 write\\n")
    subprocess.run([sys.executable, "-c", "print('child process line')"], check=True)
    os.system("echo shell child line")
print_json({"exact": True, "kl": float("inf"), "nested": [1.5, float("nan")]})
"""


def test_only_the_json_reaches_stdout():
    # Block-buffered stdout, as a command piped into a parser has (PYTHONUNBUFFERED would hide a missing flush).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    before, _, rest = proc.stdout.partition("\n")
    assert before == "before"  # what a command printed before the block is untouched
    assert json.loads(rest) == {"exact": True, "kl": None, "nested": [1.5, None]}
    for line in (
        "python print",
        "logger line",
        "unflushed text on the original stdout object",
        "raw fd 1 write",
        "child process line",
        "shell child line",
    ):
        assert line in proc.stderr, (line, proc.stderr)


def test_restores_stdout_after_an_error(capfd):
    with pytest.raises(RuntimeError), stdout_to_stderr():
        print("inside")
        raise RuntimeError("backend failed")
    print_json({"after": 1})
    out, err = capfd.readouterr()
    assert json.loads(out) == {"after": 1}
    assert "inside" in err
