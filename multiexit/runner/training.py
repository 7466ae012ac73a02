"""The training loop: one joint stage, or DeeBERT's two, resumable exactly from any checkpoint-N.

:func:`train` reads top to bottom: for each stage, build the optimizer, restore the interrupted position if the run
is a resumption (:func:`restore_position`), then run the stage's steps (:func:`run_stage`). Everything that makes a
resumption exact (the data order per epoch, the batches already seen, every RNG state, optimizer and scheduler) is
saved in each ``checkpoint-N`` by :func:`save_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multiexit.data import TaskSpec, make_collator
from multiexit.errors import TrainingStopped, UserInputError, WriteError
from multiexit.io import (
    TRAINING_STATE_NAME,
    append_jsonl,
    atomic_directory,
    atomic_write_text,
    directory_damage,
    list_checkpoints,
    load_training_state,
    save_training_state,
    set_rng_state,
    staged_files,
    writing,
)
from multiexit.runner.loading import check_weights_file, model_inputs, training_set

logger = logging.getLogger("run_glue_with_exits")


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
    """Weights (safetensors), tokenizer, arguments and the exact training state, written atomically (a failed write
    raises WriteError naming the file, with nothing left behind)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(folder) as temporary:
            with writing(os.path.join(folder, "model.safetensors")):  # and config.json
                accelerator.unwrap_model(model).save_pretrained(temporary, safe_serialization=True)
            with writing(os.path.join(folder, "tokenizer.json")):  # and the tokenizer's other files
                tokenizer.save_pretrained(temporary)
            with (writing(os.path.join(folder, "training_args.json")),
                  open(os.path.join(temporary, "training_args.json"), "w") as stream):
                json.dump(vars(args), stream, indent=2, sort_keys=True)
            if optimizer is not None:
                with writing(os.path.join(folder, TRAINING_STATE_NAME)):
                    save_training_state(temporary, optimizer, scheduler, progress)
            # inside the temporary folder: a checkpoint-N that exists is complete, resume state included
            with (writing(os.path.join(folder, "trainer_state.json")),
                  open(os.path.join(temporary, "trainer_state.json"), "w") as stream):
                json.dump(progress, stream)
        if args.save_total_limit:  # the oldest go, once the new one is complete (so one always remains)
            for old in list_checkpoints(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


RESUME_FILES = ("trainer_state.json", TRAINING_STATE_NAME, "model.safetensors")


def checkpoint_damage(folder: str) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is whole: every file the checkpoint writer wrote is
    there with the size it had (its manifest), the weights' header and the training state's archive open and
    trainer_state.json parses. Reads only headers, so checking every checkpoint of a run takes no time."""
    missing = [name for name in RESUME_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        return f"it has no {', '.join(missing)}"
    damage = directory_damage(folder)
    if damage is not None:
        return damage
    try:
        check_weights_file(folder)
    except UserInputError:
        return "model.safetensors is unreadable"
    try:
        with zipfile.ZipFile(os.path.join(folder, TRAINING_STATE_NAME)):  # torch.save writes a zip archive
            pass
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as stream:
            json.load(stream)["global_step"]
    except zipfile.BadZipFile:
        return f"{TRAINING_STATE_NAME} is unreadable"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    return None


def find_resume_folder(args: argparse.Namespace) -> str | None:
    """The checkpoint --resume_from_checkpoint names (None: start fresh), with clear errors; reads nothing big.
    ``latest`` is the newest whole checkpoint: one that is incomplete or damaged is skipped with a warning."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        for folder in reversed(list_checkpoints(args.output_dir)):
            damage = checkpoint_damage(folder)
            if damage is None:
                return check_same_training_set(args, folder)
            logger.warning("skipping %s: not a whole training checkpoint (%s); trying the one before it",
                           folder, damage)
        logger.warning("--resume_from_checkpoint latest: no whole checkpoint in %s, starting fresh", args.output_dir)
        return None
    folder = args.resume_from_checkpoint
    if not os.path.isdir(folder):
        raise UserInputError(f"--resume_from_checkpoint {folder}: no such folder")
    if not all(os.path.isfile(os.path.join(folder, name)) for name in RESUME_FILES):
        raise UserInputError(
            f"--resume_from_checkpoint {folder}: not a training checkpoint (needs trainer_state.json, "
            f"training_state.pt and model.safetensors, as in the checkpoint-N folders written with --save_steps)"
        )
    folder = check_same_training_set(args, folder)
    damage = checkpoint_damage(folder)
    if damage is not None:
        raise UserInputError(f"--resume_from_checkpoint {folder}: the checkpoint is damaged ({damage}); copy it "
                             f"again, or resume from another one (--resume_from_checkpoint latest takes the newest "
                             f"whole one)")
    return folder


def check_same_training_set(args: argparse.Namespace, folder: str) -> str:
    """A resumed run trains on the examples the interrupted one trained on: switching --eval_split heldout (or its
    fraction) on or off would mix in, or hold out, examples the weights have already seen."""
    try:
        with open(os.path.join(folder, "training_args.json"), encoding="utf-8") as stream:
            saved = json.load(stream)
    except (OSError, ValueError):
        return folder
    if "eval_split" in saved and training_set(saved) != training_set(vars(args)):
        raise UserInputError(f"{folder} was trained on {training_set(saved)}; resuming it on "
                             f"{training_set(vars(args))} would mix the two: resume with the same --eval_split and "
                             f"--heldout_fraction")
    return folder


def initial_exit_bias(args: argparse.Namespace, task: TaskSpec, labels: Sequence[float]) -> float | list[float] | None:
    """Where fresh exits' output biases start (None: leave them at zero, the seeds' start): the training labels' mean
    for regression (``--regression_exit_bias label_mean``, the default), the log class frequencies for
    classification with ``--classification_exit_bias log_prior``: the best constant prediction under each loss."""
    if task.is_regression:
        return float(np.mean(labels)) if args.regression_exit_bias == "label_mean" else None
    if args.classification_exit_bias != "log_prior":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=task.num_labels).astype(np.float64)
    # a class absent from the training set gets the weight of one example, not log 0
    return np.log(np.maximum(counts, 1.0) / max(counts.sum(), 1.0)).tolist()


