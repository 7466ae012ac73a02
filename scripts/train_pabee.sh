#!/usr/bin/env bash
# PABEE training (the PABEE README's command): every exit trained jointly with the loss Σ i·L_i / Σ i.
# Original: --model_type albert --model_name_or_path albert-base-v2 (needs the hub); default here: packaged MiniLM.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/pabee-$TASK_NAME}
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$MODEL_NAME_OR_PATH" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_train --do_eval --do_lower_case --max_seq_length 128 \
  --per_gpu_train_batch_size 32 --per_gpu_eval_batch_size 32 --learning_rate 2e-5 \
  --save_steps 50 --logging_steps 50 --num_train_epochs "${NUM_TRAIN_EPOCHS:-5}" \
  --exit_loss "${EXIT_LOSS:-weighted}" --output_dir "$OUTPUT_DIR" --overwrite_output_dir --evaluate_during_training "$@"
