#!/usr/bin/env bash
# DeeBERT each-layer evaluation: every off-ramp scored on its own, from ONE pass (DeeBERT re-ran the dev set L times).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/deebert-$TASK_NAME}
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$OUTPUT_DIR" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_eval --do_lower_case --max_seq_length 128 --per_gpu_eval_batch_size 1 \
  --output_dir "$OUTPUT_DIR" --eval_each_highway --eval_highway --save_layer_logits "$@"
