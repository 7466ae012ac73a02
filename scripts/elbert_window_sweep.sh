#!/usr/bin/env bash
# ELBERT sweep: stage-1 threshold δ × window size N × window criterion, replayed from one cached pass. ELBERT's code
# rewrote config.json in place for every value; nothing is rewritten here. Train with the learned loss weights first:
#   EXIT_LOSS=learned bash scripts/train_pabee.sh   (or pass --exit_loss learned)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/pabee-$TASK_NAME}
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$OUTPUT_DIR" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_eval --max_seq_length 128 --per_gpu_eval_batch_size 32 --output_dir "$OUTPUT_DIR" \
  --elbert_delta "${DELTAS:-0.05,0.1,0.2,0.3,0.4}" --elbert_window "${WINDOWS:-2,3,4}" \
  --elbert_criterion "${CRITERIA:-monotonic,same,range}" --elbert_range "${RANGE:-0.05}" "$@"
