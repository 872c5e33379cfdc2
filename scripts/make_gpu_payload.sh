#!/usr/bin/env bash
# Packs a trained teacher and draft student for scripts/gpu_check.sh into PAYLOAD (default gpu_payload/, which git
# ignores): the teacher checkpoint, the student's final checkpoint and the held-out split of the token cache, the
# few MB a GPU machine needs to time the student (it has no copy of the runs).
#   usage: bash scripts/make_gpu_payload.sh TEACHER_CHECKPOINT STUDENT_CHECKPOINT TOKEN_CACHE [PAYLOAD]
#   e.g.   bash scripts/make_gpu_payload.sh runs/teacher/checkpoints/step_0001118 runs/chain/stage_k4/final \
#            runs/teacher/data
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,7p "$0"; exit 2; }
teacher=$1 student=$2 cache=$3 payload=${4:-gpu_payload}
rm -rf "$payload"
mkdir -p "$payload/teacher" "$payload/student" "$payload/data"
cp "$teacher"/{config.json,model.safetensors,tokenizer.json} "$payload/teacher/"
cp "$student"/{config.json,model.safetensors,tokenizer.json} "$payload/student/"
cp "$cache"/{meta.json,train.bin,val.bin} "$payload/data/"  # the cache is checked whole
du -sh "$payload"
