"""Evaluation: one all-layer pass per checkpoint, every requested policy setting scored by offline replay from it,
real early exit (``online`` at batch size 1, ``batched`` above) timed and verified against the replay on request,
calibration to target speed-ups, and the results files, tables and plot.

Every process runs the same code, so every collective (gathering logits and online results) happens in the same
order everywhere; only the main process writes (:class:`ResultWriter`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multiexit.data import TaskSpec, compute_metrics, make_collator, submission_file_name, submission_text
from multiexit.io import append_jsonl, atomic_copy, atomic_save_npy, atomic_write_text, make_folder, writing
from multiexit.policies import POLICIES, BudgetExit, ExitPolicy, parse_list
from multiexit.replay import (
    PolicyScore,
    calibrate_held_out,
    compare_with_online,
    curves_from_scores,
    default_grid,
    pareto_front,
    per_layer_scores,
    plot_score_vs_speedup,
    predictions_from_logits,
    score_policy,
    sweep,
)
from multiexit.runner.args import HELD_OUT_BATCH
from multiexit.runner.loading import model_inputs

logger = logging.getLogger("run_glue_with_exits")

RESULTS_FILE = "exit_results.jsonl"
MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


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
    graphs = {"cuda_graphs": True} if args.cuda_graphs else {}  # (--runtime onnxruntime has no such argument)
    if graphs and batch_size == 1:  # capture every bucket now: capturing inside a timed pass would count
        with _autocast(args, accelerator.device):
            model.exit_graphs().prepare([batch["input_ids"].shape[1] for batch in batches])
    for batch in batches[: args.timing_warmup]:
        with _autocast(args, accelerator.device):
            model.early_exit(**batch, policy=policy, **graphs)
    pass_times = []
    for _ in range(args.timing_repeats):
        exit_layers, answers = [], []
        _synchronize(accelerator.device)
        start = time.perf_counter()
        for batch in batches:
            with _autocast(args, accelerator.device):
                output = model.early_exit(**batch, policy=policy, **graphs)
            exit_layers.append(output.exit_layers)
            answers.append(output.logits)
        _synchronize(accelerator.device)
        pass_times.append(time.perf_counter() - start)
    from accelerate.utils import gather_object

    local = []  # a process whose shard is empty (fewer examples than processes) still joins the gather
    if exit_layers:
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


def write_per_example(path: str, score: PolicyScore, labels: np.ndarray | None, first_index: int = 0) -> None:
    """One line per example: its index in the evaluated split (from ``first_index`` for a part of it, such as
    calibration's second half), exit layer, prediction and label."""
    lines = ["index\texit_layer\tprediction\tlabel"]
    for index, (layer, prediction) in enumerate(zip(score.exit_layers, score.predictions)):
        label = "" if labels is None else labels[index]
        lines.append(f"{first_index + index}\t{int(layer)}\t{prediction}\t{label}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def checkpoint_label(args: argparse.Namespace, checkpoint: str) -> str:
    """``checkpoint-N`` for intermediate checkpoints, ``final`` for the model trained into --output_dir."""
    if os.path.abspath(checkpoint) == os.path.abspath(args.output_dir):
        return "final"
    return os.path.basename(os.path.normpath(checkpoint))


def per_layer_callback(args, accelerator, task: TaskSpec, tokenizer, features) -> Callable:  # noqa: ANN001
    """For --evaluate_during_training and --eval_after_first_stage: the main metric of every exit on ``features``."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        logits = cache_layer_logits(args, accelerator, model, features, make_collator(tokenizer),
                                    args.per_gpu_eval_batch_size)
        scores = per_layer_scores(logits, np.asarray(features["labels"]),
                                  lambda predictions, gold: compute_metrics(task, predictions, gold))
        return {f"layer_{k + 1}": score.metrics[task.main_metric] for k, score in enumerate(scores)}

    return evaluate


class ResultWriter:
    """Appends one checkpoint's records to ``exit_results.jsonl``, each with a per-example TSV (index, exit layer,
    prediction, label). On processes other than the main one it only builds the records and writes nothing."""

    def __init__(self, args: argparse.Namespace, task: TaskSpec, checkpoint: str, labels: np.ndarray | None,
                 enabled: bool) -> None:
        self.args, self.task, self.checkpoint, self.labels, self.enabled = args, task, checkpoint, labels, enabled
        self.checkpoint_name = checkpoint_label(args, checkpoint)
        # a folder of its own per run (split and start time, and a number if that folder exists: created here, so two
        # runs cannot both take it): the jsonl is never overwritten, so neither are the files its records point to,
        # whether a later run evaluates another split or subset, or runs at the same time
        self.run_folder = f"{args.eval_split}_{time.strftime('%Y%m%d-%H%M%S')}"
        if enabled:
            parent = os.path.join(args.output_dir, "exit_details", self.checkpoint_name)
            make_folder(parent)
            stem, number = self.run_folder, 1
            while True:
                try:
                    with writing(os.path.join(parent, self.run_folder), "nothing was written there"):
                        os.mkdir(os.path.join(parent, self.run_folder))
                    break
                except FileExistsError:
                    number += 1
                    self.run_folder = f"{stem}_{number}"

    @property
    def run_dir(self) -> str:
        """This run's folder: its per-example files, and its own copies of the summary table and plot."""
        return os.path.join(self.args.output_dir, "exit_details", self.checkpoint_name, self.run_folder)

    def record(self, score: PolicyScore, mode: str, labels: np.ndarray | None = None, first_index: int = 0,
               variant: str = "", **extra: object) -> dict:
        """Append ``score``'s record and write its per-example TSV. ``variant`` names a further folder for records
        that share a setting's label with another (calibration's choices); ``first_index`` is the index in the split
        of the first example scored (with ``labels``, for a part of the split)."""
        labels = self.labels if labels is None else labels
        detail_dir = os.path.join(self.run_dir, mode + variant)
        detail_path = os.path.join(detail_dir, _file_label(score.policy) + ".tsv")
        record = {
            "task": self.task.name,
            "checkpoint": self.checkpoint,
            "split": self.args.eval_split,
            **({"heldout_fraction": self.args.heldout_fraction} if self.args.eval_split == "heldout" else {}),
            "mode": mode,
            "runtime": getattr(self.args, "runtime", "torch") + ("-int8" if getattr(self.args, "onnx_int8", False)
                                                                 else ""),
            **score.summary(),
            "main_metric": self.task.main_metric,
            "wall_time_s": None,
            "per_example_file": os.path.relpath(detail_path, self.args.output_dir),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        submission_path = None
        if labels is None:  # an unlabelled split (GLUE's test): the predictions as the benchmark's server reads them
            submission_path = os.path.join(detail_dir, "submission_" + _file_label(score.policy),
                                           submission_file_name(self.task))
            record["submission_file"] = os.path.relpath(submission_path, self.args.output_dir)
        if self.enabled:  # (the atomic writers make the folders)
            write_per_example(detail_path, score, labels, first_index)
            if submission_path is not None:
                atomic_write_text(submission_path, submission_text(self.task, score.predictions, first_index))
            append_jsonl(os.path.join(self.args.output_dir, RESULTS_FILE), record)
        return record


def _setting_text(row: dict) -> str:
    """A record's setting as its policy labels it, floats to 6 significant digits (a calibrated threshold has all of
    float64's)."""
    shown = POLICIES[row["policy"]](**row["params"]).shown_params()
    return ",".join(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}" for key, value in shown)


def _mode_text(row: dict) -> str:
    if row.get("runtime", "torch") != "torch":
        return f"{_mode_text({**row, 'runtime': 'torch'})} ({row['runtime']})"
    if "calibration" not in row:
        return row["mode"]
    calibration = row["calibration"]
    target = ", ".join(f"{key} {value}" for key, value in calibration.items()
                       if key in ("target_speedup", "max_metric_drop", "risk", "delta", "batch_size")
                       and value is not None)
    if "certified" in calibration:
        target += (f", {calibration['calibrated_policy']} certified: bound {calibration['bound']:.4f}"
                   if calibration["certified"] else f", nothing certified for {calibration['calibrated_policy']}")
    return f"{row['mode']}, calibrated for {target} (scored on the second half: {row['num_examples']} examples)"


def format_table(rows: list[dict], main_metric: str) -> str:
    header = f"| policy | setting | {main_metric} | mode | avg exit layer | speed-up (L/avg) | layer saving | wall s |"
    lines = [header, "|---|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        metric = row["metrics"].get(main_metric, float("nan"))
        wall = "" if row.get("wall_time_s") is None else f"{row['wall_time_s']:.3f}"
        line = (f"| {row['policy']} | {_setting_text(row)} | {metric * 100:.2f} | {_mode_text(row)} "
                f"| {row['avg_exit_layer']:.2f} | {row['speedup']:.2f}x | {row['layer_saving'] * 100:.1f}% | {wall} |")
        if line not in lines:  # --eval_each_highway's layer k and --budget_layer k are one setting: one row
            lines.append(line)
    return "\n".join(lines)


def evaluate_checkpoint(args, accelerator, task: TaskSpec, checkpoint: str, model, tokenizer, features,  # noqa: ANN001
                        requested: list[ExitPolicy]) -> dict[str, float]:
    """Replay every requested setting (and the grids) from one pass; run/verify online exits when asked.

    Returns what HF example scripts return from an evaluation: metric name -> value, for full depth (``acc``) and for
    each requested setting (``acc_pabee(patience=2)``; real early exit adds ``_online`` / ``_batched``)."""
    collator = make_collator(tokenizer)
    model = accelerator.prepare(model) if accelerator.num_processes > 1 else model.to(accelerator.device)
    layer_logits = cache_layer_logits(args, accelerator, model, features, collator, args.per_gpu_eval_batch_size)
    labels = np.asarray(features["labels"])
    has_labels = not (np.issubdtype(labels.dtype, np.floating) and np.isnan(labels).all()) and not (labels < 0).all()
    labels_or_none = labels if has_labels else None

    def metric_fn(predictions: np.ndarray, gold: np.ndarray) -> dict[str, float]:
        return compute_metrics(task, predictions, gold)

    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    for policy in requested:  # this checkpoint's depth may differ from --model_name_or_path's (--eval_all_checkpoints)
        policy.validate(num_labels, num_layers)
    main_process = accelerator.is_main_process
    writer = ResultWriter(args, task, checkpoint, labels_or_none, enabled=main_process)
    if args.save_layer_logits and main_process:
        folder = os.path.join(args.output_dir, "layer_logits")
        make_folder(folder)
        atomic_save_npy(os.path.join(folder, f"{writer.checkpoint_name}_{args.eval_split}_logits.npy"),
                        layer_logits.numpy())
        atomic_save_npy(os.path.join(folder, f"{writer.checkpoint_name}_{args.eval_split}_labels.npy"), labels)

    records: list[dict] = []
    per_layer = per_layer_scores(layer_logits, labels_or_none, metric_fn) if has_labels else []
    if per_layer:
        records.append(writer.record(per_layer[-1], "replay"))
    else:  # unlabelled (--eval_split test): the full-depth predictions still get their record and TSV
        records += [writer.record(score, "replay")
                    for score in sweep([BudgetExit(layer=num_layers)], layer_logits, None, None, progress=False)]
    if args.eval_each_highway and per_layer:
        records += [writer.record(score, "replay") for score in per_layer[:-1]]
        if main_process:
            logger.info("each-layer scores (%s):\n%s", writer.checkpoint_name, "\n".join(
                f"  layer {k + 1}: " + ", ".join(f"{m}={v * 100:.2f}" for m, v in s.metrics.items())
                for k, s in enumerate(per_layer)))

    replayed = sweep(requested, layer_logits, labels_or_none, metric_fn if has_labels else None, progress=main_process)
    setting_records = [writer.record(score, "replay") for score in replayed]
    grid = [p for name in POLICIES for p in default_grid(name, num_layers, num_labels)] if args.sweep_default_grids \
        else []
    grid_scores = sweep(grid, layer_logits, labels_or_none, metric_fn, progress=main_process) if has_labels else []
    for score in grid_scores:
        writer.record(score, "replay", grid=True)
    if (args.online or args.verify_online) and requested:
        setting_records += online_records(args, accelerator, model, features, collator, requested, replayed, writer,
                                          metric_fn if has_labels else None)
    if has_labels and (args.calibrate_speedup or args.calibrate_max_drop):
        setting_records += calibration_records(args, task, layer_logits, labels, metric_fn, requested, writer)
    elif args.calibrate_speedup or args.calibrate_max_drop:
        logger.warning("--calibrate_speedup / --calibrate_max_drop: the %s split has no labels, so nothing is "
                       "calibrated (use --eval_split dev or heldout)", args.eval_split)
    records += setting_records

    # HF example scripts return their evaluation's metrics: full depth as is, each setting under its label
    results = dict(per_layer[-1].metrics) if per_layer else {}
    for record in setting_records:
        label = POLICIES[record["policy"]](**record["params"]).label()
        calibrated = record.get("calibration", {}).get("calibrated_policy", record["policy"])
        if calibrated != record["policy"]:  # a policy certified nothing and answers at full depth
            label = f"{calibrated}:{label}"
        if "calibration" in record:
            label += "_calibrated_" + "_".join(f"{key}={value}" for key, value in record["calibration"].items()
                                               if key in ("target_speedup", "max_metric_drop"))
        suffix = "" if record["mode"] == "replay" else f"_{record['mode']}"
        results.update({f"{metric}_{label}{suffix}": value for metric, value in record["metrics"].items()})
    if main_process:
        write_summary(args, task, writer.checkpoint_name, records, grid_scores, len(features), num_layers,
                      writer.run_dir)
        if args.plot_data_dir is not None and per_layer:
            write_deebert_plot_data(args, task, per_layer, setting_records, num_layers)
        if has_labels and (grid_scores or len(replayed) > 1):
            plot_dir = args.plot_data_dir or args.output_dir
            make_folder(plot_dir)
            plot_path = os.path.join(plot_dir, f"score_vs_speedup_{writer.checkpoint_name}.png")
            plot_score_vs_speedup(curves_from_scores(per_layer + replayed + grid_scores, task.main_metric), plot_path,
                                  f"{task.main_metric} (×100)", title=f"{task.name}: {writer.checkpoint_name}")
            # the top-level plot is the latest run's; the run's own folder keeps this one
            atomic_copy(plot_path, os.path.join(writer.run_dir, "score_vs_speedup.png"))
            logger.info("plot written to %s", plot_path)
    return results


def online_records(args, accelerator, model, features, collator, requested: list[ExitPolicy],  # noqa: ANN001
                   replayed: list[PolicyScore], writer: ResultWriter, metric_fn: MetricFn | None) -> list[dict]:
    """Real early exit for every requested setting, timed against full depth, and (``--verify_online``) checked
    against the replay example by example."""
    base_model = accelerator.unwrap_model(model) if isinstance(model, torch.nn.Module) else model  # (ONNX Runtime)
    batch_size = args.per_gpu_eval_batch_size
    mode = "online" if batch_size == 1 else "batched"
    num_layers = replayed[0].num_layers
    full = run_online(args, accelerator, base_model, features, collator, BudgetExit(layer=num_layers), batch_size)
    verify_logits = None
    if args.verify_online and batch_size != 1:
        # batch-size-1 replay is bit-identical to batch-size-1 online; padded batches differ by float rounding
        verify_logits = cache_layer_logits(args, accelerator, model, features, collator, 1)
    elif args.verify_online and args.cuda_graphs:
        # the graphs run each input padded to its length bucket: the reference pass pads it alike
        verify_logits = cache_layer_logits(args, accelerator, model, features,
                                           bucket_padding(collator, base_model.exit_graphs()), 1)
    records = []
    for policy, replay_score in zip(requested, replayed):
        online = run_online(args, accelerator, base_model, features, collator, policy, batch_size)
        predictions = predictions_from_logits(online["answers"])
        metrics = metric_fn(predictions, writer.labels) if metric_fn is not None else {}
        online_score = PolicyScore(policy, metrics, online["exit_layers"], predictions, num_layers)
        extra = {"wall_time_s": online["wall_time_s"], "wall_time_repeats_s": online["wall_time_repeats_s"],
                 "full_depth_wall_time_s": full["wall_time_s"],
                 "wall_speedup": full["wall_time_s"] / online["wall_time_s"],
                 "batch_size": batch_size, "device": str(accelerator.device)}
        if args.verify_online:
            reference = replay_score if verify_logits is None else score_policy(
                policy, verify_logits, writer.labels, metric_fn)
            mismatches = compare_with_online(reference, online["exit_layers"], predictions)
            extra["verified_against_replay"] = not mismatches
            if mismatches:
                raise RuntimeError(
                    f"online early exit differs from the replay for {policy.label()} on {len(mismatches)} "
                    f"examples (first: {mismatches[:10]}); this is a bug, please report it"
                )
        records.append(writer.record(online_score, mode, **extra))
    return records


def bucket_padding(collator: Callable, graphs: object) -> Callable:
    """``collator`` with each (batch-size-1) batch padded on to its CUDA-graph bucket, as the graphs pad it: padding
    tokens, attention mask 0, segment 0."""
    def collate(rows: list[dict]) -> dict:
        batch = collator(rows)
        extra = graphs.bucket_for(batch["input_ids"].shape[1]) - batch["input_ids"].shape[1]
        fill = {"input_ids": graphs.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        return {key: torch.nn.functional.pad(value, (0, extra), value=fill[key]) if key in fill else value
                for key, value in batch.items()}

    return collate


def calibration_records(args, task: TaskSpec, layer_logits: torch.Tensor, labels: np.ndarray,  # noqa: ANN001
                        metric_fn: MetricFn, requested: list[ExitPolicy], writer: ResultWriter) -> list[dict]:
    """For every policy, the setting chosen on the first half of the eval set for each target, reported on the
    second half (:func:`multiexit.replay.calibrate_held_out`). The templates are the requested settings of the policy,
    or the ones it declares. A drop is certified (:func:`multiexit.replay.certify`) unless --calibrate_risk is the
    point estimate; its record carries the certificate and the risk measured on the second half."""
    num_layers, num_labels = layer_logits.shape[1], layer_logits.shape[2]
    targets = [("target_speedup", v) for v in parse_list("--calibrate_speedup", args.calibrate_speedup, float)]
    targets += [("max_metric_drop", v) for v in parse_list("--calibrate_max_drop", args.calibrate_max_drop, float)]
    risk = {"delta": args.calibrate_delta, "risk": args.calibrate_risk, "tolerance": args.calibrate_tolerance}
    half = layer_logits.shape[0] // 2
    if args.calibrate_batch_size == HELD_OUT_BATCH:  # the second half itself: the rest of one shuffled set
        risk.update(batch_size=layer_logits.shape[0] - half, batch_sampling="split")
    elif args.calibrate_batch_size is not None:  # new i.i.d. examples
        risk.update(batch_size=int(args.calibrate_batch_size), batch_sampling="iid")
    records = []
    for cls in POLICIES.values():
        templates = [p for p in requested if p.name == cls.name] or cls.calibration_templates(num_layers, num_labels)
        if not templates:
            continue
        for kind, value in targets:
            result = calibrate_held_out(templates, layer_logits, labels, metric_fn, task.main_metric, **{kind: value},
                                        **(risk if kind == "max_metric_drop" else {}))
            chosen = result.calibration
            calibration = {kind: value, "reached_on_calibration_half": chosen.reached_target,
                           "calibration_speedup": chosen.calibration_score.speedup,
                           "calibration_metrics": chosen.calibration_score.metrics,
                           "evaluated_on": "second half of the eval set"}
            if chosen.certificate is not None:
                calibration.update(calibrated_policy=cls.name, **chosen.certificate.summary(),
                                   held_out_risk=result.held_out_risk)
            elif kind == "max_metric_drop":
                calibration["risk"] = args.calibrate_risk
            # a policy left at full depth answers as budget(layer=L): its own folder, beside other policies' own
            variant = f"_calibrated_{kind}-{value:g}" + ("" if chosen.policy.name == cls.name else f"_{cls.name}")
            records.append(writer.record(result.held_out, "replay", labels=labels[half:], first_index=half,
                                         variant=variant, calibration=calibration))
    return records


def deebert_result(task: TaskSpec, metrics: dict[str, float]) -> float:
    """The one number DeeBERT's ``get_wanted_result`` reports: Spearman, else F1, else MCC, else accuracy."""
    for key in ("spearmanr", "f1", "mcc", "acc"):
        if key in metrics:
            return metrics[key]
    return metrics[task.main_metric]


def write_deebert_plot_data(args: argparse.Namespace, task: TaskSpec, per_layer: list[PolicyScore],
                            setting_records: list[dict], num_layers: int) -> None:
    """What DeeBERT's run_highway_glue.py wrote under ``--plot_data_dir`` for its plotting scripts, in
    ``<plot_data_dir>/<model_name_or_path>/`` (DeeBERT: ``args.plot_data_dir + '/' + args.model_name_or_path[2:]``):

    * with ``--eval_each_highway``: ``each_layer.npy``, the result of every layer alone (float array [L]);
    * for every DeeBERT entropy threshold t: ``entropy_<t>.npy``. DeeBERT saved a pickled object array
      ``[exit_layer_counter, eval_time, expected_saving, result]`` (loadable only with ``allow_pickle``); here it is
      a plain float array ``[eval_time, fraction_of_layers_used, result, exits at layer 1, ..., exits at layer L]``
      (the "expected saving" DeeBERT printed was that fraction of layers used), with a JSON file of the same name
      naming each entry. ``eval_time`` is the real early-exit wall time with ``--online``, NaN for a replay."""
    # inside --plot_data_dir whatever the path: '..' parts dropped (as DeeBERT's [2:] dropped a leading './')
    model_name = os.path.join(*[part for part in os.path.normpath(args.model_name_or_path).split(os.sep)
                                if part not in ("", os.curdir, os.pardir)] or ["model"])
    folder = os.path.join(args.plot_data_dir, model_name)
    make_folder(folder)
    if args.eval_each_highway:
        atomic_save_npy(os.path.join(folder, "each_layer.npy"),
                        np.array([deebert_result(task, score.metrics) for score in per_layer], dtype=np.float64))
    by_threshold: dict[float, dict] = {}
    for record in setting_records:  # the online record, when there is one, replaces the replayed one
        if record["policy"] == "deebert" and "calibration" not in record and record["metrics"]:
            by_threshold[record["params"]["threshold"]] = record
    for threshold, record in by_threshold.items():
        with open(os.path.join(args.output_dir, record["per_example_file"]), encoding="utf-8") as stream:
            layers = [int(line.split("\t")[1]) for line in stream.read().splitlines()[1:]]
        counts = np.bincount(layers, minlength=num_layers + 1)[1:]
        eval_time = record["wall_time_s"] if record.get("wall_time_s") is not None else math.nan
        values = [eval_time, record["avg_exit_layer"] / num_layers, deebert_result(task, record["metrics"]),
                  *counts.tolist()]
        atomic_save_npy(os.path.join(folder, f"entropy_{threshold}.npy"), np.array(values, dtype=np.float64))
        names = ["eval_time_s", "fraction_of_layers_used", "result"] + [f"exits_at_layer_{k + 1}"
                                                                          for k in range(num_layers)]
        atomic_write_text(os.path.join(folder, f"entropy_{threshold}.json"),
                          json.dumps(dict(zip(names, values)), indent=1) + "\n")


def write_summary(args: argparse.Namespace, task: TaskSpec, checkpoint_name: str, records: list[dict],
                  grid_scores: list[PolicyScore], num_examples: int, num_layers: int, run_dir: str) -> None:
    """exit_summary_<checkpoint>.md (the latest run's) and its copy exit_summary.md in the run's own folder (kept),
    and the same table on stdout, with the Pareto-best grid settings."""
    table = format_table(records, task.main_metric)
    if grid_scores:
        table += "\n\nPareto-best settings of the default grids (all are in exit_results.jsonl):\n"
        best = []
        for name in POLICIES:
            group = [s for s in grid_scores if s.policy.name == name]
            front = set(pareto_front([(s.speedup, s.metrics[task.main_metric]) for s in group]))
            for score in group:  # one setting per Pareto point (ties give the same point many times)
                point = (score.speedup, score.metrics[task.main_metric])
                if point in front:
                    front.discard(point)
                    best.append(score.summary() | {"mode": "replay"})
        table += format_table(best, task.main_metric)
    atomic_write_text(os.path.join(args.output_dir, f"exit_summary_{checkpoint_name}.md"), table + "\n")
    atomic_write_text(os.path.join(run_dir, "exit_summary.md"), table + "\n")
    print(f"\n{task.name} / {checkpoint_name} ({num_examples} examples, {num_layers} layers)\n{table}\n")
