#!/usr/bin/env python
"""Does a model the runner saved give the runner's answers through HF's own entry points?

Loads the model in OUTPUT_DIR (``make demo``: runs/demo-bbc-news) with ``AutoModelForSequenceClassification`` and its
tokenizer with ``AutoTokenizer``, then, for every exit setting the runner evaluated this model with (the records of
exit_results.jsonl written after its training_args.json, calibrated settings aside), runs
``pipeline("early-exit-text-classification", policy=...)`` on the same examples (truncated to the run's
--max_seq_length) and compares each example's exit layer and label with the runner's per-example file.

Real early exit at batch size 1 (records of mode ``online``) is the pipeline's computation on the same tokens, so
every example must agree: the script exits with status 1 otherwise. Replayed records were decided on logits of a
padded batched pass, which can differ from a batch-size-1 pass in the last bits; they are reported, not required.

    python scripts/check_hf_answers.py [OUTPUT_DIR] [--data_dir DIR] [--batch_size 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from multiexit.data import get_task, read_examples
from multiexit.hf import PIPELINE_TASK
from multiexit.policies import POLICIES
from multiexit.runner.hub import model_evaluations


def read_details(output_dir: str, record: dict) -> list[tuple[int, int, int]]:
    """(index in the split, exit layer, predicted class) of each example of a record."""
    with open(os.path.join(output_dir, record["per_example_file"]), encoding="utf-8") as stream:
        rows = [line.rstrip("\n").split("\t") for line in stream][1:]
    return [(int(row[0]), int(row[1]), int(row[2])) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "runs",
                                                                       "demo-bbc-news"))
    parser.add_argument("--data_dir", default=None, help="the task's data folder, if the runner was given one")
    parser.add_argument("--batch_size", type=int, default=1, help="the pipeline's batch size")
    args = parser.parse_args(argv)

    with open(os.path.join(args.output_dir, "training_args.json"), encoding="utf-8") as stream:
        training_args = json.load(stream)
    task = get_task(training_args["task_name"])
    if task.is_regression:
        print(f"{task.name} is a regression task; this check compares class labels", file=sys.stderr)
        return 2
    model = AutoModelForSequenceClassification.from_pretrained(args.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    print(f"{args.output_dir}: {type(model).__name__} ({model.config.model_type}, {model.num_exit_layers} exits)")
    # the evaluations of this model: the folder may keep those of a model trained there before (--overwrite_output_dir)
    trained = time.strftime("%Y-%m-%dT%H:%M:%S",
                            time.localtime(os.path.getmtime(os.path.join(args.output_dir, "training_args.json"))))
    records = [record for run in model_evaluations(args.output_dir) for record in run
               if record["time"] >= trained and "calibration" not in record]
    if not records:
        print("no evaluation of this model in its exit_results.jsonl: run the runner with --do_eval first",
              file=sys.stderr)
        return 2
    examples = read_examples(task, records[0]["split"], args.data_dir)
    classifier = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer)
    label_ids = {label: index for index, label in model.config.id2label.items()}
    failed = False
    print("| policy | setting | mode | examples | same exit layer | same label |\n|---|---|---|---:|---:|---:|")
    for record in records:
        policy = POLICIES[record["policy"]](**record["params"])
        details = read_details(args.output_dir, record)
        inputs = [examples[index].text_a if task.text_fields == 1 else
                  {"text": examples[index].text_a, "text_pair": examples[index].text_b} for index, _, _ in details]
        answers = classifier(inputs, policy=policy, batch_size=args.batch_size, truncation=True,
                             max_length=training_args["max_seq_length"])
        same_layer = sum(answer["exit_layer"] == layer for answer, (_, layer, _) in zip(answers, details))
        same_label = sum(label_ids[answer["label"]] == label for answer, (_, _, label) in zip(answers, details))
        print(f"| {policy.name} | {policy.label()} | {record['mode']} | {len(details)} | {same_layer} | "
              f"{same_label} |")
        if record["mode"] == "online" and args.batch_size == 1:
            failed |= same_layer != len(details) or same_label != len(details)
    if failed:
        print("real early exit at batch size 1 differs from the pipeline's: a bug, please report it", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
