#!/usr/bin/env bash
# PCEE-BERT sweep: patience × normalised-entropy threshold τ (PCEE's --ee_mechanism V1), plus PABEE (V0) at the same
# patiences for comparison, all replayed from one cached pass. Set ENSEMBLE=1 for PCEE's cross-layer ensemble.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
OUTPUT_DIR=${OUTPUT_DIR:-runs/pabee-$TASK_NAME}
EXTRA=()
if [ "${ENSEMBLE:-0}" = 1 ]; then EXTRA=(--pcee_ensemble); fi
"$PYTHON" "$RUNNER" \
  --model_type "$MODEL_TYPE" --model_name_or_path "$OUTPUT_DIR" \
  --task_name "$TASK_NAME" "${DATA_ARGS[@]}" \
  --do_eval --max_seq_length 128 --per_gpu_eval_batch_size 32 --output_dir "$OUTPUT_DIR" \
  --pcee_patience "${PATIENCE:-1,2,3,4}" --pcee_tau "${TAUS:-0.05,0.1,0.2,0.3,0.4,0.5}" \
  --patience "${PATIENCE:-1,2,3,4}" "${EXTRA[@]}" "$@"
