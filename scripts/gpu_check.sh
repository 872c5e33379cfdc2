#!/usr/bin/env bash
# The one prepared run for a GPU machine (torch preinstalled, no package registry): build the extension in place,
# run the `cuda` tests file by file (a crashed CUDA context stays confined to its file), run every kernel and the
# CUDA fuzz profile (tests/test_fuzz.py) under compute-sanitizer memcheck, then the benchmarks; prints a short
# summary last. Sized to finish in under 8 minutes on one
# H100/H200. Results land in bench/results/*_cuda.{json,md} and, when $OUT is set, are copied there.
#   usage: KFORCING_GIT_SHA=<sha> bash scripts/gpu_check.sh [--quick]     (--quick: tests and sanitizer only)
# (a tree copied to the GPU machine has no .git: KFORCING_GIT_SHA tags the build and the result tables)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 KFORCING_OPS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY=${PYTHON:-python3}
LOG=${OUT:-build/gpu_check}
mkdir -p "$LOG"
status=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record pass/fail
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" > >(tee "$LOG/$name.log") 2>&1
  local rc=$?
  status+=("$(printf '%-22s %s (%ss)' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - start)))")
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOG/gpu.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
step build 300 $PY setup.py build_ext --inplace || { printf '%s\n' "${status[@]}"; exit 1; }
$PY -m kforcing_ops.info
for file in sampling attention embedding linear; do
  step "test_$file" 240 $PY -m pytest -q -m cuda -p no:cacheprovider "tests/test_$file.py"
done
step test_model 240 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_model.py tests/test_generate.py \
  tests/test_row_invariance.py
if command -v compute-sanitizer >/dev/null; then
  step sanitizer 180 compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/cuda_smoke.py
  step fuzz_memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_fuzz.py
else
  step fuzz 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_fuzz.py
fi
if [ "${1:-}" != "--quick" ]; then
  step bench_sampling 120 $PY bench/bench_sampling.py --device cuda --skip compiled reference --min-run-time 0.2
  step bench_attention 300 $PY bench/bench_attention.py --device cuda --min-run-time 0.2 --skip flex_decode
  step bench_embedding 150 $PY bench/bench_embedding.py --device cuda --min-run-time 0.2
  step bench_linear 150 $PY bench/bench_linear.py --device cuda --rows 1 4 16 64 --repeats 3 --min-mb 1024
  step bench_decode 240 $PY bench/bench_decode.py --device cuda --repeats 3 --new-tokens 128 --cuda-graph
fi
[ -n "${OUT:-}" ] && cp -r bench/results/*_cuda* "$OUT"/ 2>/dev/null
echo
for file in bench/results/*_cuda.md bench/results/*_cuda/*.md; do
  [ -f "$file" ] && [ "$(basename "$file")" != index.md ] && { echo "----- $file"; cat "$file"; }
done
echo
echo "===== gpu_check summary ($(head -2 "$LOG/gpu.txt" | tail -1))"
printf '%s\n' "${status[@]}"
