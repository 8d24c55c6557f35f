#!/usr/bin/env bash
# The one prepared check for a session that is lent a GPU (one H100/H200, no internet), in about 8 minutes:
#   1. bitwise invariance on CUDA: the model tests of tests/models/test_invariance.py on the Triton backend, fp32,
#      bf16 and FP8 (alone / padded batch / token by token / prefill + decode / chunked prefill / batched decode),
#      then the Triton kernels compiled for real: `pytest -m "gpu or triton"` (bf16 included) on tests/kernels;
#   2. `rlplat check-alignment` on CUDA with the native engine, fp32 / bf16 / fp8, prompts of 1-300 tokens and
#      generations of 64-200 tokens, exact required (vLLM too if the machine has it);
#   3. `rlplat bench kernels` on CUDA: Triton invariant kernels against plain (cuBLAS, the chunked Triton linear
#      attention, torch SDPA) and FLA's chunked simple-GLA (bf16), T = 512 / 2048 / 8192, fp32 and bf16, decode
#      times, and one Ring-mini decoder layer.
# Each step has its own time limit, and a step stopped by it still leaves its results: the limit sends SIGINT,
# on which pytest writes its summary and JUnit file and the benchmark writes what it measured (marked
# "interrupted"). Everything lands in $OUT (the device tool's result folder; /tmp/gpu_results elsewhere, outside
# the checkout, whose files the test suite watches): gpu_check.log, pytest.xml, alignment-*.json, kernels-*.json,
# summary.txt. Commit what comes back under bench_results/gpu-<date>/.
#
# Before the device call, on this machine: bash scripts/gpu_wheels.sh   (fetches .whl/, ~5 MB)
# Then: device run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=560). The steps' limits add up
# to about 8 minutes, which leaves a warm machine a few minutes to rerun one step:
#   device run(command="GPU_CHECK_STEPS=bench bash scripts/gpu_check.sh", carry=[".whl"], ...)
# GPU_CHECK_STEPS: any of "pytest align bench" (default: all three).
# A CPU dry run of the plumbing (interpreter, tiny sizes; uses the venv, no wheels): GPU_CHECK_DRY=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
DRY=${GPU_CHECK_DRY:-0}
STEPS=" ${GPU_CHECK_STEPS:-pytest align bench} "

step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
record() {  # record NAME RC
  local verdict=ok
  [ "$2" -eq 0 ] || verdict="FAILED (exit $2)"
  [ "$2" -eq 124 ] || [ "$2" -eq 130 ] && verdict="$verdict: stopped at its time limit, partial results kept"
  echo "$1: $verdict" | tee -a "$SUMMARY" "$LOG"
}
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
limit() { timeout -s INT -k 20 "$@"; }  # SIGINT first (results are written), SIGKILL 20 s later

if [ "$DRY" = 1 ]; then
  PY=.venv/bin/python
  DEVICE=cpu
  export TRITON_INTERPRET=1
  PYTEST_SEL=(tests/kernels/test_triton_invariant_gemm.py -m "gpu or triton")
  PYTEST_TIMEOUT=600
  BENCH_ARGS=(--quick --ops gemm,linear_attention --backend reference)  # plumbing only: the interpreter is slow
  BENCH_TIMEOUT=600
  ALIGN_OVERRIDES=("rollout.alignment.prompt_length=[1,40]" "rollout.alignment.max_new_tokens=[4,8]")
  ALIGN_FLAGS=(--num-prompts 2 --n 1)
  ALIGN_TIMEOUT=600  # the interpreter is ~700x slower than a GPU
else
  PY=python3
  DEVICE=cuda
  unset TRITON_INTERPRET
  step "installing carried wheels"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/: run scripts/gpu_wheels.sh here first and carry .whl" | tee -a "$LOG"
    exit 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
  # the invariance tests first: they are what a GPU session is for, and the kernels compile on their way
  PYTEST_SEL=(tests/models/test_invariance.py tests/kernels -m "gpu or triton")
  PYTEST_TIMEOUT=170
  BENCH_ARGS=(--repeats 3 --layer --backend triton --decode-batches 1,32)
  BENCH_TIMEOUT=150
  ALIGN_OVERRIDES=("rollout.alignment.prompt_length=[1,300]" "rollout.alignment.max_new_tokens=[64,200]")
  ALIGN_FLAGS=(--num-prompts 16 --n 2)
  ALIGN_TIMEOUT=40
fi

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG" "$SUMMARY"

if wanted pytest; then
  step "1. pytest ${PYTEST_SEL[*]}"
  # its output goes to a file outside the checkout first: the suite fails a test module that changes a checkout
  # file, and $OUT may lie inside it
  PYTEST_LOG=$(mktemp /tmp/gpu_pytest.XXXXXX)
  limit "$PYTEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider -p no:randomly "${PYTEST_SEL[@]}" \
    --junitxml "$PYTEST_LOG.xml" -o addopts="-ra --strict-markers --import-mode=importlib" --timeout 120 \
    >"$PYTEST_LOG" 2>&1
  rc=$?
  cat "$PYTEST_LOG" >>"$LOG"
  [ -f "$PYTEST_LOG.xml" ] && cp "$PYTEST_LOG.xml" "$OUT/pytest.xml"
  record "pytest (invariance on $DEVICE, Triton compiled)" $rc
  tail -n 3 "$PYTEST_LOG" | tee -a "$SUMMARY"
fi

if wanted align; then
  step "2. check-alignment on $DEVICE (native engine)"
  for precision in fp32 bf16 fp8; do
    limit $ALIGN_TIMEOUT $PY -m rlplat.cli check-alignment configs/tiny_math.yaml model.device=$DEVICE kernels.backend=triton \
      model.precision=$precision "${ALIGN_OVERRIDES[@]}" "${ALIGN_FLAGS[@]}" --require-exact \
      >"$OUT/alignment-$precision.json" 2>>"$LOG"
    rc=$?
    record "check-alignment $precision" $rc
    $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('exact','max_abs_logprob_diff','num_tokens','seconds')})" \
      "$OUT/alignment-$precision.json" 2>&1 | tee -a "$SUMMARY"
  done
  if [ "$DRY" != 1 ] && $PY -c "import vllm" >/dev/null 2>&1; then
    limit 120 $PY -m rlplat.cli check-alignment configs/tiny_math.yaml rollout.backend=vllm kernels.backend=triton \
      "${ALIGN_OVERRIDES[@]}" rollout.vllm.max_model_len=512 "${ALIGN_FLAGS[@]}" --require-exact \
      >"$OUT/alignment-vllm.json" 2>>"$LOG"
    record "check-alignment vllm fp32" $?
  else
    echo "check-alignment vllm: skipped (vLLM is not installed on this machine)" | tee -a "$SUMMARY" "$LOG"
  fi
fi

if wanted bench; then
  step "3. bench kernels on $DEVICE"
  limit "$BENCH_TIMEOUT" $PY -m rlplat.cli bench kernels --device $DEVICE --out "$OUT" "${BENCH_ARGS[@]}" \
    >>"$LOG" 2>&1
  record "bench kernels" $?
fi

step "done"
cat "$SUMMARY"
