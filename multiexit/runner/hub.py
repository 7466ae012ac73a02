"""The saved model's card (README.md) and ``--push_to_hub``.

The card is written from what the model's folder holds, so that it describes that model whichever run wrote it:
config.json (backbone, exits, labels), training_args.json (task, base model, hyper-parameters) and the latest
evaluation of the model in exit_results.jsonl (every exit's score with ``--eval_each_highway``, the exit settings
asked for, the calibrated ones). Its YAML header is what HF's Trainer writes (library, pipeline tag, base model,
datasets, metrics and a model-index of the full-depth scores), made with huggingface_hub's ``ModelCardData``.

``--push_to_hub`` follows HF's example scripts: the repository (``--hub_model_id``, or the output folder's name) is
created before anything runs, so that a missing hub, network or token fails in a second, and the model folder is
uploaded at the end, card included. The token is the one huggingface_hub finds (``hf auth login`` or ``HF_TOKEN``):
no flag takes it, as every flag is saved in training_args.json, which is uploaded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch
import transformers

from multiexit.data import TaskSpec, get_task, hub_dataset
from multiexit.errors import UserInputError
from multiexit.io import atomic_write_text, read_jsonl
from multiexit.modeling import REMOTE_CODE_MODULE
from multiexit.policies import POLICIES, ExitPolicy, PatienceExit
from multiexit.runner.evaluation import RESULTS_FILE, format_table
from multiexit.runner.loading import PACKAGED_MODEL

logger = logging.getLogger("run_glue_with_exits")

CARD_FILE = "README.md"
# the card's first body line: a README.md without it was not written here, and is left alone
CARD_MARKER = "<!-- written by run_glue_with_exits.py (multiexit-encoders) from this folder's files -->"
PACKAGED_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what --model_name_or_path packaged-minilm is
BACKBONE_NAMES = {"bert": "BERT", "roberta": "RoBERTa", "albert": "ALBERT"}
STOCK_BASE_MODELS = {"bert": "BertModel", "roberta": "RobertaModel", "albert": "AlbertModel"}
HUB_METRIC_NAMES = {"acc": "accuracy", "f1": "f1", "mcc": "matthews_correlation", "pearson": "pearsonr",
                    "spearmanr": "spearmanr"}  # compute_metrics' names -> the hub's metric ids
HEAD_DESCRIPTIONS = {
    "shared_pooler": "a Linear per layer on the model's pretrained pooler (PABEE)",
    "linear": "a Linear per layer on the layer's token summary, no pooler",
    "pooler": "a pooler (dense + tanh) and a Linear per layer (DeeBERT's off-ramps)",
    "classification_head": "RoBERTa's classification head (dense, tanh, dense) per layer",
    "shared_exit": "one exit (the model's pooler and a Linear) shared by every layer (ELBERT)",
}
POOLING_DESCRIPTIONS = {"cls": "the first token's state ([CLS])", "mean": "the mean of the real tokens' states"}
LOSS_DESCRIPTIONS = {"weighted": "Σ i·L_i / Σ i over the exits (PABEE)", "uniform": "the mean of the exits' losses",
                     "learned": "Σ w_i·L_i with learned weights (ELBERT)", "final": "the last exit's loss only"}
HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "per_gpu_train_batch_size",
                   "gradient_accumulation_steps", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
                   "max_train_samples", "seed", "deebert_two_stage", "stage2_learning_rate", "group_by_length")


# --------------------------------------------------------------------------------------------------------------------
# --push_to_hub
# --------------------------------------------------------------------------------------------------------------------


def pushes_model_folder(args: argparse.Namespace) -> bool:
    """Whether --output_dir holds the model of this run: trained there, or the model evaluated from there."""
    model = args.model_name_or_path
    return args.do_train or (args.do_eval and os.path.isdir(model)
                             and os.path.realpath(model) == os.path.realpath(args.output_dir))


def create_hub_repo(args: argparse.Namespace, is_main_process: bool) -> str | None:
    """With --push_to_hub: the hub repository's id, created now (as HF's example scripts do, before training), or a
    UserInputError when the hub cannot take the model. Without it: None."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import HfApi, is_offline_mode

    if not pushes_model_folder(args):
        raise UserInputError("--push_to_hub uploads the model in --output_dir: train it there (--do_train), or "
                             "evaluate the model that is there (--model_name_or_path the same folder as --output_dir)")
    if is_offline_mode():
        raise UserInputError("--push_to_hub needs the Hugging Face hub, and offline mode is on (HF_HUB_OFFLINE); "
                             "drop --push_to_hub, or run online and upload the folder afterwards "
                             "(hf upload <repo> <output_dir>)")
    repo_name = args.hub_model_id or Path(args.output_dir).resolve().name
    if not is_main_process:
        return repo_name
    try:
        return HfApi().create_repo(repo_name, exist_ok=True).repo_id
    except Exception as error:  # the client's transport errors (httpx2, httpx or requests, by its version) and OSError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"--push_to_hub: could not create the hub repository {repo_name!r} ({reason}); check "
                             f"the network and your token (hf auth login, or HF_TOKEN)") from None


