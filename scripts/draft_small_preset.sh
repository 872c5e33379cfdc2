#!/usr/bin/env bash
# The small-preset measurement of a draft student with `kforcing distill`'s defaults, prepared to run unattended on
# a quiet machine (it takes about two hours on a 2-core CPU; timings are meaningless while other work shares it):
#   1. a `small` teacher (6 layers x 512, byte-level BPE of 8,192 on the default corpus), resumable;
#   2. a draft student distilled from it with the defaults (chain pathway, one block, k = 4, temperature 0.7,
#      top-k 50, top-p 0.9) for DISTILL_STEPS steps of 8 x 64 windows;
#   3. `kforcing eval`: verified tokens per pass, acceptance per offset against the u-blind floor, unverified
#      sample quality, and tokens/s against AR (pinned k, adaptive, unverified) at batch 1, 8 and 32.
# Both trainings checkpoint often, so an interrupted run loses at most a few minutes: rerun the same command.
# The evaluation is copied to bench/results/draft_small_<device>/ beside a README naming the budget.
#   usage: bash scripts/draft_small_preset.sh [RUN_DIR]      (default RUN_DIR: runs/small-draft)
#   env:   TEACHER_STEPS (default 2000), DISTILL_STEPS (default 400)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/small-draft}
TEACHER_STEPS=${TEACHER_STEPS:-2000}
# 2,000 teacher steps take about 90 minutes on 2 cores and 400 student steps about 32, the two hours of the budget.
DISTILL_STEPS=${DISTILL_STEPS:-400}
RESULTS=bench/results/draft_small_cpu
mkdir -p "$RUN"
start=$SECONDS

resume=()
[ -f "$RUN/teacher/latest.json" ] && resume=(--resume)
if ! grep -qs "\"step\": $TEACHER_STEPS\b" "$RUN/teacher/latest.json"; then  # not trained to the end yet
  kforcing train-teacher --config small --batch-size 8 --seq-len 128 --steps "$TEACHER_STEPS" \
    --save-interval 250 --out "$RUN/teacher" "${resume[@]}"
fi
teacher_s=$((SECONDS - start))

resume=()
[ -d "$RUN/draft/stage_k4" ] && resume=(--resume)
kforcing distill --teacher "$RUN/teacher" --out "$RUN/draft" --steps "$DISTILL_STEPS" --batch-size 8 --seq-len 64 \
  --eval-interval 150 --save-interval 150 "${resume[@]}"
distill_s=$((SECONDS - start - teacher_s))

kforcing eval --teacher "$RUN/teacher" --student "$RUN/draft" --k 2,4 --batch-sizes 1,8,32 --out "$RUN/eval"
mkdir -p "$RESULTS"
cp "$RUN"/eval/eval.{md,json} "$RESULTS"/
cp "$RUN"/eval/*.png "$RESULTS"/ 2>/dev/null || true
cat > "$RESULTS/README.md" <<EOF
# Draft student on the small preset ($(uname -m) CPU, $(nproc) cores)

Produced by \`bash scripts/draft_small_preset.sh\` at git $(git rev-parse --short HEAD 2>/dev/null || echo unknown),
$(date -u +%Y-%m-%dT%H:%MZ).

- Teacher: \`kforcing train-teacher --config small --batch-size 8 --seq-len 128 --steps $TEACHER_STEPS\`
  (${teacher_s} s here; 0 when it was already trained).
- Student: \`kforcing distill\` defaults, $DISTILL_STEPS steps of 8 x 64 windows (${distill_s} s).
- Evaluation: [eval.md](eval.md) (\`kforcing eval --k 2,4 --batch-sizes 1,8,32\`).
EOF
echo "wrote $RESULTS (teacher ${teacher_s} s, distillation ${distill_s} s)"
