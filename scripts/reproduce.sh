#!/usr/bin/env bash
# Reproduce the early-exit papers' main claims (PABEE, DeeBERT, PCEE-BERT, ELBERT) on real GLUE data with the real
# all-MiniLM-L6-v2 backbone (6 layers, hidden 384), then build every table, plot and results/README.md from the saved
# per-layer dev logits.
#
# WALL TIME (measured, results/wall_time.json): the 60 runs (5 tasks x 3 seeds x {multi-exit weighted, DeeBERT
# two-stage, uniform, learned}) add up to 237 min of per-run time, i.e. about 2 h on 2 CPU cores with the default 2
# workers of one torch thread each (the committed study ran in three invocations, 132 min from the first run's start to
# the last run's end including pauses, the machine partly shared with other jobs), plus ~2 min of analysis. Budget per
# run: one epoch; SST-2 on its first 3,000 and STS-B on its first 2,500 training examples, MRPC, RTE and CoLA in full.
# This is far less training than the papers (BERT-base, full train sets, several epochs): absolute scores are below
# theirs, and on CoLA and STS-B the jointly trained exits learned (almost) nothing.
#
# Usage:   bash scripts/reproduce.sh                    # the default (CPU-sized) study, results in results/
#          nohup nice -n 10 bash scripts/reproduce.sh > /tmp/reproduce.log 2>&1 &
# Scale up (e.g. on a GPU): full train sets and 3 epochs:
#          N_SST2=all N_STSB=all EPOCHS=3 LR=5e-5 bash scripts/reproduce.sh
# Environment variables (defaults in brackets):
#   RUNS_DIR [runs/study]   where run outputs (checkpoints, logits) go; gitignored
#   RESULTS_DIR [results]   where tables, plots, summary.json and README.md go
#   SEEDS ["1 2 3"]         training seeds (medians and spreads are over these)
#   N_SST2 [3000] N_MRPC [all] N_RTE [all] N_COLA [all] N_STSB [2500]   first-N training examples ("all" = full set)
#   EPOCHS [1] BATCH [32] LR [1e-4] WARMUP [0.06] MAX_SEQ [64] EVAL_BATCH [32]
#   ABLATION_TASKS [all five]   tasks that also get the uniform / learned (ELBERT) loss weightings
#   BASELINE [deebert2]     the single-exit baseline: deebert2 = DeeBERT two-stage (its stage 1 is single-exit
#                           fine-tuning, stage 2 adds off-ramps on the frozen model), final = plain single-exit
#   EXIT_POOLING [mean]     what the exits read: mean of the token states, or cls (the papers; uninformative below
#                           layer 4 on this backbone, see scripts/probe_cls_vs_mean.py)
#   WORKERS [2]             runs executed in parallel (each run is independent); OMP_NUM_THREADS [nproc / WORKERS]
#   KEEP_MODELS [0]         1 keeps model.safetensors of every run (otherwise deleted after the logits are saved)
#   SKIP_TRAINING [0]       1 = only re-run the analysis on existing logits
#   MULTIEXIT_SHARED_DIR [/work/shared]   GLUE data is read from $MULTIEXIT_SHARED_DIR/data/glue/<TASK>
#
# Runs that already have their logits are skipped, so an interrupted study resumes where it stopped.
# Each run is exactly `python run_glue_with_exits.py <args>` (the list is written to results/commands.txt); they are
# executed in one Python process via run_glue_with_exits.cli(argv) only to avoid paying the ~25 s import of
# torch/transformers 40 times on a contended 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