def push_model_folder(args: argparse.Namespace, repo_id: str) -> None:
    """Upload --output_dir's files (the model, its tokenizer, the card, the results files) to ``repo_id``; its folders
    (checkpoints, per-example details, the feature cache) stay here."""
    from huggingface_hub import HfApi

    url = HfApi().upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                                ignore_patterns=["*/*", ".*", "*.lock"])
    logger.info("model pushed to %s", url)


# --------------------------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------------------------


def model_evaluations(folder: str) -> list[list[dict]]:
    """The evaluations of the model saved in ``folder`` itself, oldest first: the records of each run of the runner
    (``final`` in their per-example paths; the default grids left out), from its exit_results.jsonl."""
    path = os.path.join(folder, RESULTS_FILE)
    if not os.path.isfile(path):
        return []
    runs: dict[tuple[str, ...], list[dict]] = {}
    for record in read_jsonl(path):
        # per_example_file: exit_details/<checkpoint>/<run folder>/<mode>/<setting>.tsv (ResultWriter)
        checkpoint_and_run = Path(record["per_example_file"]).parts[1:3]
        if checkpoint_and_run[0] == "final" and not record.get("grid"):
            runs.setdefault(checkpoint_and_run, []).append(record)
    return list(runs.values())


def latest_evaluation(folder: str) -> list[dict]:
    """The records of the latest evaluation of the model saved in ``folder`` (:func:`model_evaluations`)."""
    evaluations = model_evaluations(folder)
    return evaluations[-1] if evaluations else []


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _base_model(training_args: dict) -> str | None:
    """The hub id of the model fine-tuned, where it has one (not a local folder)."""
    name = training_args.get("model_name_or_path")
    if name == PACKAGED_MODEL:
        return PACKAGED_MODEL_HUB_ID
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.isdir(name):
        return None
    return name


def _example_policy(records: list[dict], num_labels: int) -> ExitPolicy:
    """The policy of the card's usage example: the first calibrated setting where the evaluation chose one (a drop
    calibration that certified nothing answers at full depth: not an example of early exit)."""
    calibrated = [record for record in records
                  if "calibration" in record and record["calibration"].get("certified", True)]
    if calibrated:
        return POLICIES[calibrated[0]["policy"]](**calibrated[0]["params"])
    return PatienceExit(patience=2, regression_threshold=0.1 if num_labels == 1 else None)


