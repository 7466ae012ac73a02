"""Export a multi-exit model as ONNX segments that ONNX Runtime runs one after another.

A pass through the segments carries a state from one to the next, the same as the torch loop's (its ``_prepare``
makes it): ``hidden_states`` [batch, tokens, hidden], ``layer_mask`` (the layers' attention mask, made once from the
[batch, tokens] attention mask with the torch model's own :meth:`MultiExitMixin._layer_mask`) and, for mean-pooling
exits, ``token_weights`` and ``token_count`` (:meth:`MultiExitMixin._token_weights`). The folder
:func:`export_onnx` writes:

* the embeddings: ``input_ids``, ``token_type_ids``, ``attention_mask`` [batch, tokens] -> the state (ALBERT's
  embeddings include ``embedding_hidden_mapping_in``). Where the first layer runs at depth 1 only (BERT, RoBERTa)
  the same segment runs it and its exit too, ``embeddings_layer_0.onnx``: the state after layer 1 and its
  ``exit_logits`` (every input runs layer 1, so a session run apart from it would only add its own overhead); else
  ``embeddings.onnx``;
* per depth, the layer and its exit head: ``layer_<d>.onnx``: the state -> ``layer_output`` (the next
  ``hidden_states``) and ``exit_logits`` [batch, num_labels]. A layer module that runs at several depths (ALBERT's
  shared layer groups) is exported once, alone (``layer_group_<g>.onnx`` -> ``layer_output``), and each depth's exit
  as its own small segment (``exit_<d>.onnx``: the state -> ``exit_logits``): no weight is duplicated, at the price of
  a second session run per exit read at those depths;
* ``select_rows.onnx``: the state of the rows still running (a ``Gather`` of each tensor), so that batched early exit
  compacts its batch on whichever device the state is;
* ``config.json`` (the model's config: labels, exit settings), the tokenizer's files when one is given, and
  ``onnx_manifest.json`` (:class:`Manifest`), written last: what a loader needs, and a fingerprint of the weights
  exported. (Its own name: :func:`multiexit.io.atomic_directory`, which writes the folder, adds a ``manifest.json`` of
  the files' sizes.)

Batch and sequence axes are dynamic.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 17 (see docs/deploying.md for why).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from multiexit.errors import UserInputError
from multiexit.io import atomic_directory, atomic_write_text
from multiexit.modeling import MultiExitMixin, TokenWeights, backbone_model_type
from multiexit.onnx import require

logger = logging.getLogger(__name__)

FORMAT = "multiexit-onnx-segments"
# 2: the layer mask is additive (version 1's boolean mask cost every layer segment a Where), and the embeddings
# segment runs the first layer where that layer runs at depth 1 only. This code runs both; find_or_export replaces a
# version 1 export
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "onnx_manifest.json"
OPSET = 17  # the TorchScript exporter's LayerNormalization (opset 17) is one node, which ONNX Runtime runs fused
EXPORTER = "torchscript"
EMBEDDINGS_FILE = "embeddings.onnx"
EMBEDDINGS_AND_FIRST_LAYER_FILE = "embeddings_layer_0.onnx"
SELECT_ROWS_FILE = "select_rows.onnx"
# tensor names shared by the export and the runtime: the model's inputs; the state of a pass (the running rows'
# hidden states, the layers' attention mask and mean-pooling exits' token weights and count: what the torch model's
# _prepare returns); what the segments return; the row indices that select_rows keeps
INPUT_IDS, TOKEN_TYPE_IDS, ATTENTION_MASK = "input_ids", "token_type_ids", "attention_mask"
HIDDEN_STATES, LAYER_MASK, TOKEN_WEIGHTS, TOKEN_COUNT = "hidden_states", "layer_mask", "token_weights", "token_count"
LAYER_OUTPUT, EXIT_LOGITS, ROWS = "layer_output", "exit_logits", "rows"
DYNAMIC_AXES = {INPUT_IDS: {0: "batch", 1: "tokens"}, TOKEN_TYPE_IDS: {0: "batch", 1: "tokens"},
                ATTENTION_MASK: {0: "batch", 1: "tokens"}, HIDDEN_STATES: {0: "batch", 1: "tokens"},
                LAYER_MASK: {0: "batch", 2: "tokens", 3: "tokens"}, TOKEN_WEIGHTS: {0: "batch", 1: "tokens"},
                TOKEN_COUNT: {0: "batch"}, LAYER_OUTPUT: {0: "batch", 1: "tokens"}, EXIT_LOGITS: {0: "batch"}}
# what the export's own check (and the agreement tests) hold ONNX Runtime's fp32 logits to: |ort - torch| <=
# ATOL + RTOL * |torch|, every exit, padded rows included (different kernels sum in a different order)
ATOL, RTOL = 1e-4, 1e-4


@dataclass
class DepthSegments:
    """What runs at one depth: ``layer`` (a file), and ``exit``: None when ``layer`` also gives the exit logits,
    else the exit's own file."""

    layer: str
    exit: str | None = None


