"""The runner's command line: its flags (the seeds' names kept), the checks that fail fast, and the exit-policy
settings a command line asks for.

The policy flags are not written here: each policy class in :mod:`multiexit.policies` declares its own
(:class:`multiexit.policies.PolicyFlag`), and :func:`add_policy_flags` / :func:`policies_from_args` build the flag group
and the swept settings from those declarations, so a new policy needs no change in this file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import NoReturn

import torch

from multiexit.errors import UserInputError
from multiexit.io import list_checkpoints
from multiexit.modeling import EXIT_HEAD_TYPES, EXIT_POOLINGS, LOSS_WEIGHTINGS
from multiexit.models import MODEL_CLASSES
from multiexit.policies import POLICIES, ExitPolicy, parse_list
from multiexit.replay import DEFAULT_DELTA, POINT_ESTIMATE, RISKS
from multiexit.runner.loading import PACKAGED_MODEL

logger = logging.getLogger("run_glue_with_exits")

ELBERT_WEIGHT_LEARNING_RATE = 1e-2  # ELBERT's w_lr
HELD_OUT_BATCH = "held_out"  # --calibrate_batch_size: the batch is the eval set's second half (sampling "split")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default in its help (where there is one to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if action.option_strings and shown and "%(default)" not in text and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice, a missing --task_name) as the runner's other mistakes
    are: one ``error:`` line and exit status 2, not the 60-line usage before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # allow_abbrev=False: a prefix (--pat) would otherwise be taken silently for a flag it happens to start (--patience)
    parser = _OneLineErrorParser(
        prog="run_glue_with_exits.py", formatter_class=_HelpFormatter, allow_abbrev=False,
        description="Train and evaluate multi-exit BERT / RoBERTa / ALBERT on GLUE and friends, and sweep every exit "
                    "policy (PABEE, DeeBERT, PCEE-BERT, ELBERT, budget, max-prob) by offline replay of one cached "
                    "all-layer pass; --online runs real early exit. Comma lists sweep several settings.")
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
    required.add_argument("--max_seq_length", type=int, default=128, help="tokens per input, after truncation")
    required.add_argument("--do_lower_case", action="store_true", help="accepted for the seeds' scripts; the "
                          "tokenizer's own setting decides")
    required.add_argument("--num_hidden_layers", type=int, default=None,
                          help="keep only the first N layers of the checkpoint (e.g. a 2-layer cut for tests)")
    required.add_argument("--max_train_samples", type=int, default=None)
    required.add_argument("--max_eval_samples", type=int, default=None)
    required.add_argument("--eval_split", default="dev", choices=("dev", "test", "heldout"),
                          help="heldout: a fixed part of the training set (--heldout_fraction), held out of training, "
                               "for choosing hyper-parameters without looking at dev")
    required.add_argument("--heldout_fraction", type=float, default=0.1,
                          help="with --eval_split heldout: the share of the training set held out (a fixed seeded "
                               "choice, the same for every run)")
    required.add_argument("--overwrite_cache", action="store_true", help="tokenise again and rewrite the feature cache")

    train = parser.add_argument_group("training")
    train.add_argument("--do_train", action="store_true")
    train.add_argument("--exit_head_type", default=None, choices=EXIT_HEAD_TYPES,
                       help="default: shared_pooler for BERT/ALBERT (PABEE; linear with --exit_pooling mean), "
                            "classification_head for RoBERTa")
    train.add_argument("--exit_pooling", default=None, choices=EXIT_POOLINGS,
                       help="what each exit reads: cls = the first token (the papers; default), mean = the mean over "
                            "real tokens (for mean-pooled checkpoints such as all-MiniLM-L6-v2, whose [CLS] carries "
                            "no input information below layer 4); a trained checkpoint keeps its own")
    train.add_argument("--exit_loss", default=None, choices=LOSS_WEIGHTINGS,
                       help="weighted = Σ i·L_i/Σ i (PABEE, default), uniform = mean, learned = ELBERT, "
                       "final = last exit only (single-exit fine-tuning)")
    train.add_argument("--regression_exit_bias", default="label_mean", choices=("label_mean", "zero"),
                       help="regression tasks trained from a plain pretrained model: every exit's output bias starts "
                            "at the training labels' mean (default; zero-centred exits flatten jointly trained "
                            "representations on STS-B) or at zero (the seeds' initialisation)")
    train.add_argument("--classification_exit_bias", default="zero", choices=("zero", "log_prior"),
                       help="classification tasks trained from a plain pretrained model: every exit's output bias "
                            "starts at zero (default, the seeds') or at the log class frequencies of the training set "
                            "(log_prior: every exit starts at the prior; on CoLA it sped up the shared-pooler head)")
    train.add_argument("--exit_weight_learning_rate", type=float, default=ELBERT_WEIGHT_LEARNING_RATE,
                       help="--exit_loss learned: constant learning rate of ELBERT's loss weights (its w_lr), in their "
                            "own optimizer group without weight decay or schedule")
    train.add_argument("--deebert_two_stage", "--train_highway", dest="deebert_two_stage", action="store_true",
                       help="DeeBERT: stage 1 trains backbone + final exit, stage 2 the off-ramps, backbone frozen")
    train.add_argument("--stage2_learning_rate", type=float, default=None, help="stage-2 LR (default: same)")
    train.add_argument("--per_gpu_train_batch_size", "--per_device_train_batch_size", type=int, default=8,
                       help="training batch size per process")
    train.add_argument("--group_by_length", action="store_true",
                       help="batches of examples of similar length (less padding, faster on CPU), in a seeded order")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimisation step")
    train.add_argument("--learning_rate", type=float, default=2e-5,
                       help="peak AdamW learning rate (the seeds' runners took 5e-5 when not given one)")
    train.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases, norms)")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 = none)")
    train.add_argument("--num_train_epochs", type=float, default=3.0, help="epochs (per DeeBERT stage)")
    train.add_argument("--max_steps", type=int, default=-1, help="if > 0, overrides --num_train_epochs")
    train.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps; wins over --warmup_ratio")
    train.add_argument("--warmup_ratio", type=float, default=0.0, help="linear warm-up as a share of the steps")
    train.add_argument("--logging_steps", type=int, default=50, help="log the mean loss every N steps (0 = never)")
    train.add_argument("--save_steps", type=int, default=0, help="save a checkpoint every N steps (0 = never)")
    train.add_argument("--save_total_limit", type=int, default=None,
                       help="keep only the newest N checkpoint-* folders (default: all)")
    train.add_argument("--evaluate_during_training", action="store_true", help="per-layer dev scores at each log")
    train.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint-N folder, or 'latest' for the newest one in --output_dir")
    train.add_argument("--overwrite_output_dir", action="store_true")
    train.add_argument("--seed", type=int, default=42, help="seed of initialisation, dropout and data order")
    train.add_argument("--fp16", action="store_true", help="CUDA only")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--fp16_opt_level", default="O1", help="accepted for the seeds' scripts; native AMP is used")
    train.add_argument("--no_cuda", action="store_true")
    train.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate handles it")

    hub = parser.add_argument_group("Hugging Face hub")
    hub.add_argument("--push_to_hub", action="store_true",
                     help="upload the model in --output_dir with its model card (README.md) at the end; the token is "
                          "huggingface_hub's (hf auth login, or HF_TOKEN)")
    hub.add_argument("--hub_model_id", default=None,
                     help="the hub repository to push to (namespace/name; default: --output_dir's folder name)")

    evaluation = parser.add_argument_group("evaluation and exit policies (comma lists sweep several settings)")
    evaluation.add_argument("--do_eval", action="store_true")
    evaluation.add_argument("--per_gpu_eval_batch_size", "--per_device_eval_batch_size", type=int, default=32,
                            help="evaluation batch size; 1 with --online is the seeds' batch-size-1 early exit")
    evaluation.add_argument("--eval_all_checkpoints", action="store_true", help="evaluate every checkpoint-N too")
    evaluation.add_argument("--sweep_default_grids", action="store_true",
                            help="also replay a default grid of every policy (for the score-vs-speed-up plot)")
    evaluation.add_argument("--eval_each_highway", action="store_true", help="DeeBERT: score every layer alone")
    evaluation.add_argument("--eval_highway", action="store_true", help="accepted for DeeBERT's scripts")
    evaluation.add_argument("--eval_after_first_stage", action="store_true",  # DeeBERT's: implies two stages
                            help="DeeBERT two-stage: also evaluate the stage-1 model")
    evaluation.add_argument("--plot_data_dir", default=None,
                            help="DeeBERT's results folder: each_layer.npy and entropy_<t>.npy as DeeBERT wrote them "
                                 "(with --do_train it selects DeeBERT's two-stage training, as DeeBERT's command "
                                 "did); the score-vs-speed-up plot goes there too (default: --output_dir)")
    evaluation.add_argument("--online", action="store_true",
                            help="also run real early exit for the listed settings (batch size 1 = 'online', "
                            "larger = 'batched') and record wall-clock time")
    evaluation.add_argument("--verify_online", action="store_true",
                            help="run real early exit and fail unless it matches the replay example by example")
    evaluation.add_argument("--cuda_graphs", action="store_true",
                            help="real early exit at batch size 1 on a GPU: replay each layer and its exit from a "
                                 "CUDA graph (captured per sequence-length bucket)")
    evaluation.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                            help="what runs the evaluated model: torch, or ONNX Runtime (the checkpoint is exported "
                                 "to <output_dir>/onnx/<checkpoint>, or an export of the same weights there reused; "
                                 "needs pip install .[onnx]; see docs/deploying.md)")
    evaluation.add_argument("--ort_threads", type=int, default=None,
                            help="--runtime onnxruntime: intra-op threads per session (default: torch's thread count, "
                                 "so that both runtimes are timed alike)")
    evaluation.add_argument("--onnx_int8", action="store_true",
                            help="--runtime onnxruntime: evaluate the int8 export (dynamic quantisation of the "
                                 "layers; exported to <output_dir>/onnx/<checkpoint>-int8)")
    evaluation.add_argument("--timing_repeats", type=int, default=3, help="timed passes per setting (median)")
    evaluation.add_argument("--timing_warmup", type=int, default=3, help="untimed warm-up batches")
    evaluation.add_argument("--calibrate_speedup", default=None,
                            help="target speed-ups (L/avg exit), list: pick each policy's setting on a held-out "
                            "half of the eval set and report it on the other half")
    evaluation.add_argument("--calibrate_max_drop", default=None,
                            help="certified calibration (docs/calibration.md), list of ε (e.g. 0.01): each policy's "
                            "fastest setting whose risk (--calibrate_risk) on new examples is at most ε with "
                            "probability >= 1 - δ (--calibrate_delta), chosen on the first half of the eval set and "
                            "reported on the other half")
    evaluation.add_argument("--calibrate_delta", type=float, default=DEFAULT_DELTA,
                            help="δ: the probability that a --calibrate_max_drop certificate fails (default 0.1)")
    evaluation.add_argument("--calibrate_risk", default="disagreement", choices=(*RISKS, POINT_ESTIMATE),
                            help="what --calibrate_max_drop bounds: disagreement (default: the fraction of answers "
                            "that differ from full depth; needs no labels, bounds the accuracy drop, any task), metric "
                            "(the accuracy drop; accuracy tasks), or empirical (the uncertified point estimate: the "
                            "drop of the main metric on the first half only, no guarantee)")
    evaluation.add_argument("--calibrate_tolerance", type=float, default=None,
                            help="regression tasks: answers 'disagree' with full depth when they differ by more than "
                            "this (needed by --calibrate_risk disagreement)")
    evaluation.add_argument("--calibrate_batch_size", default=None,
                            help="a batch certificate for --calibrate_max_drop (docs/calibration.md): with probability "
                            ">= 1 - δ the mean loss over a batch of this many new i.i.d. examples is at most ε; "
                            f"'{HELD_OUT_BATCH}': over the second half of the eval set, the batch each record is "
                            "scored on (the halves of a shuffled file)")
    evaluation.add_argument("--save_layer_logits", action="store_true", help="write the [N, L, C] cache as .npy")
    add_policy_flags(parser)
    return parser.parse_args(argv)


def apply_seed_conventions(args: argparse.Namespace) -> None:
    """The seeds' command lines mean what they meant: DeeBERT's training command (``--eval_after_first_stage``,
    ``--plot_data_dir``, ...; run_highway_glue.py always trained its two stages) trains DeeBERT's two stages, with
    DeeBERT's off-ramps (a pooler per layer) unless another exit head is named."""
    deebert_flags = [flag for flag, given in (("--eval_after_first_stage", args.eval_after_first_stage),
                                              ("--plot_data_dir", args.plot_data_dir is not None)) if given]
    if args.do_train and deebert_flags and not args.deebert_two_stage:
        logger.info("DeeBERT's training flags (%s): training DeeBERT's two stages", ", ".join(deebert_flags))
        args.deebert_two_stage = True
    if args.deebert_two_stage and args.exit_head_type is None:
        args.exit_head_type = "pooler"


