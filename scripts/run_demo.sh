#!/usr/bin/env bash
# The offline default job: fine-tune the packaged all-MiniLM-L6-v2 (6 layers) with an exit after every layer on the
# bundled BBC News corpus (5 classes), then replay every exit policy from one cached pass, run real batch-size-1
# early exit for a few settings (verified against the replay), and write exit_results.jsonl + the score-vs-speed-up
# plot. Sized for 2 CPU cores: one epoch over 64-token inputs. The exits are trained with the uniform weighting
# (mean of the exit losses): with so few steps, PABEE's Σ i·L_i / Σ i gives layer 1 only 1/21 of the loss, too little
# to train the early exits (a first demo run with it left layers 1-3 at the majority class). The exits read the mean of
# each layer's token states (--exit_pooling mean), as this sentence-transformers checkpoint was pre-trained: its [CLS]
# state carries no input information below layer 4 (scripts/probe_cls_vs_mean.py).
# Three runs: fine-tune; real early exit on 100 documents; the whole sweep last (the top-level summary and plot are
# the latest run's).
# Usage: bash scripts/run_demo.sh [OUTPUT_DIR]   (default: runs/demo-bbc-news in the repository), from any folder.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;; esac
# an OUTPUT_DIR given is taken from the caller's folder; the runner is run from the repository
OUTPUT_DIR=$(realpath -m "${1:-$(dirname "$0")/../runs/demo-bbc-news}")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

# 1. fine-tune
"$PYTHON" run_glue_with_exits.py \
  --model_type bert --model_name_or_path packaged-minilm \
  --task_name bbc-news --max_seq_length 64 \
  --do_train --num_train_epochs 1 --per_gpu_train_batch_size 16 --learning_rate 2e-4 --warmup_ratio 0.1 \
  --exit_loss uniform --exit_pooling mean \
  --logging_steps 20 --save_steps 0 --output_dir "$OUTPUT_DIR" --overwrite_output_dir

# 2. real early exit at batch size 1 for three settings on the first 100 dev documents, each checked example by
# example against the replay, with wall-clock time (mode "online" in exit_results.jsonl)
"$PYTHON" run_glue_with_exits.py \
  --model_type bert --model_name_or_path "$OUTPUT_DIR" --task_name bbc-news --max_seq_length 64 \
  --output_dir "$OUTPUT_DIR" --max_eval_samples 100 \
  --do_eval --per_gpu_eval_batch_size 1 --patience 2 --early_exit_entropy 0.7 --pcee_patience 1 --pcee_tau 0.45 \
  --online --verify_online --timing_repeats 1 --timing_warmup 5

# 3. every layer and every policy's default grid replayed on the whole dev set from one cached pass; last, so that the
# top-level summary table and plot (the latest run's) are this sweep's
"$PYTHON" run_glue_with_exits.py \
  --model_type bert --model_name_or_path "$OUTPUT_DIR" --task_name bbc-news --max_seq_length 64 \
  --output_dir "$OUTPUT_DIR" \
  --do_eval --per_gpu_eval_batch_size 32 --eval_each_highway --sweep_default_grids \
  --patience 1,2,3 --early_exit_entropy 0.2,0.7 --pcee_patience 1,2 --pcee_tau 0.3,0.45 --elbert_delta 0.5

echo "results: $OUTPUT_DIR/exit_results.jsonl, plot: $OUTPUT_DIR/score_vs_speedup_final.png"
