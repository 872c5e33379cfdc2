#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (torch preinstalled, no package registry), in priority order, inside
# one time budget: build the extension in place for the card; run the `cuda` tests file group by file group (a
# crashed CUDA context stays confined to its group), every kernel and graph capture under compute-sanitizer
# memcheck; time every decoding mode against AR (base preset, bf16, CUDA graphs, batch 1..256) and the trained draft
# student in the payload; the kernels against their baselines; the CUDA fuzz profile under memcheck; a profile of
# one round; training attention against compiled FlexAttention. A step starts only when the budget has room for it
# and is cut at the budget's end, so the run ends on time with everything measured so far.
#
# Results land in bench/results/*_cuda*; the logs in build/gpu_check. With $OUT set (the device tool), the logs and
# results are packed into $OUT/gpu_check.tar.gz after every step, so a run cut short still returns what it made.
#   usage: KFORCING_GIT_SHA=<sha> [GPU_CHECK_BUDGET_S=480] [PAYLOAD=gpu_payload] bash scripts/gpu_check.sh
# (a tree copied to the GPU machine has no .git: KFORCING_GIT_SHA tags the build and the result tables; PAYLOAD is
# a folder with teacher/, student/ and data/ from `scripts/make_gpu_payload.sh`: a trained draft student to time)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 KFORCING_OPS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
LOG=build/gpu_check
PAYLOAD=${PAYLOAD:-gpu_payload}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))
mkdir -p "$LOG"
status=()

pack() {  # the logs and every CUDA result so far, as one file under $OUT
  [ -n "${OUT:-}" ] || return 0
  printf '%s\n' "${status[@]}" > "$LOG/summary.txt"
  tar czf "$OUT/gpu_check.tar.gz.part" "$LOG" $(ls -d bench/results/*cuda* 2>/dev/null) 2>/dev/null \
    && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
  cp "$LOG/summary.txt" "$OUT/summary.txt"
}

step() {  # step NAME SECONDS COMMAND...: run with min(SECONDS, budget left) as its limit; record the outcome
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    status+=("$(printf '%-24s skipped: the time budget is spent' "$name")")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > >(tee "$LOG/$name.log") 2>&1
  local rc=$?
  local outcome="ok"
  [ $rc -eq 124 ] && outcome="CUT at ${limit}s" || { [ $rc -ne 0 ] && outcome="FAILED rc=$rc"; }
  status+=("$(printf '%-24s %s (%ss)' "$name" "$outcome" $((SECONDS - start)))")
  pack
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOG/gpu.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda)" | tee -a "$LOG/gpu.txt"
step build 300 $PY setup.py build_ext --inplace || { pack; printf '%s\n' "${status[@]}"; exit 1; }
$PY -m kforcing_ops.info | tee -a "$LOG/gpu.txt"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
test_group() {  # test_group NAME FILES...: the cuda-marked tests of FILES in one process
  local name=$1; shift
  step "test_$name" 150 $PY -m pytest -q -m cuda -p no:cacheprovider -p no:logging -rfE "$@"
}

# 1. Correctness: every cuda test, then every kernel and graph replay under memcheck.
test_group sampling tests/test_sampling.py
test_group linear tests/test_linear.py
test_group attention tests/test_attention.py
test_group embedding tests/test_embedding.py
test_group decoding tests/test_model.py tests/test_generate.py tests/test_row_invariance.py \
  tests/test_cuda_decoding.py -s
# No caching allocator for the kernels, so that every buffer is its own allocation and memcheck sees any overrun;
# graph capture needs the caching allocator.
step smoke_memcheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY scripts/cuda_smoke.py kernels
step graphs_memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/cuda_smoke.py graphs

# 2. Decoding against AR: every mode, base preset in bf16; then the trained draft student of the payload.
step bench_decode 170 $PY bench/bench_decode.py --device cuda --k 2 4 --repeats 3 --new-tokens 128 --cuda-graph \
  --verified
if [ -d "$PAYLOAD/student" ]; then
  step eval_draft_student 110 $PY -m kforcing.cli eval --teacher "$PAYLOAD/teacher" --student "$PAYLOAD/student" \
    --data-dir "$PAYLOAD/data" --out bench/results/draft_chain_cuda --device cuda --dtype bfloat16 \
    --batch-sizes 1,8,32,64,128,256 --speed-tokens 64 --speed-repeats 3 --contexts 128 --num-samples 16 \
    --no-progress --no-plots
fi

# 3. Kernels against their rooflines and peers.
step bench_sampling 60 $PY bench/bench_sampling.py --device cuda --skip compiled reference --min-run-time 0.2
step bench_attention_decode 90 $PY bench/bench_attention.py --device cuda --only decode --min-run-time 0.2
step bench_embedding 50 $PY bench/bench_embedding.py --device cuda --min-run-time 0.2
step bench_linear 60 $PY bench/bench_linear.py --device cuda --rows 1 4 16 64 --repeats 3 --min-mb 1024

# 4. The rest of correctness and measurement, as the budget allows.
step fuzz_memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_fuzz.py
step profile_round 45 $PY bench/bench_decode.py --device cuda --k 4 --batch 1 --cuda-graph --profile
step bench_attention_train 120 $PY bench/bench_attention.py --device cuda --only train --context 512 1024 \
  --min-run-time 0.2 --rounds 2

pack
echo
echo "===== gpu_check summary ($(head -2 "$LOG/gpu.txt" | tail -1))"
printf '%s\n' "${status[@]}"
