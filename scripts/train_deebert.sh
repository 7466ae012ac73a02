#!/usr/bin/env bash
# DeeBERT two-stage training in one command: stage 1 fine-tunes the backbone with the final exit only; stage 2
# freezes it (requires_grad=False, dropout off) and trains the per-layer off-ramps (pooler + linear).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/deebert-$TASK_NAME}
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$MODEL_NAME_OR_PATH" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_train --do_eval --do_lower_case --max_seq_length 128 \
  --per_gpu_train_batch_size 8 --per_gpu_eval_batch_size 32 --learning_rate 2e-5 \
  --num_train_epochs "${NUM_TRAIN_EPOCHS:-10}" --save_steps 0 --logging_steps 0 \
  --exit_head_type pooler --deebert_two_stage --eval_after_first_stage \
  --output_dir "$OUTPUT_DIR" --overwrite_output_dir --seed 42 "$@"
