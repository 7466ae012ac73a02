#!/usr/bin/env bash
# Everything this project checks and measures on a CUDA GPU, in one short run (a few minutes on one H200):
#   1. the CUDA tests: CUDA-graph replay equals eager early exit on the same padded input; batch size 1, batched and
#      replay agree on the GPU; fp16 autocast;
#   2. the CUDA section of the benchmark: bert-base size at batch size 1 and 128 tokens, eager and CUDA graphs
#      ((a), (b), the floor, ms per layer), batched early exit at 32 and 128 rows in fp16 and bf16, and (f): early exit
#      on ONNX Runtime's CUDA execution provider (IO binding: hidden states stay on the GPU, only exit logits come
#      back) against the stock model exported whole, also on CUDA;
#   3. the ONNX Runtime tests, the CUDA provider's included (it agrees with the CPU provider and keeps the hidden
#      states on the device).
# ONNX Runtime on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu, in place of onnxruntime); without it the
# tests and (f) say they were skipped.
# Usage (from the repository root; OUT is where the results go):
#   OUT=runs/gpu bash benchmarks/gpu_checks.sh [TOKENIZER_DIR]
# TOKENIZER_DIR: a saved tokenizer folder, for a machine without the packaged all-MiniLM-L6-v2.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PYTHON=${PYTHON:-python3}
TOKENIZER=${1:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PYTHON" -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
start=$(date +%s)
"$PYTHON" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 \
  | tee -a "$OUT/gpu.txt"
"$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_graphs.py tests/test_decision_backends.py \
  tests/test_transfers.py "tests/test_models.py::test_cuda_fp16_autocast" tests/test_onnx.py 2>&1 \
  | tee "$OUT/tests.log"
echo "tests: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
"$PYTHON" benchmarks/benchmark_exits.py --device cuda ${TOKENIZER:+--tokenizer "$TOKENIZER"} \
  --output "$OUT/BENCHMARKS_CUDA.md" --json "$OUT/cuda.json" 2>&1 | tee "$OUT/benchmark.log"
echo "benchmark: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
