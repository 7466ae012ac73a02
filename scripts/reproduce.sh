#!/usr/bin/env bash
# The GLUE study of the early-exit papers' claims on all-MiniLM-L6-v2 (results/), from scratch, resumable:
#   1. choose learning rate and epochs per task on a held-out 10 % of the training set (never on dev);
#   2. train and evaluate every (task, variant, seed) with those settings (see scripts/study.py for the variants);
#   3. build results/tables.md, claims.md, summary.json and the plots from the saved per-layer dev logits, and
#      results/stsb_by_genre.md (STS-B's single-exit Pearson per genre, from the same logits and the TSVs' genres).
# Usage (in the background; interrupting it loses at most the steps since each run's last checkpoint):
#   nohup bash scripts/reproduce.sh > runs/study/reproduce.log 2>&1 &
# Environment: WORKERS [2] parallel runs of one torch thread each; SEEDS [1,2,3]; PHASES [1,2,3] (1: DeeBERT two-stage
# and PABEE's weighted loss with both heads; 2: ELBERT's learned and uniform weights, linear head; 3: those two with the
# shared-pooler head); MULTIEXIT_SHARED_DIR [../shared] (GLUE data under data/glue/<TASK>).
# Measured wall time: see results/README.md.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;; esac
[ $# -eq 0 ] || { echo "error: reproduce.sh takes no arguments (its settings come from the environment; see --help)" >&2; exit 2; }
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
mkdir -p runs/study
"$PYTHON" scripts/study.py search
"$PYTHON" scripts/study.py train
"$PYTHON" scripts/analyze_results.py
GLUE=${GLUE_DIR:-${MULTIEXIT_SHARED_DIR:-../shared}/data/glue}
"$PYTHON" scripts/stsb_by_genre.py --data_dir "$GLUE/STS-B" --runs_dir runs/study
