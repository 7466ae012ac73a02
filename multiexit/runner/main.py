"""Train and evaluate multi-exit BERT / RoBERTa / ALBERT on GLUE and friends, and sweep every exit policy.

A linear script in the manner of HF's ``run_glue_no_trainer.py``: arguments → checks → data → model → training →
evaluation → report. Evaluation caches every layer's logits in one pass and scores each (checkpoint × policy ×
setting) by offline replay; real early exit (``online`` at batch size 1, ``batched`` above) runs on request and can
be verified against the replay example by example. Results are appended to ``<output_dir>/exit_results.jsonl``.

The seeds' command lines (PABEE's ``--patience 3,4,5``, DeeBERT's ``--early_exit_entropy``, ``--eval_each_highway``,
``--eval_all_checkpoints``, ...) work unchanged apart from paths; see the README. The parts live beside it:
:mod:`.args` (flags and checks), :mod:`.loading` (model, tokenizer, data), :mod:`.training` (the loop and exact
resume), :mod:`.evaluation` (replay, online exit, results files). ``run_glue_with_exits.py`` at the top of the
repository is its public face.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from multiexit.data import get_task
from multiexit.errors import (
    EXIT_TERMINATED,
    EXIT_USER_INPUT,
    EXIT_WRITE_FAILED,
    TrainingStopped,
    UserInputError,
    WriteError,
)
from multiexit.io import list_checkpoints, make_folder
from multiexit.policies import parse_list
from multiexit.replay import check_risk_request
from multiexit.runner.args import apply_seed_conventions, check_args, parse_args, policies_from_args, warn_unused_flags
from multiexit.runner.evaluation import RESULTS_FILE, checkpoint_label, evaluate_checkpoint, per_layer_callback
from multiexit.runner.hub import create_hub_repo, finish_model_folder
from multiexit.runner.loading import (
    check_heldout_is_unseen,
    load_config,
    load_features,
    load_model,
    load_onnx_model,
    load_tokenizer,
    model_depth,
    read_split,
    resolve_model_path,
)
from multiexit.runner.training import (
    find_resume_folder,
    initial_exit_bias,
    resumable_training,
    save_final_model,
    train,
)

logger = logging.getLogger("run_glue_with_exits")

__all__ = [
    "main",
    "cli",
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """The whole job. Returns, as HF example scripts do, the evaluation's metrics (metric name -> value: full depth,
    then every requested setting under its label; with several checkpoints each key ends in ``_<step>``, as in the
    seeds). Raises UserInputError on bad input, WriteError when the machine refuses a write, TrainingStopped when
    SIGTERM stopped training; :func:`cli` turns each into one line and an exit status."""
    from accelerate.utils import set_seed

    # arguments and the checks that need nothing loaded
    args = parse_args(argv)
    check_args(args)
    task = get_task(args.task_name)
    for drop in parse_list("--calibrate_max_drop", args.calibrate_max_drop, float):  # what the risk needs of the task
        try:
            check_risk_request(args.calibrate_risk, drop, args.calibrate_delta, task.main_metric, task.num_labels,
                               args.calibrate_tolerance)
        except UserInputError as error:
            raise UserInputError(f"--calibrate_max_drop {drop:g} --calibrate_risk {args.calibrate_risk}: "
                                 f"{error}") from None
    requested = policies_from_args(args)
    accelerator = make_accelerator(args)
    if args.runtime == "onnxruntime" and accelerator.num_processes > 1:
        raise UserInputError("--runtime onnxruntime evaluates in one process: launch it without torchrun / accelerate")
    apply_seed_conventions(args)  # after logging is set up: it says what it implies
    warn_unused_flags(args)
    set_seed(args.seed)
    logger.info("task %s, model %s (%s), %d process(es) on %s", task.name, args.model_name_or_path,
                args.model_type, accelerator.num_processes, accelerator.device)

    # everything else that can fail on the user's input, before anything is written (output_dir included): model
    # folder and config, policies against the model's depth, resume checkpoint, tokenizer, every data file
    path = resolve_model_path(args.model_name_or_path)
    source_config = load_config(args, task, path)
    num_layers = model_depth(args, source_config)
    for policy in requested:
        policy.validate(task.num_labels, num_layers)
    if args.do_train:  # resolved once ("latest" -> the folder, or None: fresh), so training does not look again
        args.resume_from_checkpoint = find_resume_folder(args)
    tokenizer = load_tokenizer(args, path)
    needs_eval_data = args.do_eval or args.evaluate_during_training
    eval_examples = read_split(args, task, args.eval_split, args.max_eval_samples) if needs_eval_data else None
    if not args.do_train:  # (with --do_train: checked after training, on the checkpoints then evaluated)
        check_heldout_is_unseen(args, task, evaluated_checkpoints(args, path))
    labelled = sum(example.label is not None for example in eval_examples or [])
    if args.do_eval and (args.calibrate_speedup or args.calibrate_max_drop) and 0 < labelled < 4:
        raise UserInputError(f"--calibrate_speedup / --calibrate_max_drop choose a setting on one half of the eval "
                             f"set and score it on the other: that needs at least 4 labelled examples, the "
                             f"{args.eval_split} split has {labelled}")
    train_examples = read_split(args, task, "train", args.max_train_samples) if args.do_train else None
    hub_repo = create_hub_repo(args, accelerator.is_main_process)  # last: no empty repository for a local mistake
    make_folder(args.output_dir)

    # data: tokenised once (the main process writes the feature cache, the others then read it)
    with accelerator.main_process_first():
        is_main = accelerator.is_main_process
        eval_features = (load_features(args, task, tokenizer, eval_examples, source_config, is_main) if eval_examples
                         else None)
        train_features = (load_features(args, task, tokenizer, train_examples, source_config, is_main)
                          if train_examples else None)

    # model and training
    if args.do_train:
        model = load_model(args, task, path)
        fresh_exits = getattr(source_config, "exit_head_type", None) is None  # a plain pretrained checkpoint
        if fresh_exits:
            start = initial_exit_bias(args, task, train_features["labels"])
            if start is not None:
                model.set_exit_output_bias(start)
        eval_callback = per_layer_callback(args, accelerator, task, tokenizer, eval_features)
        with resumable_training(args, argv):  # SIGTERM stops at a step boundary; failures say how to resume
            train(args, accelerator, model, tokenizer, train_features, eval_callback)
            save_final_model(args, accelerator, model, tokenizer)

    # evaluation: the trained model (or the one given), and every checkpoint-N with --eval_all_checkpoints
    results: dict[str, float] = {}
    if args.do_eval:
        checkpoints = evaluated_checkpoints(args, path)  # after training: its checkpoints included
        if args.do_train:  # checkpoints an earlier run left in output_dir may have trained on the held-out part
            check_heldout_is_unseen(args, task, checkpoints)
        if not requested and not args.sweep_default_grids:
            logger.info("no exit policy given: reporting full depth%s only (see --patience, --early_exit_entropy, "
                        "--sweep_default_grids ...)", " and each layer" if args.eval_each_highway else "")
        for checkpoint in checkpoints:
            model = load_model(args, task, checkpoint)
            if args.runtime == "onnxruntime":
                export_dir = os.path.join(args.output_dir, "onnx", checkpoint_label(args, checkpoint)
                                          + ("-int8" if args.onnx_int8 else ""))
                model = load_onnx_model(args, model, export_dir, tokenizer, accelerator.device)
            result = evaluate_checkpoint(args, accelerator, task, checkpoint, model, tokenizer, eval_features,
                                         requested)
            step = checkpoint_label(args, checkpoint).removeprefix("checkpoint-")
            results.update({f"{key}_{step}" if len(checkpoints) > 1 else key: value for key, value in result.items()})
        if accelerator.is_main_process:
            logger.info("results appended to %s", os.path.join(args.output_dir, RESULTS_FILE))
    finish_model_folder(args, accelerator.is_main_process, hub_repo)  # the model card, and --push_to_hub
    return results


def evaluated_checkpoints(args: argparse.Namespace, path: str) -> list[str]:
    """What --do_eval evaluates: the model trained here (or the one given), after every checkpoint-N of output_dir
    with --eval_all_checkpoints; each folder once, even when --model_name_or_path is one of those checkpoints."""
    if not args.do_eval:
        return []
    checkpoints = [args.output_dir if args.do_train else path]
    if args.eval_all_checkpoints:
        checkpoints = list_checkpoints(args.output_dir) + checkpoints
    unique = {}
    for checkpoint in checkpoints:
        unique.setdefault(os.path.realpath(checkpoint) if os.path.isdir(checkpoint) else checkpoint, checkpoint)
    return list(unique.values())


def make_accelerator(args):  # noqa: ANN001, ANN201 - an accelerate.Accelerator
    """One process, or every process of a torchrun / accelerate launch, with logging on the main one."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs

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
    return accelerator


def say(line: str) -> None:
    """``line`` on stderr, on a line of its own: a progress bar that an exception left open is closed first (tqdm
    leaves the cursor at the end of its bar)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(line, file=sys.stderr)


def cli(argv: list[str] | None = None) -> int:
    """The command line: runs :func:`main`; a mistake in the input is one line on stderr and exit status 2, a write
    the machine refused (disk full, ...) one line and 74, a training run stopped by SIGTERM one line and 143."""
    try:
        main(argv)
    except UserInputError as error:
        say(f"error: {error}")
        return EXIT_USER_INPUT
    except WriteError as error:
        say(f"error: {error}")
        return EXIT_WRITE_FAILED
    except TrainingStopped as stop:
        if int(os.environ.get("RANK", "0")) == 0:  # every process stops; one says so
            say(f"stopped: {stop}")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        say("interrupted: completed checkpoints and result lines are intact")
        return 130
    finally:
        # a multi-process run leaves its process group before the interpreter shuts down: left to finalisation,
        # gloo's worker threads can abort the process ("terminate called without an active exception", SIGABRT)
        # after all its work is done, and torchrun then reports the run as failed
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