export RUNS_DIR=${RUNS_DIR:-runs/study}
export RESULTS_DIR=${RESULTS_DIR:-results}
export SEEDS=${SEEDS:-"1 2 3"}
export N_SST2=${N_SST2:-3000} N_MRPC=${N_MRPC:-all} N_RTE=${N_RTE:-all} N_COLA=${N_COLA:-all} N_STSB=${N_STSB:-2500}
export EPOCHS=${EPOCHS:-1} BATCH=${BATCH:-32} LR=${LR:-1e-4} WARMUP=${WARMUP:-0.06} MAX_SEQ=${MAX_SEQ:-64}
export EVAL_BATCH=${EVAL_BATCH:-32}
export ABLATION_TASKS=${ABLATION_TASKS:-"SST-2 MRPC RTE CoLA STS-B"} BASELINE=${BASELINE:-deebert2}
# all-MiniLM-L6-v2 was pre-trained with mean pooling and its [CLS] state carries no input information below layer 4,
# so [CLS] exits (the papers' choice, EXIT_POOLING=cls) stay at the majority class there; every model here reads means
export EXIT_POOLING=${EXIT_POOLING:-mean}
export WORKERS=${WORKERS:-2}
# one torch thread per worker by default: on 2 cores, 2 single-threaded runs do ~1.6x the work of 1 two-threaded run
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 ))}
export KEEP_MODELS=${KEEP_MODELS:-0}
export GLUE_DIR=${MULTIEXIT_SHARED_DIR:-/work/shared}/data/glue
mkdir -p "$RUNS_DIR" "$RESULTS_DIR"
# the code revision the runs used (a checkout: git HEAD + "-dirty" if modified; an exported snapshot: SNAPSHOT_COMMIT)
if git rev-parse HEAD >/dev/null 2>&1; then
  echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- '*.py' || echo -dirty)" > "$RUNS_DIR/code_revision.txt"
else
  cat SNAPSHOT_COMMIT > "$RUNS_DIR/code_revision.txt" 2>/dev/null || echo unknown > "$RUNS_DIR/code_revision.txt"
fi
STUDY_START=$(date +%s)

if [ "${SKIP_TRAINING:-0}" != 1 ]; then
DRIVER=$(mktemp /tmp/reproduce_driver.XXXXXX.py)
cat > "$DRIVER" <<'EOF'
"""Build the run list, write it to results/commands.txt, run what is missing, time everything."""
import json, os, shlex, shutil, sys, time
sys.path.insert(0, os.getcwd())  # the repository root (this file is run from a temporary path)

env = os.environ
runs_dir, results_dir = env["RUNS_DIR"], env["RESULTS_DIR"]
tasks = ["SST-2", "MRPC", "RTE", "CoLA", "STS-B"]
subset = {t: env["N_" + t.replace("-", "").upper()] for t in tasks}
ablation = env["ABLATION_TASKS"].split()
seeds = env["SEEDS"].split()
two_stage_baseline = env["BASELINE"] == "deebert2"

def args_for(task, variant, seed):
    out = os.path.join(runs_dir, task, variant, f"seed{seed}")
    argv = ["--model_type", "bert", "--model_name_or_path", "packaged-minilm", "--task_name", task,
            "--data_dir", os.path.join(env["GLUE_DIR"], task), "--output_dir", out, "--overwrite_output_dir",
            "--max_seq_length", env["MAX_SEQ"], "--do_train", "--num_train_epochs", env["EPOCHS"],
            "--per_gpu_train_batch_size", env["BATCH"], "--learning_rate", env["LR"], "--warmup_ratio",
            env["WARMUP"], "--logging_steps", "10", "--save_steps", "0", "--seed", seed,
            "--do_eval", "--per_gpu_eval_batch_size", env["EVAL_BATCH"], "--eval_each_highway",
            "--save_layer_logits", "--exit_pooling", env["EXIT_POOLING"]]
    if subset[task].lower() not in ("all", "0", ""):
        argv += ["--max_train_samples", subset[task]]
    if variant == "deebert2":
        argv += ["--deebert_two_stage"]  # stage 1 = single-exit fine-tuning (final loss), stage 2 = off-ramps
    else:
        argv += ["--exit_loss", variant]
    return out, argv

plan = []
# phase 1 (core): the multi-exit model (PABEE weighting) and the single-exit baseline for every task and seed.
# On the ablation tasks the baseline is DeeBERT two-stage: its stage 1 *is* single-exit fine-tuning and stage 2
# freezes the backbone and the final exit, so its final layer is the single-exit model (and we get DeeBERT's ramps).
for seed in seeds:
    for task in tasks:
        plan.append((task, "weighted", seed))
        plan.append((task, "deebert2" if two_stage_baseline or task in ablation else "final", seed))
# phase 2: the other loss weightings on the ablation tasks
for seed in seeds:
    for task in ablation:
        plan += [(task, "uniform", seed), (task, "learned", seed)]

