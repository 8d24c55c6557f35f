#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment with rlplat and its test tools, plus the
# services the tests use for real (Debian's redis-server, Chromium + ChromeDriver for the dashboard test).
# torch is pinned to 2.13.0 in pyproject.toml so CPU machines get the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
bash scripts/install_redis.sh
bash scripts/install_browser.sh
echo "rlplat installed in $(pwd)/.venv — activate with: source .venv/bin/activate"