@dataclass
class Manifest:
    """``onnx_manifest.json``: everything a loader needs besides the ONNX files, the config and the tokenizer. Where
    ``embeddings_run_first_layer``, the ``embeddings`` segment (also ``depths[0].layer``) gives the state after the
    first layer, and that layer's ``exit_logits`` last."""

    model_type: str
    num_layers: int
    num_labels: int
    id2label: dict[str, str]
    task: str | None
    exit_pooling: str
    exit_head_type: str
    pad_token_id: int
    embeddings: str
    select_rows: str
    depths: list[DepthSegments]
    source_fingerprint: str
    int8: bool = False
    opset: int = OPSET
    exporter: str = EXPORTER
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    embeddings_run_first_layer: bool = False

    def save(self, folder: str) -> None:
        atomic_write_text(os.path.join(folder, MANIFEST_FILE), json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str) -> Manifest:
        path = os.path.join(folder, MANIFEST_FILE)
        if not os.path.isfile(path):
            raise UserInputError(f"{folder} has no {MANIFEST_FILE}: not an ONNX export of a multi-exit model (make one "
                                 f"with: python -m multiexit.onnx export CHECKPOINT {folder})")
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
        if data.get("format") != FORMAT or data.get("format_version") not in READABLE_VERSIONS:
            raise UserInputError(f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}; this "
                                 f"code reads {FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))}: export the "
                                 "checkpoint again")
        data["depths"] = [DepthSegments(**depth) for depth in data["depths"]]
        return cls(**data)


