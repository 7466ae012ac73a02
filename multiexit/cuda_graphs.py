"""Batch-size-1 early exit replayed from CUDA graphs.

On a GPU a layer at batch size 1 takes tens of microseconds, about what launching its dozens of kernels one by one
costs: eager PyTorch is launch-bound there. A CUDA graph replays a captured sequence of kernels with one launch. Early
exit cannot be one graph (whether layer i+1 runs depends on layer i's exit logits), so :class:`ExitGraphs` captures,
per sequence-length bucket, one graph for the embeddings and masks and one per layer (the layer and its exit head:
:meth:`MultiExitMixin._layer_step`, the same code the eager loop runs). The loop is the eager one's,
:func:`multiexit.modeling.run_layers`: between two layers the host reads the exit logits (the one device-to-host
transfer per layer) and :class:`multiexit.policies.ExitTracker` decides, exactly as in eager early exit.

An input of length T runs in the smallest bucket B >= T, padded with padding tokens that the attention mask hides
(and that mean-pooling exits ignore), so its real tokens see what they see unpadded. Padding changes the attention
kernels' reduction lengths, so the logits can differ from the unpadded eager pass by float rounding; they are
bit-identical to eager early exit on the same padded input (tested on a GPU).

Without CUDA (``capture=False``) the same static-buffer code runs eagerly, so that its bucketing and padding are
tested on CPU.

What a captured graph fixes, and so what its key holds: the bucket, and the autocast state (on or off, and its dtype)
of the first call in that bucket. Under autocast the graphs are captured with autocast's weight-cast cache off, so
that each graph casts the weights itself, into its own memory: a cached copy would live outside the graph's memory
pool and be freed when the caller's autocast context closes, while the graph kept reading it (PyTorch's
``make_graphed_callables`` refuses ``cache_enabled=True`` for this reason). One model, one device, one thread: the
graphs share static buffers and capture on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from multiexit.modeling import backbone_model_type, run_layers
from multiexit.policies import ExitTracker

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclass
class _BucketGraphs:
    """The static buffers and graphs of one sequence-length bucket."""

    length: int
    inputs: torch.Tensor  # [3, 1, B]: input_ids, attention_mask, token_type_ids, all long
    embed_graph: torch.cuda.CUDAGraph | None = None
    layer_graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)  # hidden[d]: the input of layer d
    logits: list[torch.Tensor] = field(default_factory=list)  # logits[d]: the exit logits after layer d
    mask: torch.Tensor | None = None
    token_weights: object = None
    modules: object = None  # the model's LoopModules, resolved with the embeddings (once per pass when eager)


# attention implementations whose forward reads nothing on the host (flash-attention unpads with .item() and nonzero)
CAPTURABLE_ATTENTION = ("sdpa", "eager")


class ExitGraphs:
    """CUDA graphs of one model's layers for batch-size-1 early exit, captured per length bucket (and autocast
    state) on first use, or ahead of timing with :meth:`prepare`."""

    def __init__(self, model: torch.nn.Module, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 capture: bool | None = None) -> None:
        positions = getattr(model.config, "max_position_embeddings", max(buckets))
        if backbone_model_type(model.config) == "roberta":  # RoBERTa counts positions from padding_idx + 1
            positions -= model.config.pad_token_id + 1
        self.buckets = sorted({min(b, positions) for b in buckets} | {positions})
        self.model = model
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if self.capture and attention not in CAPTURABLE_ATTENTION:
            raise ValueError(f"CUDA graphs need an attention that reads nothing on the host "
                             f"({', '.join(CAPTURABLE_ATTENTION)}); this model uses {attention!r}: load it with "
                             f"attn_implementation='sdpa'")
        self.pad_token_id = getattr(model.config, "pad_token_id", None) or 0
        self._graphs: dict[tuple, _BucketGraphs] = {}

    def _key(self, length: int) -> tuple:
        device_type = self.device.type
        return (self.bucket_for(length), torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    @torch.no_grad()
    def prepare(self, lengths: list[int]) -> None:
        """Capture the buckets of these input lengths now, under the current autocast state: a timed pass then
        replays only (capturing runs warm-up passes and synchronises)."""
        for length in lengths:
            key = self._key(length)
            if key not in self._graphs:
                self._build(key)

    def bucket_for(self, length: int) -> int:
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        raise ValueError(f"input of {length} tokens is longer than the model's {self.buckets[-1]} positions")

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
            tracker: ExitTracker) -> None:
        """Early exit of one input [1, T] with ``tracker`` deciding after each layer."""
        key = self._key(input_ids.shape[1])
        graphs = self._graphs.get(key) or self._build(key)
        self._load(graphs, input_ids, attention_mask, token_type_ids)
        self._run_embed(graphs)
        run_layers(_GraphLayerPass(self, graphs), self.model.num_exit_layers, tracker)

    # ---- inputs --------------------------------------------------------------------------------------------------
    def _load(self, graphs: _BucketGraphs, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              token_type_ids: torch.Tensor | None) -> None:
        """Copy one input into the bucket's static buffers, padded: one host-to-device copy for CPU inputs."""
        length = input_ids.shape[1]
        packed = torch.zeros(3, 1, graphs.length, dtype=torch.long, device=input_ids.device)
        packed[0].fill_(self.pad_token_id)
        packed[0, :, :length] = input_ids
        packed[1, :, :length] = 1 if attention_mask is None else attention_mask
        if token_type_ids is not None:
            packed[2, :, :length] = token_type_ids
        if packed.device.type == "cpu" and graphs.inputs.device.type == "cuda":
            packed = packed.pin_memory()
        graphs.inputs.copy_(packed, non_blocking=True)

    # ---- the steps, captured or eager ----------------------------------------------------------------------------
    def _embed(self, graphs: _BucketGraphs) -> None:
        hidden, graphs.mask, graphs.token_weights = self.model._prepare(
            graphs.inputs[0], graphs.inputs[1], graphs.inputs[2], None, None)
        graphs.modules = self.model.loop_modules()
        graphs.hidden = [hidden]

    def _layer(self, graphs: _BucketGraphs, depth: int) -> None:
        hidden, logits = self.model._layer_step(depth, graphs.hidden[depth], graphs.mask, graphs.token_weights,
                                                graphs.modules)
        del graphs.hidden[depth + 1:], graphs.logits[depth:]
        graphs.hidden.append(hidden)
        graphs.logits.append(logits)

    def _run_embed(self, graphs: _BucketGraphs) -> None:
        if graphs.embed_graph is not None:
            graphs.embed_graph.replay()
        else:
            self._embed(graphs)

    def _run_layer(self, graphs: _BucketGraphs, depth: int) -> None:
        if graphs.layer_graphs:
            graphs.layer_graphs[depth].replay()
        else:
            self._layer(graphs, depth)

    def _build(self, key: tuple) -> _BucketGraphs:
        bucket, autocast_on, autocast_dtype = key
        # the static input buffer is written in place by every later call: never an inference tensor, whatever
        # mode the first call ran in
        with torch.inference_mode(False):
            graphs = _BucketGraphs(bucket, torch.zeros(3, 1, bucket, dtype=torch.long, device=self.device))
        graphs.inputs[1].fill_(1)
        if self.capture:
            # on the model's device, whichever is current, and under autocast as the caller has it but without its
            # weight-cast cache (see the module docstring)
            with torch.cuda.device(self.device), torch.autocast(self.device.type, dtype=autocast_dtype,
                                                                enabled=autocast_on, cache_enabled=False):
                self._capture(graphs)
        self._graphs[key] = graphs  # only once complete: a failed capture leaves no half-built bucket behind
        return graphs

    def _capture(self, graphs: _BucketGraphs) -> None:
        num_layers = self.model.num_exit_layers
        # warm up on a side stream (cuBLAS handles, autotuning) before capturing, as torch.cuda.graph requires
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._embed(graphs)
                for depth in range(num_layers):
                    self._layer(graphs, depth)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # capture: every graph's outputs stay referenced (graphs.hidden, graphs.logits), so the shared memory pool
        # never hands them to a later graph; the graphs replay in capture order, one input at a time
        embed_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(embed_graph):
            self._embed(graphs)
        pool = embed_graph.pool()
        layer_graphs = []
        for depth in range(num_layers):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._layer(graphs, depth)
            layer_graphs.append(graph)
        graphs.embed_graph, graphs.layer_graphs = embed_graph, layer_graphs


class _GraphLayerPass:
    """The graphs' :class:`multiexit.modeling.LayerPass` for one input: a layer's graph holds the layer and its exit
    head together, so a layer below the policy's first read layer runs its exit too, unread."""

    __slots__ = ("graphs", "bucket")

    def __init__(self, graphs: ExitGraphs, bucket: _BucketGraphs) -> None:
        self.graphs, self.bucket = graphs, bucket

    def layer(self, depth: int) -> None:
        self.graphs._run_layer(self.bucket, depth)

    def layer_and_exit(self, depth: int) -> torch.Tensor:
        self.graphs._run_layer(self.bucket, depth)
        return self.bucket.logits[depth]

    def keep_rows(self, rows: torch.Tensor) -> None:
        raise AssertionError("CUDA graphs run one row, which leaves the loop when it exits")
