#!/usr/bin/env bash
# DeeBERT entropy sweep. DeeBERT looped over 13 thresholds, one process and one full eval each; here the whole list
# is replayed from one cached pass (seconds), with the results plot written next to exit_results.jsonl.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/deebert-$TASK_NAME}
ENTROPIES=${ENTROPIES:-0,0.001,0.005,0.01,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.65,0.69}
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$OUTPUT_DIR" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_eval --do_lower_case --max_seq_length 128 --per_gpu_eval_batch_size 1 \
  --output_dir "$OUTPUT_DIR" --eval_highway --early_exit_entropy "$ENTROPIES" "$@"