def _card_metadata(model_name: str, backbone: str, base_model: str | None, task: TaskSpec | None,
                   full_depth: dict | None) -> str:
    """The YAML header, as HF's Trainer writes it: a model-index of the full-depth scores where the data is a hub
    dataset."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = hub_dataset(task) if task else None
    metrics = {HUB_METRIC_NAMES[name]: value for name, value in (full_depth or {}).get("metrics", {}).items()
               if name in HUB_METRIC_NAMES}
    eval_results = [
        EvalResult(task_type="text-classification", task_name="Text Classification", dataset_type=dataset[0],
                   dataset_name=task.name, dataset_config=dataset[1], dataset_split=full_depth["split"],
                   metric_type=metric, metric_value=value, metric_name=f"{metric} (full depth)")
        for metric, value in metrics.items()
    ] if dataset else []
    card_data = ModelCardData(
        model_name=model_name, library_name="transformers", pipeline_tag="text-classification",
        base_model=base_model, datasets=[dataset[0]] if dataset else None, metrics=list(metrics) or None,
        tags=["multiexit-encoders", "early-exit", "multi-exit", backbone], eval_results=eval_results or None)
    return f"---\n{card_data.to_yaml()}\n---"


def model_card(folder: str, model_name: str | None = None) -> str | None:
    """The card of the multi-exit model saved in ``folder`` (None when its config has no exits)."""
    config = _read_json(os.path.join(folder, "config.json"))
    if "exit_head_type" not in config:
        return None
    training_args = _read_json(os.path.join(folder, "training_args.json"))
    records = latest_evaluation(folder)
    model_name = model_name or Path(folder).resolve().name
    backbone = config["model_type"].removeprefix("multiexit_")  # (a checkpoint saved before the prefix: bare)
    architecture = STOCK_BASE_MODELS.get(backbone, "AutoModel")
    num_layers = config["num_hidden_layers"]
    id2label = config.get("id2label") or {}
    task_name = training_args.get("task_name") or config.get("finetuning_task")
    task = get_task(task_name) if task_name else None
    full_depth = next((record for record in records if record["policy"] == "budget" and record["mode"] == "replay"
                       and record["params"].get("layer") == record["num_layers"] and "calibration" not in record),
                      None)
    policy = _example_policy(records, len(id2label) or 2)
    max_length = training_args.get("max_seq_length")
    truncation = f", truncation=True, max_length={max_length}" if max_length else ""
    base_model = _base_model(training_args)
    source = f", fine-tuned from `{base_model or training_args['model_name_or_path']}`" \
        if "model_name_or_path" in training_args else ""
    weighting = config.get("exit_loss_weighting", "weighted")
    training = ("DeeBERT's two stages (backbone and last exit, then the other exits with the backbone frozen)"
                if training_args.get("deebert_two_stage") else f"jointly, on {LOSS_DESCRIPTIONS.get(weighting)}")
    pooling = config.get("exit_pooling", "cls")

    lines = [
        _card_metadata(model_name, backbone, base_model, task, full_depth),
        CARD_MARKER,
        "",
        f"# {model_name}",
        "",
        f"A multi-exit {BACKBONE_NAMES.get(backbone, backbone)} with a classifier after each of its {num_layers} layers"
        f"{source}{f' on {task.name}' if task else ''}. An input can stop at an early layer once an exit policy "
        f"(PABEE's patience, DeeBERT's entropy, PCEE-BERT, ELBERT, ...) is confident of its answer.",
        "",
        "## Use",
        "",
        "```python",
        "import multiexit  # registers the multi-exit classes and the pipeline task (pip install multiexit-encoders)",
        "from transformers import pipeline",
        f"from multiexit.policies import {type(policy).__name__}",
        "",
        f'classifier = pipeline("early-exit-text-classification", model="{model_name}", policy={policy!r})',
        f'classifier("Your text here"{truncation})  # [{{"label": ..., "score": ..., "exit_layer": ...}}]',
        "```",
        "",
        f"`AutoModelForSequenceClassification.from_pretrained(...)` loads it as the multi-exit model once `multiexit` "
        f"is imported, or with `trust_remote_code=True` (the `{REMOTE_CODE_MODULE}.py` beside the weights imports the "
        f"installed package). A stock `{architecture}` loads its backbone.",
        "",
        "## Model",
        "",
        f"- task: {task.name if task else 'unknown'}"
        + (f" ({len(id2label)} labels: {', '.join(str(id2label[key]) for key in sorted(id2label, key=int))})"
           if id2label else ""),
        f"- backbone: {backbone}, {num_layers} layers, hidden size {config.get('hidden_size')}",
        f"- exits: {HEAD_DESCRIPTIONS.get(config['exit_head_type'])}, reading {POOLING_DESCRIPTIONS.get(pooling)}",
        f"- trained {training}",
    ]
    if max_length:
        lines.append(f"- inputs: at most {max_length} tokens (longer ones truncated), in training and evaluation")
    if training_args:
        lines += ["", "## Training hyperparameters", ""]
        lines += [f"- {name}: {training_args[name]}" for name in HYPERPARAMETERS  # those given a value
                  if training_args.get(name) not in (None, False, 0, -1)]
    lines += ["", "## Evaluation", ""]
    if records:
        calibrated = any("calibration" in record for record in records)
        lines += [f"The latest evaluation, on the {records[0]['split']} split. Every exit alone is `budget` "
                  f"(layer=k; all of them with `--eval_each_highway`); speed-up is L / the mean exit layer"
                  + ("; a calibrated setting was chosen on the first half of the split and is scored on the second."
                     if calibrated else "."),
                  "", format_table(records, records[0]["main_metric"])]
    else:
        lines.append("Not evaluated yet: `run_glue_with_exits.py --do_eval --model_name_or_path <this folder> "
                     "--output_dir <this folder> --eval_each_highway` writes every exit's score here.")
    lines += ["", "## Framework versions", "",
              f"- multiexit-encoders {_version('multiexit-encoders')}",
              f"- Transformers {transformers.__version__}",
              f"- PyTorch {torch.__version__}", ""]
    return "\n".join(lines)


def write_model_card(folder: str, model_name: str | None = None) -> None:
    """Write (or rewrite) ``folder``/README.md, the card of the multi-exit model saved there; a README.md this
    runner did not write is left as it is."""
    path = os.path.join(folder, CARD_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as stream:
            if CARD_MARKER not in stream.read():
                logger.warning("%s was not written by this runner: the model card is not written over it", path)
                return
    text = model_card(folder, model_name)
    if text is not None:
        atomic_write_text(path, text)
        logger.info("model card written to %s", path)


def finish_model_folder(args: argparse.Namespace, is_main_process: bool, repo_id: str | None) -> None:
    """After training and evaluation: the model card of the model in --output_dir (when it is this run's: trained
    there or evaluated from there), then --push_to_hub's upload."""
    if not is_main_process or not pushes_model_folder(args):
        return
    write_model_card(args.output_dir, repo_id or args.hub_model_id)
    if repo_id is not None:
        push_model_folder(args, repo_id)