def fingerprint(model: nn.Module) -> str:
    """A hash of what the model computes: every tensor of its state dict (name, dtype, shape, bytes) and its config
    (without private and version fields). An export carries its source's, so that an export of the same weights is
    found and reused (``find_or_export``) whatever folder they were loaded from."""
    digest = hashlib.sha256()
    config = {key: value for key, value in model.config.to_diff_dict().items()
              if not key.startswith("_") and key != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The segments, as modules that call the torch model's own code
# --------------------------------------------------------------------------------------------------------------------


def additive_mask(layer_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layers' attention mask as transformers' ``eager_mask`` makes it from a boolean one: 0 where attended, the
    dtype's minimum elsewhere. Made once, in the embeddings segment: attention given a boolean mask converts it in
    every layer (a Where in each layer segment, which the stock graph, one graph, does once)."""
    if layer_mask.dtype != torch.bool:
        return layer_mask
    return torch.where(layer_mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


class _Embeddings(nn.Module):
    """The embeddings, and what every layer and exit then takes from the [batch, tokens] attention mask, made once as
    the torch model's ``_prepare`` makes it: the layers' attention mask, and mean-pooling exits' token weights. With
    ``first_layer``, the first layer and its exit too: the state after it, and its exit logits last."""

    def __init__(self, model: MultiExitMixin, first_layer: bool = False) -> None:
        super().__init__()
        self.model = model
        self.first_layer = _Segment(model, 0, layer=True, exit=True) if first_layer else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        hidden_states = self.model._embed(input_ids, token_type_ids, None, None)
        layer_mask = additive_mask(self.model._layer_mask(hidden_states, attention_mask), hidden_states.dtype)
        weights = self.model._token_weights(hidden_states, attention_mask)
        state = (hidden_states, layer_mask) + (() if weights is None else (weights.weights, weights.count))
        if self.first_layer is None:
            return state
        hidden_states, logits = self.first_layer(*state)
        return (hidden_states, *state[1:], logits)


class _Segment(nn.Module):
    """The layer at ``depth`` and/or its exit, on the pass's state (``hidden_states``, ``layer_mask`` and, for
    mean-pooling exits, ``token_weights`` and ``token_count``)."""

    def __init__(self, model: MultiExitMixin, depth: int, layer: bool, exit: bool) -> None:
        super().__init__()
        self.model, self.depth, self.runs_layer, self.runs_exit = model, depth, layer, exit
        self.modules_ = model.loop_modules()

    def forward(self, hidden_states: torch.Tensor, layer_mask: torch.Tensor,
                *token_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        if self.runs_layer:
            hidden_states = self.modules_.layers[self.depth](hidden_states, layer_mask)
            outputs.append(hidden_states)
        if self.runs_exit:
            weights = TokenWeights(*token_weights) if token_weights else None
            outputs.append(self.model._exit_logits(self.depth, hidden_states, weights, self.modules_))
        return tuple(outputs)


def export_module(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str, input_names: list[str],
                  output_names: list[str], opset: int = OPSET) -> None:
    """One module as one ONNX file, with this package's exporter and settings; the tensors are named from
    ``DYNAMIC_AXES`` (which says their dynamic axes). The segments are made with it, and so is the benchmark's stock
    model exported whole."""
    dynamic = {name: DYNAMIC_AXES[name] for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        # the TorchScript exporter's deprecation notice, and the tracer's notes on Python values it records as
        # constants (the sizes that dynamic_axes make dynamic again; the agreement check below proves the result)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module.eval(), inputs, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)


def _select_rows_model(embeddings_path: str, opset: int):  # noqa: ANN202 - an onnx.ModelProto
    """Gather the kept rows (axis 0) of every tensor of the pass's state, as the embeddings segment outputs them."""
    import onnx
    from onnx import TensorProto, helper

    state = [value for value in onnx.load(embeddings_path, load_external_data=False).graph.output
             if value.name != EXIT_LOGITS]
    kept = [helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type,
                                          ["kept"] + [dim.dim_param or dim.dim_value
                                                      for dim in value.type.tensor_type.shape.dim[1:]])
            for value in state]
    graph = helper.make_graph(
        [helper.make_node("Gather", [f"{value.name}_in", ROWS], [value.name], axis=0) for value in state],
        "select_rows",
        [helper.make_tensor_value_info(f"{value.name}_in", value.type.tensor_type.elem_type,
                                       [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim])
         for value in state] + [helper.make_tensor_value_info(ROWS, TensorProto.INT64, ["kept"])],
        kept,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="multiexit")