def warn_unused_flags(args: argparse.Namespace) -> None:
    """Flags that this command line gives but that do nothing in it: legal, but said (after apply_seed_conventions,
    which decides DeeBERT's two stages)."""
    if not args.do_train:  # every flag below is a training flag
        return
    unused = []
    if args.deebert_two_stage and args.exit_loss is not None:
        unused.append(f"--exit_loss {args.exit_loss} (DeeBERT's stages train the final exit, then the sum of the "
                      "off-ramps' losses)")
    if args.stage2_learning_rate is not None and not args.deebert_two_stage:
        unused.append("--stage2_learning_rate (only DeeBERT's two stages have a stage 2)")
    if args.exit_weight_learning_rate != ELBERT_WEIGHT_LEARNING_RATE and args.exit_loss != "learned":
        unused.append("--exit_weight_learning_rate (for --exit_loss learned)")
    if args.warmup_steps > 0 and args.warmup_ratio > 0:
        unused.append("--warmup_ratio (--warmup_steps is given and wins, as in transformers)")
    for flag in unused:
        logger.warning("ignored: %s", flag)


def check_args(args: argparse.Namespace) -> None:
    """Everything we can check before loading anything, so mistakes fail in a second with one clear line."""
    if args.model_type not in MODEL_CLASSES:
        raise UserInputError(f"unknown --model_type {args.model_type!r}; choose from {', '.join(MODEL_CLASSES)}")
    if not (args.do_train or args.do_eval):
        raise UserInputError("nothing to do: pass --do_train and/or --do_eval")
    if args.fp16 and args.bf16:
        raise UserInputError("choose one of --fp16 and --bf16")
    if args.cuda_graphs and (args.no_cuda or not torch.cuda.is_available()):
        raise UserInputError("--cuda_graphs needs a CUDA GPU (none is available); drop it")
    if args.fp16 and (args.no_cuda or not torch.cuda.is_available()):
        raise UserInputError("--fp16 needs a CUDA GPU (none is available); drop it, or use --bf16 on CPU")
    for name in ("max_seq_length", "per_gpu_train_batch_size", "per_gpu_eval_batch_size",
                 "gradient_accumulation_steps", "timing_repeats"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_samples", "max_eval_samples"):  # a negative one would slice from the end
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1 (leave it out for the whole split), got {getattr(args, name)}")
    for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "warmup_ratio", "num_train_epochs",
                 "exit_weight_learning_rate"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UserInputError(f"--{name} must be a finite number >= 0, got {value}")
    if args.warmup_ratio > 1:
        raise UserInputError(f"--warmup_ratio must be in [0, 1], got {args.warmup_ratio}")
    if not 0 < args.heldout_fraction < 1:
        raise UserInputError(f"--heldout_fraction must be in (0, 1), got {args.heldout_fraction}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise UserInputError(f"--save_total_limit must be >= 1, got {args.save_total_limit}")
    if args.timing_warmup < 0:
        raise UserInputError(f"--timing_warmup must be >= 0, got {args.timing_warmup}")
    for value in parse_list("--calibrate_speedup", args.calibrate_speedup, float):
        if not (math.isfinite(value) and value >= 1):
            raise UserInputError(f"--calibrate_speedup: a target speed-up (L / mean exit layer) is >= 1, got {value}")
    for value in parse_list("--calibrate_max_drop", args.calibrate_max_drop, float):
        if not 0 <= value <= 1:
            raise UserInputError(f"--calibrate_max_drop: a drop of the main metric is in [0, 1], got {value}")
    if not 0 < args.calibrate_delta < 1:
        raise UserInputError(f"--calibrate_delta: the probability that a certificate fails is in (0, 1), got "
                             f"{args.calibrate_delta}")
    if args.calibrate_batch_size is not None:
        if args.calibrate_batch_size != HELD_OUT_BATCH and not (args.calibrate_batch_size.isdigit()
                                                                 and int(args.calibrate_batch_size) >= 1):
            raise UserInputError(f"--calibrate_batch_size: a number of examples >= 1 or '{HELD_OUT_BATCH}', got "
                                 f"{args.calibrate_batch_size!r}")
        if not args.calibrate_max_drop or args.calibrate_risk == POINT_ESTIMATE:
            raise UserInputError(f"--calibrate_batch_size asks for a batch certificate: it needs --calibrate_max_drop "
                                 f"and a certified --calibrate_risk ({', '.join(RISKS)})")
    during_training = [flag for flag, given in (("--evaluate_during_training", args.evaluate_during_training),
                                                ("--eval_after_first_stage", args.eval_after_first_stage)) if given]
    if args.do_train and args.eval_split == "test" and during_training:
        raise UserInputError(f"{' and '.join(during_training)} score the eval split while training, but the test "
                             f"split has no labels: use --eval_split dev or heldout")
    if args.stage2_learning_rate is not None and not (math.isfinite(args.stage2_learning_rate)
                                                      and args.stage2_learning_rate >= 0):
        raise UserInputError(f"--stage2_learning_rate must be a finite number >= 0, got {args.stage2_learning_rate}")
    if args.runtime == "onnxruntime":
        check_onnxruntime_args(args)
    elif args.ort_threads is not None or args.onnx_int8:
        flag = "--ort_threads" if args.ort_threads is not None else "--onnx_int8"
        raise UserInputError(f"{flag} is for ONNX Runtime: add --runtime onnxruntime, or drop it")
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




def check_onnxruntime_args(args: argparse.Namespace) -> None:
    """``--runtime onnxruntime`` evaluates (the export is fp32 and has no CUDA graphs), with the extra installed."""
    from multiexit.onnx import require

    refused = [flag for flag, given in (("--do_train", args.do_train), ("--cuda_graphs", args.cuda_graphs),
                                        ("--fp16", args.fp16), ("--bf16", args.bf16)) if given]
    if refused:
        raise UserInputError(f"--runtime onnxruntime evaluates an fp32 export with ONNX Runtime; it cannot be combined "
                             f"with {', '.join(refused)} (train with --runtime torch, then evaluate)")
    if args.ort_threads is not None and args.ort_threads < 1:
        raise UserInputError(f"--ort_threads must be >= 1, got {args.ort_threads}")
    require("onnxruntime")
    require("onnx")


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """One flag group per exit policy, from the flags the policy class declares."""
    for cls in POLICIES.values():
        group = parser.add_argument_group(f"exit policy {cls.name}: {cls.title}")
        for flag in cls.flags:
            if flag.type is bool:
                group.add_argument(flag.flag, action="store_true", help=flag.help)
            elif flag.sweep:
                group.add_argument(flag.flag, default=flag.default, help=flag.help)
            else:
                group.add_argument(flag.flag, nargs="?", const=flag.const, default=flag.default, choices=flag.choices,
                                   help=flag.help)


def policies_from_args(args: argparse.Namespace) -> list[ExitPolicy]:
    """The explicitly requested settings: each comma list sweeps its policy (several lists: their product).

    Raises UserInputError when a policy's flags are given but set none of its settings (``--regression_threshold``
    without ``--patience``), and when ``--online``/``--verify_online`` have no setting to run."""
    policies: list[ExitPolicy] = []
    for cls in POLICIES.values():
        raw = {flag.flag: getattr(args, flag.flag.lstrip("-")) for flag in cls.flags}
        values = {flag.field: flag.parse(raw[flag.flag]) for flag in cls.flags}
        settings = cls.from_flag_values(values)
        given = [flag.flag for flag in cls.flags if raw[flag.flag] not in (None, False, flag.default)]
        if given and not settings:
            raise UserInputError(f"{', '.join(given)} set no {cls.name} setting without {cls.flags[0].flag}")
        policies += settings
    if (args.online or args.verify_online) and not policies:
        raise UserInputError("--online / --verify_online run real early exit for the settings asked for "
                             "(--patience, --early_exit_entropy, ...), and none is given")
    return policies
