#!/usr/bin/env bash
# The one prepared check for a session that is lent a GPU (one H100/H200, no internet), in under 10 minutes:
#   1. the Triton kernels compiled for real: `pytest -m "gpu or triton"` (bf16 included) on tests/kernels;
#   2. bitwise invariance on CUDA: the model tests of tests/models/test_invariance.py on the Triton backend, fp32,
#      bf16 and FP8 (alone / padded batch / token by token / prefill + decode / chunked prefill / batched decode);
#   3. `rlplat check-alignment` on CUDA with the native engine, fp32 / bf16 / fp8, prompts of 1-300 tokens and
#      generations of 64-200 tokens, exact required (vLLM too if the machine has it);
#   4. `rlplat bench kernels` on CUDA: Triton invariant kernels against plain (cuBLAS, the chunked Triton linear
#      attention, torch SDPA) and FLA's chunked simple-GLA, T = 512 / 2048 / 8192, fp32 and bf16, decode times,
#      and one Ring-mini decoder layer.
# Everything lands in $OUT (the device tool's result folder; ./gpu_results elsewhere): gpu_check.log, pytest.xml,
# alignment-*.json, kernels-*.json, summary.txt. Commit what comes back under bench_results/gpu-<date>/.
#
# Before the device call, on this machine: bash scripts/gpu_wheels.sh   (fetches .whl/, ~5 MB)
# Then: device run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=590)
# A CPU dry run of the plumbing (interpreter, tiny sizes; uses the venv, no wheels): GPU_CHECK_DRY=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
DRY=${GPU_CHECK_DRY:-0}

step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
record() {  # record NAME RC
  local verdict=ok
  [ "$2" -eq 0 ] || verdict="FAILED (exit $2)"
  echo "$1: $verdict" | tee -a "$SUMMARY" "$LOG"
}

if [ "$DRY" = 1 ]; then
  PY=.venv/bin/python
  DEVICE=cpu
  export TRITON_INTERPRET=1
  PYTEST_SEL=(tests/kernels/test_triton_invariant_gemm.py -m "gpu or triton")
  BENCH_ARGS=(--quick --ops gemm,linear_attention --backend reference)  # plumbing only: the interpreter is slow
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
  PYTEST_SEL=(tests/kernels tests/models/test_invariance.py -m "gpu or triton")
  BENCH_ARGS=(--repeats 3 --layer --backend triton --decode-batches 1,32)
  ALIGN_OVERRIDES=("rollout.alignment.prompt_length=[1,300]" "rollout.alignment.max_new_tokens=[64,200]")
  ALIGN_FLAGS=(--num-prompts 16 --n 2)
  ALIGN_TIMEOUT=45
fi

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG" "$SUMMARY"

step "1+2. pytest ${PYTEST_SEL[*]}"
timeout 210 $PY -m pytest -q -p no:cacheprovider -p no:randomly "${PYTEST_SEL[@]}" --junitxml "$OUT/pytest.xml" \
  -o addopts="-ra --strict-markers --import-mode=importlib" --timeout 200 >>"$LOG" 2>&1
record "pytest (Triton compiled, invariance on $DEVICE)" $?
tail -n 3 "$LOG" | tee -a "$SUMMARY"

step "3. check-alignment on $DEVICE (native engine)"
for precision in fp32 bf16 fp8; do
  timeout $ALIGN_TIMEOUT $PY -m rlplat.cli check-alignment configs/tiny_math.yaml model.device=$DEVICE kernels.backend=triton \
    model.precision=$precision "${ALIGN_OVERRIDES[@]}" "${ALIGN_FLAGS[@]}" --require-exact \
    >"$OUT/alignment-$precision.json" 2>>"$LOG"
  rc=$?
  record "check-alignment $precision" $rc
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('exact','max_abs_logprob_diff','num_tokens','seconds')})" \
    "$OUT/alignment-$precision.json" 2>&1 | tee -a "$SUMMARY"
done
if [ "$DRY" != 1 ] && $PY -c "import vllm" >/dev/null 2>&1; then
  timeout 240 $PY -m rlplat.cli check-alignment configs/tiny_math.yaml rollout.backend=vllm kernels.backend=triton \
    "${ALIGN_OVERRIDES[@]}" rollout.vllm.max_model_len=512 "${ALIGN_FLAGS[@]}" --require-exact \
    >"$OUT/alignment-vllm.json" 2>>"$LOG"
  record "check-alignment vllm fp32" $?
else
  echo "check-alignment vllm: skipped (vLLM is not installed on this machine)" | tee -a "$SUMMARY" "$LOG"
fi

step "4. bench kernels on $DEVICE"
timeout 210 $PY -m rlplat.cli bench kernels --device $DEVICE --out "$OUT" "${BENCH_ARGS[@]}" \
  >>"$LOG" 2>&1
record "bench kernels" $?

step "done"
cat "$SUMMARY"
