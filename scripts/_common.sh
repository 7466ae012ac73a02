# Shared defaults for the scripts in this folder. Every path and model can be overridden from the environment:
#   GLUE_DIR     folder holding <TASK>/{train,dev}.tsv (the classic glue_data layout); default: ../shared/data/glue
#                beside the repo if present, else unset (data then comes from the HF hub)
#   MODEL_TYPE   bert | roberta | albert
#   MODEL_NAME_OR_PATH   hub id or folder; default: the pip-packaged all-MiniLM-L6-v2 ("packaged-minilm")
#   TASK_NAME    e.g. MRPC, SST-2, STS-B
#   OUTPUT_DIR   where checkpoints and exit_results.jsonl go
#   PYTHON       interpreter; default: the repo's .venv if it exists
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
if [ -z "${GLUE_DIR:-}" ] && [ -d "$REPO_DIR/../shared/data/glue" ]; then GLUE_DIR="$REPO_DIR/../shared/data/glue"; fi
MODEL_TYPE=${MODEL_TYPE:-bert}
MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-packaged-minilm}
TASK_NAME=${TASK_NAME:-MRPC}
# the task's folder, found as the runner finds task names (case, '-', '_' ignored): TASK_NAME=sst-2 reads SST-2/
task_folder() {
  local want name folder
  want=$(printf '%s' "$1" | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
  for folder in "$GLUE_DIR"/*/; do
    name=$(basename "$folder" | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
    if [ "$name" = "$want" ]; then printf '%s' "${folder%/}"; return; fi
  done
  printf '%s' "$GLUE_DIR/$1"  # none: the runner names the folder it expected
}
DATA_ARGS=()
if [ -n "${GLUE_DIR:-}" ]; then DATA_ARGS=(--data_dir "$(task_folder "$TASK_NAME")"); fi
RUNNER="$REPO_DIR/run_glue_with_exits.py"