with open(os.path.join(results_dir, "commands.txt"), "w") as f:
    f.write("# every training + evaluation run of the study, in order (generated by scripts/reproduce.sh)\n")
    f.write("# environment: HF_HUB_OFFLINE=1; each line is one run\n")
    for task, variant, seed in plan:
        f.write("python run_glue_with_exits.py " + shlex.join(args_for(task, variant, seed)[1]) + "\n")

import run_glue_with_exits  # noqa: E402  (the runner itself; main(argv) == the command line)

times_path = os.path.join(runs_dir, "run_times.jsonl")
for i, (task, variant, seed) in enumerate(plan):
    out, argv = args_for(task, variant, seed)
    logits = os.path.join(out, "layer_logits", "final_dev_logits.npy")
    if os.path.exists(logits):
        print(f"[{i + 1}/{len(plan)}] skip {task} {variant} seed {seed} (logits exist)", flush=True)
        continue
    # several workers (WORKERS) share the plan: a run belongs to whoever creates its lock file first
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lock = out.rstrip("/") + ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(open(lock).read() or 0)
            os.kill(owner, 0)  # the owner is alive: its run
            continue
        except (ValueError, ProcessLookupError):  # a stale lock from an interrupted worker: take it over
            os.remove(lock)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    print(f"[{i + 1}/{len(plan)}] {time.strftime('%H:%M:%S')} run {task} {variant} seed {seed}", flush=True)
    start = time.time()
    code = run_glue_with_exits.cli(argv)
    if code != 0:
        sys.exit(f"run failed ({code}): python run_glue_with_exits.py {shlex.join(argv)}")
    elapsed = time.time() - start
    with open(times_path, "a") as f:
        f.write(json.dumps({"task": task, "variant": variant, "seed": seed, "wall_s": elapsed,
                            "end": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    if env["KEEP_MODELS"] != "1":
        for name in os.listdir(out):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, ".feature_cache"), ignore_errors=True)
    os.remove(lock)
EOF
# WORKERS parallel runs, each nice'd like the caller (the runs are independent; results do not depend on WORKERS).
for worker in $(seq "$WORKERS"); do
  "$PYTHON" "$DRIVER" > "$RUNS_DIR/worker$worker.log" 2>&1 &
  sleep 20
done
wait
rm -f "$DRIVER"
fi
STUDY_END=$(date +%s)
"$PYTHON" - "$STUDY_START" "$STUDY_END" <<'EOF'
import json, os, sys
start, end = int(sys.argv[1]), int(sys.argv[2])
times_path = os.path.join(os.environ["RUNS_DIR"], "run_times.jsonl")
times = [json.loads(line) for line in open(times_path)] if os.path.exists(times_path) else []
import datetime
first_start = min((datetime.datetime.fromisoformat(t["end"]).timestamp() - t["wall_s"] for t in times), default=0)
last_end = max((datetime.datetime.fromisoformat(t["end"]).timestamp() for t in times), default=0)
record = {"study_elapsed_wall_s": last_end - first_start, "this_invocation_training_and_eval_wall_s": end - start,
          "sum_of_run_wall_s": sum(t["wall_s"] for t in times), "num_runs": len(times),
          "machine": f"{os.cpu_count()} CPU cores, {os.environ['WORKERS']} parallel run(s) x "
                     f"{os.environ['OMP_NUM_THREADS']} torch thread(s); 15-min load average at the end "
                     f"{os.getloadavg()[2]:.1f}",
          "settings": {k: os.environ[k] for k in ("SEEDS", "N_SST2", "N_MRPC", "N_RTE", "N_COLA", "N_STSB", "EPOCHS",
                                                   "BATCH", "LR", "WARMUP", "MAX_SEQ", "EVAL_BATCH", "ABLATION_TASKS",
                                                   "BASELINE", "EXIT_POOLING", "WORKERS",
                                                   "OMP_NUM_THREADS")}}
path = os.path.join(os.environ["RESULTS_DIR"], "wall_time.json")
if record["num_runs"] and os.environ.get("SKIP_TRAINING", "0") != "1":
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
EOF

"$PYTHON" scripts/analyze_results.py --runs_dir "$RUNS_DIR" --results_dir "$RESULTS_DIR"
