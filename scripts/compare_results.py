#!/usr/bin/env python
"""Check that two runs wrote the same results: ``exit_results.jsonl`` record by record, apart from timing fields.

A behaviour-preserving change must leave every record of a run identical (policy, setting, metrics, exit layers,
speed-ups) and only the clock readings may differ. Paths (the ``checkpoint`` field) are compared relative to each
run's output folder, and each record's per-example TSV (exit layer and prediction of every example) is compared too.

    python scripts/compare_results.py OLD_OUTPUT_DIR NEW_OUTPUT_DIR

Exits 0 when both runs agree, 1 (listing the first differences) otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TIMING_FIELDS = ("time", "wall_time_s", "wall_time_repeats_s", "full_depth_wall_time_s", "wall_speedup")


def read_records(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "exit_results.jsonl"), encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def comparable(record: dict, output_dir: str) -> dict:
    """The record without clock readings, with its checkpoint path relative to the run's folder."""
    record = {key: value for key, value in record.items() if key not in TIMING_FIELDS}
    checkpoint = record.get("checkpoint")
    if isinstance(checkpoint, str):  # as given on the command line: relative to where the run was started
        record["checkpoint"] = os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(output_dir))
    return record


def per_example(output_dir: str, record: dict) -> str | None:
    path = os.path.join(output_dir, record.get("per_example_file", ""))
    return open(path, encoding="utf-8").read() if os.path.isfile(path) else None


def differences(old_dir: str, new_dir: str) -> list[str]:
    old, new = read_records(old_dir), read_records(new_dir)
    found = []
    if len(old) != len(new):
        found.append(f"{len(old)} records in {old_dir}, {len(new)} in {new_dir}")
    for index, (a, b) in enumerate(zip(old, new)):
        ca, cb = comparable(a, old_dir), comparable(b, new_dir)
        if ca != cb:
            keys = sorted(key for key in set(ca) | set(cb) if ca.get(key) != cb.get(key))
            found.append(f"record {index + 1} ({a.get('policy')} {a.get('params')}, {a.get('mode')}): "
                         + "; ".join(f"{key}: {ca.get(key)!r} != {cb.get(key)!r}" for key in keys))
        elif per_example(old_dir, a) != per_example(new_dir, b):
            found.append(f"record {index + 1} ({a.get('policy')} {a.get('params')}): per-example files differ")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old_output_dir")
    parser.add_argument("new_output_dir")
    args = parser.parse_args(argv)
    found = differences(args.old_output_dir, args.new_output_dir)
    records = len(read_records(args.old_output_dir))
    if found:
        print(f"{len(found)} difference(s) between {args.old_output_dir} and {args.new_output_dir}:")
        print("\n".join(found[:20]))
        return 1
    print(f"identical apart from timing fields: {records} records and their per-example files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