def _example_inputs(config: object, batch: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids that are never padding, a batch whose later rows are padded, segment ids of both kinds where the
    model has them."""
    generator = torch.Generator().manual_seed(seed)
    low = max(getattr(config, "pad_token_id", 0) or 0, 1) + 1
    input_ids = torch.randint(low, config.vocab_size, (batch, tokens), generator=generator)
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)
    for row in range(1, batch):
        attention_mask[row, max(1, tokens - 2 * row):] = 0
    token_type_ids = torch.zeros(batch, tokens, dtype=torch.long)
    if getattr(config, "type_vocab_size", 1) > 1:
        token_type_ids[:, tokens // 2:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def depth_segments(model: MultiExitMixin) -> tuple[list[DepthSegments], dict[int, list[int]]]:
    """The files of each depth, and the depths at which each distinct layer module runs (by first depth)."""
    layers = model.loop_modules().layers
    runs_at: dict[int, list[int]] = {}
    first_depth: dict[int, int] = {}
    for depth, layer in enumerate(layers):
        first = first_depth.setdefault(id(layer), depth)
        runs_at.setdefault(first, []).append(depth)
    groups = {first: index for index, first in enumerate(sorted(runs_at))}
    depths = []
    for depth, layer in enumerate(layers):
        first = first_depth[id(layer)]
        if len(runs_at[first]) == 1:
            depths.append(DepthSegments(f"layer_{depth}.onnx"))
        else:
            depths.append(DepthSegments(f"layer_group_{groups[first]}.onnx", f"exit_{depth}.onnx"))
    return depths, runs_at


def _first_layer_with_embeddings(depths: list[DepthSegments]) -> bool:
    """Whether the embeddings segment runs the first layer and its exit too: where that layer runs at depth 1 only
    (its own segment, the exit in it). Every input runs it, so a session run of its own would only add its
    overhead."""
    return depths[0].exit is None


def export_onnx(model: MultiExitMixin, output_dir: str, tokenizer: object = None, *, int8: bool = False,
                opset: int = OPSET, check: bool = True, progress: bool = True) -> str:
    """Write ``model`` (a multi-exit model; its weights are not changed) as ONNX segments into ``output_dir``, with its
    config, ``tokenizer`` (if given) and a manifest; returns ``output_dir``. The folder appears complete or not at all;
    an existing export there is replaced, any other non-empty folder refused.

    ``int8``: dynamic int8 quantisation of the embeddings and layers (``onnxruntime.quantization.quantize_dynamic``;
    the exit heads stay fp32). ``check``: run the export on a padded batch of another shape than the one traced and
    compare every exit's logits with the torch model's (``ATOL``, ``RTOL``; not for int8, which changes them)."""
    require("onnx")
    if not isinstance(model, MultiExitMixin):
        raise UserInputError(f"export_onnx exports a multi-exit model, got {type(model).__name__}")
    if os.path.isfile(output_dir):
        raise UserInputError(f"{output_dir} is a file; give a folder for the export")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(
            os.path.join(output_dir, MANIFEST_FILE)):
        raise UserInputError(f"{output_dir} is a non-empty folder that holds no export; choose a new or empty folder")
    parameter = next(model.parameters())
    was_training = model.training
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).to("cpu", torch.float32)  # the caller's model stays where it is
    model.eval()
    config = model.config
    depths, runs_at = depth_segments(model)
    first_layer = _first_layer_with_embeddings(depths)
    embeddings_file = EMBEDDINGS_AND_FIRST_LAYER_FILE if first_layer else EMBEDDINGS_FILE
    if first_layer:
        depths[0] = DepthSegments(embeddings_file)
    example = _example_inputs(config, 2, 8)
    try:
        with torch.no_grad(), atomic_directory(output_dir) as folder:
            steps = 1 + len(runs_at) + sum(1 for depth in depths if depth.exit is not None) + (not first_layer)
            bar = tqdm(total=steps, desc="onnx export", disable=not progress, leave=False)
            state = [HIDDEN_STATES, LAYER_MASK] + ([TOKEN_WEIGHTS, TOKEN_COUNT] if config.exit_pooling == "mean"
                                                   else [])
            embeddings_path = os.path.join(folder, embeddings_file)
            model_inputs = (example["input_ids"], example["token_type_ids"], example["attention_mask"])
            export_module(_Embeddings(model, first_layer), model_inputs, embeddings_path,
                          [INPUT_IDS, TOKEN_TYPE_IDS, ATTENTION_MASK], state + ([EXIT_LOGITS] if first_layer else []),
                          opset)
            bar.update()
            inputs = _Embeddings(model)(*model_inputs)  # the state that the layer segments are traced on
            exported = {embeddings_file}
            for depth, segments in enumerate(depths):
                if segments.layer not in exported:
                    fused = segments.exit is None
                    export_module(_Segment(model, depth, layer=True, exit=fused), inputs,
                                  os.path.join(folder, segments.layer), state,
                                  [LAYER_OUTPUT, EXIT_LOGITS] if fused else [LAYER_OUTPUT], opset)
                    exported.add(segments.layer)
                    bar.update()
                if segments.exit is not None:
                    export_module(_Segment(model, depth, layer=False, exit=True), inputs,
                                  os.path.join(folder, segments.exit), state, [EXIT_LOGITS], opset)
                    bar.update()
            import onnx

            onnx.save(_select_rows_model(embeddings_path, opset), os.path.join(folder, SELECT_ROWS_FILE))
            bar.update()
            bar.close()
            if int8:
                quantize_segments(folder, sorted(exported))
            config.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            manifest = Manifest(
                model_type=backbone_model_type(config), num_layers=len(depths), num_labels=config.num_labels,
                id2label={str(key): value for key, value in config.id2label.items()},
                task=getattr(config, "finetuning_task", None), exit_pooling=config.exit_pooling,
                exit_head_type=config.exit_head_type, pad_token_id=getattr(config, "pad_token_id", None) or 0,
                embeddings=embeddings_file, select_rows=SELECT_ROWS_FILE, depths=depths,
                source_fingerprint=fingerprint(model), int8=int8, opset=opset, versions=_versions(),
                embeddings_run_first_layer=first_layer,
            )
            if check and not int8:
                check_agreement(model, folder, manifest)
            manifest.save(folder)  # last: a folder with a manifest is a complete export
    finally:
        model.train(was_training)
    logger.info("exported %s segments to %s", len(os.listdir(output_dir)), output_dir)
    return output_dir


def quantize_segments(folder: str, files: list[str]) -> None:
    """Dynamic int8 quantisation of ``files`` in ``folder``, in place (:func:`quantize`)."""
    for name in files:
        quantize(os.path.join(folder, name))


def quantize(path: str, output_path: str | None = None) -> None:
    """Dynamic int8 quantisation of one ONNX file (in place without ``output_path``): the weights of its MatMuls stored
    as int8 (signed, per tensor), activations quantised on the fly; what ``onnxruntime.quantization.quantize_dynamic``
    does by default for transformer encoders."""
    require("onnxruntime.quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = output_path or path + ".int8"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run a pre-processing pass is meant for image models
    try:
        quantize_dynamic(path, output, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    if output_path is None:
        os.replace(output, path)


def _versions() -> dict[str, str]:
    import onnx

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of the package
        pass
    return versions


@torch.no_grad()
def check_agreement(model: MultiExitMixin, folder: str, manifest: Manifest) -> None:
    """Every exit's logits of the export on a padded batch of another shape than the one traced, against the torch
    model's: a size that tracing recorded as a constant, or a mask not honoured, fails here."""
    from multiexit.onnx.runtime import OnnxMultiExitModel

    example = _example_inputs(model.config, 3, 11, seed=1)
    expected = model(**example).all_logits
    runtime = OnnxMultiExitModel.from_pretrained(folder, manifest=manifest)
    found = runtime(**example).all_logits
    if not torch.allclose(found, expected, atol=ATOL, rtol=RTOL):
        worst = float((found - expected).abs().max())
        raise RuntimeError(f"the ONNX export of {type(model).__name__} disagrees with the torch model by up to "
                           f"{worst:.3g} on a padded batch (tolerance {ATOL} + {RTOL}·|logit|); please report it")


def find_or_export(model: MultiExitMixin, output_dir: str, tokenizer: object = None, *, int8: bool = False,
                   progress: bool = True) -> str:
    """``output_dir`` if it holds an export of these very weights (same fingerprint and options), else a new export
    there."""
    manifest_path = os.path.join(output_dir, MANIFEST_FILE)
    if os.path.isfile(manifest_path):
        try:
            manifest = Manifest.load(output_dir)
        except (UserInputError, TypeError, KeyError, ValueError):
            manifest = None
        if (manifest is not None and manifest.int8 == int8 and manifest.opset == OPSET
                and manifest.format_version == FORMAT_VERSION and manifest.source_fingerprint == fingerprint(model)):
            logger.info("reusing the ONNX export in %s (same weights)", output_dir)
            return output_dir
    return export_onnx(model, output_dir, tokenizer, int8=int8, progress=progress)