# flags that decide the data order and the optimisation: resuming with other values still runs, but is no longer
# the continuation of the interrupted run
RESUME_SENSITIVE_FLAGS = ("task_name", "data_dir", "max_train_samples", "max_seq_length", "num_hidden_layers", "seed",
                          "per_gpu_train_batch_size", "gradient_accumulation_steps", "deebert_two_stage", "exit_loss",
                          "exit_head_type", "exit_pooling", "learning_rate", "stage2_learning_rate", "weight_decay",
                          "exit_weight_learning_rate", "group_by_length", "regression_exit_bias",
                          "classification_exit_bias")


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


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """The training examples in a seeded random order in which every batch holds examples of similar length, so that
    dynamic padding pads little (``--group_by_length``, as HF's Trainer): each epoch shuffles the data, cuts it into
    mega-batches of 50 batches, sorts each by length, splits it into batches and shuffles the batches (the one short
    batch, if any, comes last, so the loader's batches stay aligned with these). The order depends only on the seed
    and the epoch, so a resumed run replays it."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, batches_per_group: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0
        self.group = batch_size * batches_per_group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):  # noqa: ANN204 - an iterator of indices
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.group):
            group = sorted(order[start: start + self.group], key=lambda index: -self.lengths[index])
            batches += [group[i: i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        short = [batch for batch in batches if len(batch) < self.batch_size]
        full = [batch for batch in batches if len(batch) == self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter([index for batch in shuffled + short for index in batch])


@dataclass
class StagePosition:
    """Where a stage starts: at its beginning, or where an interrupted run saved its last checkpoint."""

    global_step: int
    stage_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0  # batches of ``first_epoch`` the interrupted run had already trained on
    pending_rng: dict | None = None  # RNG state to restore where the interrupted run saved it (see run_stage)


def train(args, accelerator, model, tokenizer, train_features, eval_callback) -> None:  # noqa: ANN001
    """The training loop: every plan (one, or DeeBERT's two stages) in turn, resumable at any saved step."""
    if args.group_by_length:
        sampler = LengthGroupedSampler(train_features["length"], args.per_gpu_train_batch_size, args.seed)
        train_loader = DataLoader(train_features, batch_size=args.per_gpu_train_batch_size, sampler=sampler,
                                  collate_fn=make_collator(tokenizer))
    else:
        train_loader = DataLoader(train_features, batch_size=args.per_gpu_train_batch_size, shuffle=True,
                                  collate_fn=make_collator(tokenizer))
    # each process sees every num_processes-th batch (accelerate pads the last round so all see as many)
    batches_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_steps > 0:
        steps_per_stage = args.max_steps
    else:
        steps_per_stage = max(1, int(math.ceil(args.num_train_epochs * steps_per_epoch)))

    resume_folder = find_resume_folder(args)
    saved = None
    if resume_folder is not None:
        warn_if_resume_differs(args, accelerator, resume_folder)
        with open(os.path.join(resume_folder, "trainer_state.json"), encoding="utf-8") as stream:
            saved = json.load(stream)
    global_step = 0
    for stage_index, plan in enumerate(training_plans(args)):
        if saved is not None and saved["stage_index"] > stage_index:  # finished before the interruption
            global_step = saved["global_step"]
            continue
        unwrap(accelerator, model).set_training_stage(plan.stage)
        optimizer, scheduler = make_optimizer(args, accelerator, model, plan, steps_per_stage)
        prepared_model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
        position = StagePosition(global_step)
        if saved is not None and saved["stage_index"] == stage_index:
            position = restore_position(args, accelerator, prepared_model, optimizer, scheduler, resume_folder,
                                        steps_per_epoch)
            logger.info("resumed from %s at step %d (stage %s)", resume_folder, position.global_step, plan.stage)
        saved = None
        logger.info("***** training: stage %s, %d examples, %d optimisation steps *****",
                    plan.stage, len(train_features), steps_per_stage)
        global_step = run_stage(args, accelerator, stage_index, plan, prepared_model, optimizer, scheduler, loader,
                                tokenizer, position, steps_per_stage, eval_callback)
        if plan.stage == "deebert_stage1" and args.eval_after_first_stage:
            scores = eval_callback(accelerator.unwrap_model(prepared_model))
            logger.info("after stage 1, per-layer dev scores: %s", scores)
        model = accelerator.unwrap_model(prepared_model)
        accelerator.free_memory()
    unwrap(accelerator, model).set_training_stage("joint")
    unwrap(accelerator, model).eval()


def save_final_model(args, accelerator, model, tokenizer) -> None:  # noqa: ANN001
    """The seeds' layout: the final model sits in output_dir itself (for --do_eval and --eval_all_checkpoints),
    written into a temporary folder first and renamed file by file, so a kill leaves no half-written file."""
    if accelerator.is_main_process:
        with staged_files(args.output_dir) as staging:
            with writing(os.path.join(args.output_dir, "model.safetensors")):  # and config.json
                model.save_pretrained(staging, safe_serialization=True)
            with writing(os.path.join(args.output_dir, "tokenizer.json")):  # and the tokenizer's other files
                tokenizer.save_pretrained(staging)
        atomic_write_text(os.path.join(args.output_dir, "training_args.json"),
                          json.dumps(vars(args), indent=2, sort_keys=True))
    accelerator.wait_for_everyone()


# set by the SIGTERM handler while training runs; read at each optimisation-step boundary
_stop_signal = threading.Event()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM (what ``kill`` and job schedulers send before SIGKILL) asks training to stop at the next
    optimisation-step boundary and save a checkpoint there (:func:`run_stage`), instead of ending the process at once.
    Outside, SIGTERM keeps its default, immediate effect (nothing is half-written either way: every writer is atomic).
    A SIGTERM that arrives after the last step was checked is delivered again on leaving, with the default effect.
    SIGINT is untouched (KeyboardInterrupt). Only the main thread can own a signal handler; elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop_signal.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _stop_signal.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if _stop_signal.is_set():  # (not after an exception: the stop was handled, or another error is on its way)
        _stop_signal.clear()
        signal.raise_signal(signal.SIGTERM)


def stop_requested(accelerator) -> bool:  # noqa: ANN001
    """Whether a process received SIGTERM. Every process takes the same decision at the same step (a scheduler may
    signal one process only, or each at a slightly different moment): one that stopped alone would leave the others
    waiting in their next gradient all-reduce."""
    requested = _stop_signal.is_set()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(torch.tensor([int(requested)], device=accelerator.device), "sum")
        requested = bool(flags.item() > 0)
    return requested


def resume_command(argv: Sequence[str] | None) -> str:
    """The command that resumes this run: its own command line with ``--resume_from_checkpoint latest`` (in place of
    any --resume_from_checkpoint it had), launched as it was (python, or torchrun with as many processes)."""
    arguments, kept = list(sys.argv[1:] if argv is None else argv), []
    skip_value = False
    for argument in map(str, arguments):
        if skip_value or argument.startswith("--resume_from_checkpoint="):
            skip_value = False
            continue
        skip_value = argument == "--resume_from_checkpoint"
        if not skip_value:
            kept.append(argument)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["python"] if processes == 1 else ["torchrun", "--nproc_per_node", str(processes)]
    script = sys.argv[0] if argv is None else "run_glue_with_exits.py"
    return shlex.join([*launcher, script, *kept, "--resume_from_checkpoint", "latest"])


@contextlib.contextmanager
def resumable_training(args: argparse.Namespace, argv: Sequence[str] | None) -> Iterator[None]:
    """Around training and the final save: SIGTERM stops at a step boundary (:func:`stop_on_sigterm`); a stop, or a
    write the machine refused (WriteError), leaves saying what is intact and the command that resumes the run."""
    try:
        with stop_on_sigterm():
            yield
    except TrainingStopped as stop:
        stop.resume = f"resume with: {resume_command(argv)}"
        raise
    except WriteError as error:
        whole = [folder for folder in list_checkpoints(args.output_dir) if checkpoint_damage(folder) is None]
        if whole:
            error.intact = (f"nothing was half-written and the earlier checkpoints are untouched; the last whole one "
                            f"is {whole[-1]}: fix the cause (or copy {args.output_dir} to another disk) and resume "
                            f"from it with: {resume_command(argv)}")
        else:
            error.intact = ("nothing was half-written; no checkpoint was saved before this (--save_steps): fix the "
                            "cause and run the command again")
        raise


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:  # noqa: ANN001
    return accelerator.unwrap_model(model) if hasattr(model, "module") else model


def make_optimizer(args, accelerator, model, plan: TrainingPlan, steps_per_stage: int) -> tuple:  # noqa: ANN001
    """AdamW over the parameters this stage trains and its schedule.

    * The model: no weight decay on biases and LayerNorm, linear decay after warm-up.
    * ELBERT's learned loss weights (``--exit_loss learned``), as ELBERT's run_glue.py does
      (``optimizer.add_param_group({'params': model.W, 'lr': model.w_lr})``, added after the scheduler was built):
      their own group at a constant ``--exit_weight_learning_rate`` (ELBERT's ``w_lr``, 1e-2), no weight decay, no
      schedule. At the model's rate (2e-5) they would hardly move from σ(4) ≈ 0.98. Their gradient is zeroed with
      the model's every step; ELBERT's ``model.zero_grad()`` skipped its plain-tensor ``W``, whose gradient summed
      every step's (the README lists this difference).
    * ``no_decay`` also matches ALBERT's ``full_layer_layer_norm.weight``, which the seeds' ``LayerNorm.weight``
      missed (it only matters with ``--weight_decay`` > 0)."""
    from torch.optim.lr_scheduler import LambdaLR

    loss_weights = set(map(id, loss_weight_parameters(model)))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in loss_weights]
    decayed = [p for n, p in trainable if not any(k in n for k in no_decay)]
    not_decayed = [p for n, p in trainable if any(k in n for k in no_decay)]
    groups = [{"params": decayed, "weight_decay": args.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    learned = [p for p in loss_weight_parameters(model) if p.requires_grad]
    if learned:
        groups.append({"params": learned, "weight_decay": 0.0, "lr": args.exit_weight_learning_rate})
    # foreach: one fused update over all tensors; torch's CPU default loops per tensor (a third of a MiniLM step)
    optimizer = torch.optim.AdamW(groups, lr=plan.learning_rate, eps=args.adam_epsilon, foreach=True)
    # accelerate steps a prepared scheduler once per process per optimisation step: scale both lengths by the
    # number of processes so the learning rate at step k is the same as in a one-process run
    warmup = (args.warmup_steps or int(args.warmup_ratio * steps_per_stage)) * accelerator.num_processes
    total = steps_per_stage * accelerator.num_processes

    def linear_with_warmup(step: int) -> float:  # transformers' get_linear_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    def constant(step: int) -> float:
        return 1.0

    scheduler = LambdaLR(optimizer, [linear_with_warmup, linear_with_warmup] + [constant] * (len(groups) - 2))
    return optimizer, scheduler


def loss_weight_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """ELBERT's learned loss weights of ``model`` (wrapped or not), or [] for the other loss weightings."""
    weights = getattr(getattr(model, "module", model), "exit_loss_weights", None)
    return list(weights.parameters()) if weights is not None else []


def clipped_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What gradient clipping covers: the model, not ELBERT's loss weights (its ``W`` was a plain tensor outside
    ``model.parameters()``, so its run_glue.py never clipped them)."""
    loss_weights = set(map(id, loss_weight_parameters(model)))
    return [p for p in model.parameters() if id(p) not in loss_weights]


def restore_position(args, accelerator, prepared_model, optimizer, scheduler, folder: str,  # noqa: ANN001
                     steps_per_epoch: int) -> StagePosition:
    """Load the weights, optimizer, scheduler (and fp16 loss scale) of ``folder`` and say where its stage resumes."""
    from safetensors.torch import load_file

    accelerator.unwrap_model(prepared_model).load_state_dict(
        load_file(os.path.join(folder, "model.safetensors")), strict=True
    )
    progress = load_training_state(folder, optimizer, scheduler, restore_rng=False)
    if accelerator.scaler is not None and "grad_scaler" in progress:
        accelerator.scaler.load_state_dict(progress["grad_scaler"])
    stage_step = progress["stage_step"]
    return StagePosition(
        global_step=progress["global_step"],
        stage_step=stage_step,
        first_epoch=stage_step // steps_per_epoch,
        skip_batches=(stage_step % steps_per_epoch) * args.gradient_accumulation_steps,
        pending_rng=progress["rng_state"],  # applied where the original run saved it, see run_stage
    )


def run_stage(args, accelerator, stage_index: int, plan: TrainingPlan, prepared_model, optimizer, scheduler,  # noqa: ANN001
              loader, tokenizer, position: StagePosition, steps_per_stage: int,  # noqa: ANN001
              eval_callback: Callable[[torch.nn.Module], dict]) -> int:
    """Train one stage from ``position`` to ``steps_per_stage``; logs, evaluates and saves checkpoints on the way.
    Returns the global step reached."""
    global_step, stage_step = position.global_step, position.stage_step
    skip_batches, pending_rng = position.skip_batches, position.pending_rng
    progress_bar = tqdm(total=steps_per_stage, initial=stage_step, desc=f"train ({plan.stage})",
                        disable=not accelerator.is_local_main_process)
    prepared_model.train()
    running_loss, running_count = 0.0, 0
    epoch = position.first_epoch

    def checkpoint_here() -> str:
        """checkpoint-<global_step>, holding everything needed to resume exactly from this step boundary."""
        state = {"global_step": global_step, "stage_step": stage_step, "stage_index": stage_index,
                 "num_processes": accelerator.num_processes}
        if accelerator.scaler is not None:  # --fp16: the loss scale is training state too
            state["grad_scaler"] = accelerator.scaler.state_dict()
        folder = os.path.join(args.output_dir, f"checkpoint-{global_step}")
        save_checkpoint(folder, accelerator, prepared_model, tokenizer, args, optimizer, scheduler, state)
        return folder

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
                    accelerator.clip_grad_norm_(clipped_parameters(prepared_model), args.max_grad_norm)
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
            saved = checkpoint_here() if args.save_steps > 0 and global_step % args.save_steps == 0 else None
            # SIGTERM: stop here, at the step boundary, with a checkpoint saved where a --save_steps one would be (so
            # that resuming from it is exact); after the last step too, so a stop is never lost
            if stop_requested(accelerator):
                progress_bar.close()
                raise TrainingStopped(saved or checkpoint_here(), global_step)
            if stage_step >= steps_per_stage:
                break
        epoch += 1
    if pending_rng is not None:  # resumed at the very end of this stage
        set_rng_state(pending_rng)
    progress_bar.close()
    return global_step
