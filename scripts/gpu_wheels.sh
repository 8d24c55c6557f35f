#!/usr/bin/env bash
# Fetch, on a machine with internet, the wheels that scripts/gpu_check.sh installs on a GPU machine that has none.
# The GPU image (CUDA, Python 3.12, torch, triton, numpy, rich, safetensors, tokenizers, jinja2, einops, pytest)
# lacks only these; rlplat itself runs from the checkout (PYTHONPATH), so torch is never replaced.
# Writes .whl/ (git-ignored; about 5 MB), which the device call carries: carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "omegaconf==2.4.0" "antlr4-python3-runtime==4.13.2" "redis==8.2.0" "fla-core==0.6.0" \
  "typing-extensions==4.16.0"  # pydantic 2.14 needs >= 4.16; the image's own may be older
ls -1 .whl
du -sh .whl
