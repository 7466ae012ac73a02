#!/usr/bin/env bash
# PABEE inference (the PABEE README's command): batch size 1, every checkpoint, patience 3..8. For STS-B add
# REGRESSION_THRESHOLD=0.1. All settings are scored by offline replay from one cached pass per checkpoint; add --online
# to also run real early exit at batch size 1 and record wall-clock time (and --verify_online to check it).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/pabee-$TASK_NAME}
EXTRA=()
if [ -n "${REGRESSION_THRESHOLD:-}" ]; then EXTRA=(--regression_threshold "$REGRESSION_THRESHOLD"); fi
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$OUTPUT_DIR" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_eval --do_lower_case --max_seq_length 128 --per_gpu_eval_batch_size 1 \
  --output_dir "$OUTPUT_DIR" --eval_all_checkpoints --patience "${PATIENCE:-3,4,5,6,7,8}" "${EXTRA[@]}" "$@"
