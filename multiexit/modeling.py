"""What every multi-exit encoder shares: exit heads, the papers' losses, training stages and the one layer loop.

A concrete model (BERT, RoBERTa, ALBERT) subclasses its HF ``*PreTrainedModel`` together with
:class:`MultiExitMixin`, builds its backbone and supplies only what differs from a BERT-style encoder:

* ``_embed(input_ids, token_type_ids, position_ids, inputs_embeds)``: the embedding output fed to layer 1;
* ``_layers()``: the transformer layer (module) run at each depth, in order;
* ``_pretrained_pooler()``: the pretrained pooler's dense layer, which ``shared_pooler`` exits read through a tanh
  (None for a model without one).

The backbone is found through HF's ``base_model_prefix`` (``self.bert``, ``self.albert``, ...).

Everything else, including the forward, lives here once: :meth:`MultiExitMixin._exit_loop` runs the layers for
training, all-layer evaluation, batch-size-1 early exit and batched early exit alike.

Exit settings are config attributes (saved with ``save_pretrained``):

* ``exit_head_type``: ``shared_pooler`` (PABEE/PCEE: a Linear per layer on the model's pooled [CLS]), ``linear`` (a
  Linear per layer straight on the layer's token summary, no pooler),
  ``pooler`` (DeeBERT off-ramp: a pooler + Linear per layer, each pooler starting as a copy of the pretrained one),
  ``classification_head`` (RoBERTa's head shape, dense-tanh-dense on <s>, per layer), ``shared_exit`` (ELBERT: ONE
  exit, the model's pooler + a Linear, shared by every layer);
* ``exit_loss_weighting``: ``weighted`` (Σ i·Lᵢ / Σ i, default), ``uniform`` (mean of Lᵢ), ``learned``
  (ELBERT: Σ wᵢLᵢ with wᵢ = σ(tᵢ) for i < L, w_L = L − Σ_{i<L} wᵢ), ``final`` (last exit only);
* ``exit_learned_weight_init``: the initial tᵢ of ``learned`` (ELBERT: 4.0);
* ``exit_pooling``: what every exit reads from its layer: ``cls`` (the first token, as in all four papers; default)
  or ``mean`` (the mean over the real tokens). ``mean`` exists for checkpoints pre-trained with mean pooling, such as
  the sentence-transformers model all-MiniLM-L6-v2: its [CLS] state barely varies between inputs below layer 4, so
  [CLS] exits there cannot learn anything (docs/models.md has the probe that shows it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput

from multiexit.errors import UserInputError
from multiexit.policies import ExitPolicy, ExitTracker

EXIT_HEAD_TYPES = ("shared_pooler", "linear", "pooler", "classification_head", "shared_exit")
POOLED_HEAD_TYPES = ("shared_pooler", "shared_exit")  # heads that read the model's own pretrained pooler
EXIT_POOLINGS = ("cls", "mean")
DEFAULT_EXIT_POOLING = "cls"  # also what checkpoints saved before the setting existed were trained with
LOSS_WEIGHTINGS = ("weighted", "uniform", "learned", "final")
TRAINING_STAGES = ("joint", "deebert_stage1", "deebert_stage2")


EXIT_SETTINGS = ("exit_head_type", "exit_loss_weighting", "exit_learned_weight_init", "exit_pooling")


def set_exit_settings(config: PretrainedConfig, **exit_settings: object) -> None:
    """Apply exit settings given to a constructor (``from_pretrained(..., exit_loss_weighting="learned")``)."""
    unknown = set(exit_settings) - set(EXIT_SETTINGS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; exit settings are {', '.join(EXIT_SETTINGS)}")
    for key, value in exit_settings.items():
        if value is not None:
            setattr(config, key, value)


def default_exit_head(model_default: str, exit_pooling: str) -> str:
    """The model's default head (PABEE's ``shared_pooler`` for BERT/ALBERT), except that mean-pooled exits default to
    ``linear``: a pretrained pooler was trained on the [CLS] state, not on token means (the experiments behind the
    choice: results/exit_heads/README.md)."""
    if model_default == "shared_pooler" and exit_pooling == "mean":
        return "linear"
    return model_default


def configure_exits(config: PretrainedConfig, default_head_type: str) -> None:
    """Fill in and check the exit settings on ``config`` so that they are saved with it."""
    if getattr(config, "exit_pooling", None) is None:
        config.exit_pooling = DEFAULT_EXIT_POOLING
    if config.exit_pooling not in EXIT_POOLINGS:
        raise UserInputError(f"exit_pooling must be one of {', '.join(EXIT_POOLINGS)}, got {config.exit_pooling!r}")
    if getattr(config, "exit_head_type", None) is None:
        config.exit_head_type = default_exit_head(default_head_type, config.exit_pooling)
    if getattr(config, "exit_loss_weighting", None) is None:
        config.exit_loss_weighting = "weighted"
    if getattr(config, "exit_learned_weight_init", None) is None:
        config.exit_learned_weight_init = 4.0
    if config.exit_head_type not in EXIT_HEAD_TYPES:
        choices = ", ".join(EXIT_HEAD_TYPES)
        raise UserInputError(f"exit_head_type must be one of {choices}, got {config.exit_head_type!r}")
    if config.exit_loss_weighting not in LOSS_WEIGHTINGS:
        raise UserInputError(
            f"exit_loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {config.exit_loss_weighting!r}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Configs and HF's Auto classes
# --------------------------------------------------------------------------------------------------------------------

# The file save_pretrained writes beside the weights for ``trust_remote_code`` loading (multiexit/remote_code.py,
# copied verbatim), and the name config.json's ``auto_map`` gives it.
REMOTE_CODE_MODULE = "modeling_multiexit"


class MultiExitConfigMixin:
    """What a multi-exit config adds to its backbone's config (``MultiExitBertConfig(MultiExitConfigMixin,
    BertConfig)``): its own ``model_type`` (``multiexit_bert``; the backbone's is ``backbone_model_type``), under which
    HF's Auto classes find the multi-exit model, and ``keys_to_ignore_at_inference``, the outputs HF's ``Trainer``
    must not gather as predictions (layer first, or one value per batch). It adds no field: the exit settings stay
    plain attributes, set by the model (:func:`configure_exits`).

    A checkpoint of the backbone itself (``model_type: "bert"``: a stock pretrained model, or a multi-exit one saved
    before these classes existed) reads as a multi-exit config without the warning HF gives for another type."""

    model_type: ClassVar[str]
    backbone_model_type: ClassVar[str]
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["all_logits", "layer_losses"]

    @classmethod
    def get_config_dict(cls, *args: object, **kwargs: object) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == cls.backbone_model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Kept a no-op: config.json's ``auto_map`` always names :data:`REMOTE_CODE_MODULE`, which imports this class
        from the installed package. HF's default would make every later save copy the module defining the class
        (multiexit/bert.py) beside the weights and point ``auto_map`` at that copy instead; HF calls it when a
        checkpoint is loaded with ``trust_remote_code=True``."""


def backbone_model_type(config: PretrainedConfig) -> str:
    """The backbone's ``model_type`` (bert, roberta, albert) of a multi-exit config, or of a stock one."""
    return getattr(config, "backbone_model_type", config.model_type)


def takes_segment_ids(config: PretrainedConfig) -> bool:
    """Whether inputs carry segment ids (0 for the first text, 1 for the second): where the model has segment
    embeddings (BERT, ALBERT: ``type_vocab_size`` 2; RoBERTa: 1, which the seeds feed none), whatever a tokenizer
    returns by default (ALBERT's returns none in transformers 5, where the seeds feed ALBERT segment ids)."""
    return getattr(config, "type_vocab_size", 1) > 1


def register_auto_classes(config_class: type[PretrainedConfig], model_class: type) -> None:
    """Make ``AutoConfig`` and ``AutoModelForSequenceClassification`` load a checkpoint of ``config_class``'s
    ``model_type`` as ``model_class`` (done when :mod:`multiexit.bert` and :mod:`multiexit.albert` are imported)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForSequenceClassification.register(config_class, model_class, exist_ok=True)


@dataclass
class MultiExitOutput(ModelOutput):
    """``all_logits`` is [num_layers, batch, num_labels]; ``logits`` is the last layer's. ``layer_losses`` [L]
    are the unweighted per-exit losses (handy for logging). ``hidden_states`` has the embedding output followed by
    every layer's output, as in HF, when asked for. ``exit_logits`` is ``all_logits`` batch first, [batch, L,
    num_labels] (a view, no copy): what HF's ``Trainer`` gathers across batches, while the layer-first
    ``all_logits`` and the per-batch ``layer_losses`` are in the config's ``keys_to_ignore_at_inference``. It comes
    last so that the tuple positions of the fields before it stay what they were."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None
    layer_losses: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    exit_logits: torch.Tensor | None = None


@dataclass
class TokenWeights:
    """Mean-pooling exits' token weights [b, T, 1] (1 for real tokens, 0 for padding) and their count [b, 1]: computed
    once per input, not per layer."""

    weights: torch.Tensor
    count: torch.Tensor

    def select(self, rows: torch.Tensor) -> TokenWeights:
        return TokenWeights(self.weights.index_select(0, rows), self.count.index_select(0, rows))


@dataclass(frozen=True)
class LoopModules:
    """What the layer loop looks up at every depth, resolved once per pass. Finding a submodule through nn.Module's
    ``__getattr__`` chain and ``ModuleList`` indexing, or reading a config attribute, is a chain of Python lookups: a
    batch-size-1 pass would otherwise pay them at every layer, beside layers that are short on a GPU."""

    layers: list[nn.Module]  # layers[d]: the layer run at 0-indexed depth d
    heads: list[nn.Module]  # heads[d]: the exit after it
    pooling: str  # config.exit_pooling
    pooler: nn.Module | None  # the pretrained pooler's dense layer, when the heads read it (through a tanh)


class EarlyExitOutput(NamedTuple):
    """``logits`` [batch, num_labels] are each row's answer at its exit layer; ``exit_layers`` [batch] are 1-indexed.

    A named tuple, not an HF ``ModelOutput`` (which ``forward`` returns): batch-size-1 early exit builds one per input,
    and a ModelOutput's construction (its ``__post_init__`` and ``__setattr__`` look up the dataclass fields each
    time) costs more than a whole exit decision right after a pass of layers. Attribute access, indexing and
    unpacking (``logits, exit_layers = model.early_exit(...)``) work as on a ModelOutput's ``to_tuple()``."""

    logits: torch.Tensor
    exit_layers: torch.Tensor


# --------------------------------------------------------------------------------------------------------------------
# The layer loop's skeleton, one for every runtime
# --------------------------------------------------------------------------------------------------------------------


class LayerPass(Protocol):
    """One batch's way through the layers on some runtime, driven by :func:`run_layers`: the embeddings have run when
    it is made, and it holds the running rows' hidden states and masks in the runtime's own memory. Its drivers: the
    torch models (:meth:`MultiExitMixin._exit_loop`), the CUDA graphs (:mod:`multiexit.cuda_graphs`) and ONNX Runtime
    (:mod:`multiexit.onnx.runtime`)."""

    def layer(self, depth: int) -> None:
        """Run the layer at 0-indexed ``depth`` alone: its exit is not read."""

    def layer_and_exit(self, depth: int) -> torch.Tensor | np.ndarray:
        """Run the layer at ``depth`` and its exit; return the exit logits [rows, C] of the rows still running (for
        :class:`ExitTracker`: host memory, or a device tensor that its one read per layer copies; a numpy array is
        host memory)."""

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (host indices into the running rows, in order): the others have left."""


def run_layers(layer_pass: LayerPass, num_layers: int,
               tracker: ExitTracker | None = None) -> list[torch.Tensor | np.ndarray]:
    """The layer loop: every layer and its exit in turn. Without a ``tracker`` every layer runs on the whole batch
    and its exit logits are returned, layer by layer. With one, the tracker decides after each layer which rows exit;
    those leave the batch (``layer_pass.keep_rows``) and the loop stops when none is left. Below the tracker's first
    read layer (a budget's) the layers run alone, as in a model cut at that layer: no exit head, no read."""
    all_logits = []
    first_read = tracker.first_read_layer if tracker is not None else 1
    for depth in range(num_layers):
        if depth + 1 < first_read:
            layer_pass.layer(depth)
            continue
        logits = layer_pass.layer_and_exit(depth)
        if tracker is None:
            all_logits.append(logits)
            continue
        keep = tracker.update(logits, depth + 1)
        if keep is not None:  # some row exited (None, the usual answer, costs no other test)
            if tracker.done:
                break
            # row indices found on the host (the tracker decides there), so that selecting the rows needs no second
            # device-to-host sync, as a bool mask on the device would (its nonzero count)
            layer_pass.keep_rows(keep.nonzero()[:, 0])
    return all_logits


# --------------------------------------------------------------------------------------------------------------------
# Exit heads. Each takes the layer's token summary [b, H] ([CLS] or the token mean; for shared_pooler, the model's
# pretrained pooler applied to it) -> [b, C]
# --------------------------------------------------------------------------------------------------------------------


def _dropout(module: nn.Dropout, hidden: torch.Tensor) -> torch.Tensor:
    """``module(hidden)``, skipped in eval mode, where it is the identity: a module call costs microseconds, which
    batch-size-1 early exit pays at every layer."""
    return module(hidden) if module.training else hidden


class LinearExitHead(nn.Module):
    """PABEE/PCEE exit: dropout and a Linear on the pooled output of the model's one pretrained pooler."""

    def __init__(self, config: PretrainedConfig, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(_dropout(self.dropout, pooled))

    @property
    def output_layer(self) -> nn.Linear:
        return self.classifier


class DirectLinearExitHead(LinearExitHead):
    """``linear`` exit: dropout and a Linear applied directly to the layer's token summary ([CLS] or token mean).

    It is ``shared_pooler`` without the shared pretrained pooler (dense + tanh) that every PABEE exit reads through.
    Where that pooler was never trained (all-MiniLM-L6-v2's is a random projection with a gain of about 0.2, as
    sentence-transformers trained it with mean pooling), it shrinks what the exits see and ties every exit to the same
    weights: on STS-B, joint training through it flattened the backbone's representations."""


class PoolerExitHead(nn.Module):
    """DeeBERT off-ramp: its own pooler (dense + tanh on [CLS]), dropout and a Linear."""

    def __init__(self, config: PretrainedConfig, dropout: float) -> None:
        super().__init__()
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(_dropout(self.dropout, torch.tanh(self.pooler(cls_hidden))))

    @property
    def output_layer(self) -> nn.Linear:
        return self.classifier


class ClassificationHeadExit(nn.Module):
    """RobertaClassificationHead's shape (dropout, dense, tanh, dropout, out_proj on <s>), one per layer."""

    def __init__(self, config: PretrainedConfig, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        hidden = _dropout(self.dropout, torch.tanh(self.dense(_dropout(self.dropout, cls_hidden))))
        return self.out_proj(hidden)

    @property
    def output_layer(self) -> nn.Linear:
        return self.out_proj


EXIT_HEAD_CLASSES: dict[str, type[nn.Module]] = {
    "shared_pooler": LinearExitHead,
    "linear": DirectLinearExitHead,
    "pooler": PoolerExitHead,
    "classification_head": ClassificationHeadExit,
    "shared_exit": LinearExitHead,  # one module for every layer (see MultiExitMixin.exit_head)
}


class ExitLossWeights(nn.Module):
    """ELBERT's learnable loss weights: wᵢ = σ(tᵢ) for i < L and w_L = L − Σ_{i<L} wᵢ.

    Because σ < 1, w_L > 1 always in exact arithmetic; the clamp only guards against rounding, so that the last
    exit can never lose its weight (PCEE's ``desc`` bug gave it weight 0)."""

    def __init__(self, num_layers: int, initial_logit: float) -> None:
        super().__init__()
        self.initial_logit = initial_logit
        self.logits = nn.Parameter(torch.full((num_layers - 1,), float(initial_logit)))

    def forward(self) -> torch.Tensor:
        intermediate = torch.sigmoid(self.logits)
        last = (len(self.logits) + 1 - intermediate.sum()).clamp(min=1e-3)
        return torch.cat([intermediate, last[None]])


def per_layer_losses(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unweighted loss of every exit, [L]: cross-entropy over the rows whose label is not -100 (HF's ignore index),
    or MSE for regression (num_labels == 1)."""
    num_layers, batch_size, num_labels = all_logits.shape
    if labels.numel() != batch_size:
        raise ValueError(f"expected one label per row ({batch_size}), got labels of shape {tuple(labels.shape)}: "
                         "multi-label and multi-output regression are not supported by the exits' losses")
    if num_labels == 1:
        predictions = all_logits[..., 0].float()
        target = labels.to(predictions.dtype).view(1, batch_size).expand(num_layers, -1)
        return ((predictions - target) ** 2).mean(dim=1)
    if labels.is_floating_point():
        raise ValueError(f"classification ({num_labels} labels) needs integer class labels, got {labels.dtype}")
    flat_logits = all_logits.float().reshape(num_layers * batch_size, num_labels)
    flat_labels = labels.view(1, batch_size).expand(num_layers, -1).reshape(-1)
    losses = nn.functional.cross_entropy(flat_logits, flat_labels, reduction="none").view(num_layers, batch_size)
    counted = (labels.view(-1) != -100).sum().clamp(min=1)  # cross_entropy's mean: ignored rows count for nothing
    return losses.sum(dim=1) / counted


def fixed_loss_weights(weighting: str, num_layers: int) -> torch.Tensor:
    """The non-learned weightings as a [L] tensor (``deebert_stage2`` sums the off-ramps 1..L−1, as DeeBERT)."""
    depth = torch.arange(1, num_layers + 1, dtype=torch.float32)
    if weighting == "weighted":
        return depth / depth.sum()
    if weighting == "uniform":
        return torch.full((num_layers,), 1.0 / num_layers)
    if weighting == "final":
        return (depth == num_layers).float()
    if weighting == "ramps":
        return (depth < num_layers).float()
    raise ValueError(f"no fixed weights for {weighting!r}")


# --------------------------------------------------------------------------------------------------------------------
# The mixin with the one loop
# --------------------------------------------------------------------------------------------------------------------


class MultiExitMixin:
    """Shared multi-exit behaviour. Must come before the HF ``*PreTrainedModel`` in the bases; the model's
    ``config_class`` is its :class:`MultiExitConfigMixin` config."""

    config: PretrainedConfig
    default_exit_head_type: str = "shared_pooler"
    # HF's Trainer passes ``num_items_in_batch`` to a forward that takes **kwargs and then leaves the loss unscaled by
    # gradient accumulation, trusting the model to normalise it; this loss is a mean per batch like any other
    accepts_loss_kwargs = False

    # ---- what a model supplies (the defaults fit BERT-style encoders: embeddings + encoder.layer) -----------------
    def _backbone(self) -> nn.Module:
        """The pretrained encoder (``self.bert``, ``self.roberta``, ...), named by HF's ``base_model_prefix``."""
        return getattr(self, self.base_model_prefix)

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The input of layer 1."""
        return self._backbone().embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )

    def _layers(self) -> list[nn.Module]:
        """The transformer layer run at each depth, in order."""
        return list(self._backbone().encoder.layer)

    def _pool(self, summary: torch.Tensor, pooler: nn.Module | None = None) -> torch.Tensor:
        """The pretrained pooler (dense + tanh, as BERT's and ALBERT's) applied to a [b, H] token summary, for
        ``shared_pooler`` exits; ``pooler``: its dense layer when already resolved (the exit loop's LoopModules)."""
        return torch.tanh((self._required_pooler() if pooler is None else pooler)(summary))

    def _required_pooler(self) -> nn.Linear:
        pooler = self._pretrained_pooler()
        if pooler is None:
            raise NotImplementedError(f"{type(self).__name__} has no pretrained pooler; use another exit_head_type")
        return pooler

    # ---- construction -----------------------------------------------------------------------------------------------
    def _init_exits(self, dropout: float, exit_settings: dict[str, object]) -> None:
        """Build one exit head per layer (and ELBERT's weights) from the config's exit settings, after applying
        those given to the constructor (``from_pretrained(..., exit_loss_weighting="learned")``)."""
        self._adopt_config()
        set_exit_settings(self.config, **exit_settings)
        configure_exits(self.config, self.default_exit_head_type)
        head_class = EXIT_HEAD_CLASSES[self.config.exit_head_type]
        # ELBERT's config ``num_exit_layers: 1``: one exit serves every layer; otherwise one exit per layer
        num_heads = 1 if self.config.exit_head_type == "shared_exit" else self.num_exit_layers
        self.exits = nn.ModuleList([head_class(self.config, dropout) for _ in range(num_heads)])
        self.exit_loss_weights = (
            ExitLossWeights(self.num_exit_layers, self.config.exit_learned_weight_init)
            if self.config.exit_loss_weighting == "learned"
            else None
        )
        self.set_training_stage("joint")

    def _adopt_config(self) -> None:
        """Make the config this model's multi-exit config, as the constructor already writes its exit settings into
        it: a stock config of the backbone (``BertConfig``, as :func:`multiexit.tiny.tiny_config` builds) becomes an
        instance of the subclass (same object, same values: the subclass adds no field), so that the model saves as
        a multi-exit checkpoint. ``auto_map`` names the code :meth:`save_pretrained` writes beside the weights."""
        config_class = type(self).config_class
        stock_class = type(self.config)
        if stock_class is not config_class and issubclass(config_class, stock_class) \
                and stock_class.model_type == config_class.backbone_model_type:
            self.config.__class__ = config_class
        self.config.auto_map = {
            "AutoConfig": f"{REMOTE_CODE_MODULE}.{type(self.config).__name__}",
            "AutoModelForSequenceClassification": f"{REMOTE_CODE_MODULE}.{type(self).__name__}",
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *args: object, is_main_process: bool = True,
                        **kwargs: object) -> None:
        """HF's ``save_pretrained``, with :data:`REMOTE_CODE_MODULE` written beside config.json, so that the folder
        (or its copy on the hub) loads through the Auto classes with ``trust_remote_code=True`` wherever this package
        is installed, without importing it first. Written before the weights, so that ``push_to_hub=True``
        uploads it too."""
        if is_main_process:
            from multiexit import remote_code

            os.makedirs(save_directory, exist_ok=True)
            shutil.copyfile(remote_code.__file__, os.path.join(save_directory, f"{REMOTE_CODE_MODULE}.py"))
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """A no-op, as :meth:`MultiExitConfigMixin.register_for_auto_class` (HF calls it when a checkpoint is loaded
        with ``trust_remote_code=True``)."""

    @classmethod
    def from_pretrained(cls, *args: object, **kwargs: object):  # noqa: ANN206 - the model, or (model, loading info)
        """HF's ``from_pretrained``; then, as DeeBERT's ``init_highway_pooler`` (castorini/DeeBERT,
        transformers/modeling_highway_bert.py, called by examples/run_highway_glue.py after loading), every ``pooler``
        exit that the checkpoint did not have starts as a copy of the pretrained pooler instead of at random."""
        want_info = bool(kwargs.pop("output_loading_info", False))
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model._copy_pretrained_pooler_into_new_exits(set(loading_info["missing_keys"]))
        # transformers rebuilds loaded parameters with requires_grad=True: freeze again the exits this stage and
        # weighting leave untrained ("final"), or weight decay would move them
        model.set_training_stage(model.training_stage)
        return (model, loading_info) if want_info else model

    def _pretrained_pooler(self) -> nn.Linear | None:
        """The backbone's pretrained pooler dense layer (None for models without one, e.g. RoBERTa here)."""
        return None

    @torch.no_grad()
    def _copy_pretrained_pooler_into_new_exits(self, missing_keys: set[str]) -> None:
        pooler = self._pretrained_pooler()
        if self.config.exit_head_type != "pooler" or pooler is None:
            return
        if any(key.endswith(("pooler.dense.weight", "pooler.weight")) and not key.startswith("exits.")
               for key in missing_keys):
            return  # the checkpoint has no trained pooler either: nothing better than the random start
        for depth, head in enumerate(self.exits):
            if f"exits.{depth}.pooler.weight" in missing_keys:
                head.pooler.weight.copy_(pooler.weight)
                head.pooler.bias.copy_(pooler.bias)

    @property
    def num_exit_layers(self) -> int:
        return self.config.num_hidden_layers

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ExitLossWeights):
            init.constant_(module.logits, module.initial_logit)

    # ---- training stages --------------------------------------------------------------------------------------------
    def set_training_stage(self, stage: str) -> None:
        """``joint``: every exit with the config's weighting. ``deebert_stage1``: backbone + final exit only.
        ``deebert_stage2``: backbone and final exit truly frozen (requires_grad=False, dropout off, no autograd
        graph through the layers); only the off-ramps 1..L−1 train, on the sum of their losses."""
        if stage not in TRAINING_STAGES:
            raise UserInputError(f"training stage must be one of {', '.join(TRAINING_STAGES)}, got {stage!r}")
        if stage.startswith("deebert") and len(self.exits) == 1:
            raise UserInputError("DeeBERT's two stages train the final exit, then the others with it frozen: that "
                                 "needs an exit per layer, not exit_head_type 'shared_exit'")
        self.training_stage = stage
        self._backbone().requires_grad_(stage != "deebert_stage2")
        # an exit with loss weight 0 in this stage must not move at all: with requires_grad=False it is left out of
        # the optimizer, so not even weight decay touches it (zero gradients alone would not stop AdamW's decay)
        trained = self._exits_trained_in_stage()
        if len(self.exits) == 1:  # one shared exit trains if any layer's loss counts
            trained = [any(trained)]
        for head, trains in zip(self.exits, trained):
            head.requires_grad_(trains)
        self.train(self.training)  # re-apply the dropout rule below

    def _exits_trained_in_stage(self) -> list[bool]:
        """Which exits have a non-zero loss weight now (decided without reading parameters: they may be on meta)."""
        last = self.num_exit_layers - 1
        if self.training_stage == "deebert_stage2":
            return [depth != last for depth in range(self.num_exit_layers)]
        if self.training_stage == "deebert_stage1" or self.config.exit_loss_weighting == "final":
            return [depth == last for depth in range(self.num_exit_layers)]
        return [True] * self.num_exit_layers

    @property
    def backbone_frozen(self) -> bool:
        return self.training_stage == "deebert_stage2"

    def train(self, mode: bool = True):  # noqa: ANN201 - same signature as nn.Module.train
        super().train(mode)
        if self.backbone_frozen:
            self._backbone().eval()
            self.exits[-1].eval()
        return self

    def loss_weights(self) -> torch.Tensor:
        """The [L] weights the current stage and weighting put on each exit's loss."""
        if self.training_stage == "deebert_stage1":
            return fixed_loss_weights("final", self.num_exit_layers)
        if self.training_stage == "deebert_stage2":
            return fixed_loss_weights("ramps", self.num_exit_layers)
        if self.config.exit_loss_weighting == "learned":
            return self.exit_loss_weights()
        return fixed_loss_weights(self.config.exit_loss_weighting, self.num_exit_layers)

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def _prepare(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, TokenWeights | None]:
        """The input of layer 1, the attention mask every layer uses, and what mean-pooling exits weigh tokens by.

        A mask without padding is dropped (as the stock model does) only where that costs no synchronisation: when it is
        on the CPU, whose all-ones test is a host read, or absent. There the layers run without a mask, which is faster
        (no mask to build and apply in every layer) and gives the same bits on CPU: SDPA with an all-true mask and
        without one agree exactly, forward and backward. A mask on a GPU is always materialised: testing it would read
        it on the host, a synchronisation per input that batch-size-1 early exit cannot afford (and that a CUDA-graph
        capture forbids), and it keeps every pass on the masked kernels that the padded batches it is compared with
        use."""
        hidden_states = self._embed(input_ids, token_type_ids, position_ids, inputs_embeds)
        if attention_mask is None or (attention_mask.device.type == "cpu" and attention_mask.dim() == 2
                                      and attention_mask.numpy().all()):  # numpy: host memory, no torch op
            mask = None
        else:
            mask = self._layer_mask(hidden_states, attention_mask)
        return hidden_states, mask, self._token_weights(hidden_states, attention_mask)

    def _layer_mask(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask every layer's attention takes, made from the [b, T] attention mask (always materialised: the
        embeddings segment of :mod:`multiexit.onnx` makes it with this same call, with the token weights below)."""
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states,
                                         attention_mask=attention_mask, allow_is_bidirectional_skip=False)

    def _token_weights(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> TokenWeights | None:
        """What mean-pooling exits weigh tokens by (None for [CLS] exits, or without a mask: every token counts)."""
        if self.config.exit_pooling != "mean" or attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError("exit_pooling 'mean' weighs tokens by a 2-D attention mask [batch, tokens]; got a "
                             f"{attention_mask.dim()}-D mask")
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # [b, T, 1]
        return TokenWeights(weights, weights.sum(dim=1).clamp(min=1.0))

    @staticmethod
    def _token_summary(hidden_states: torch.Tensor, token_weights: TokenWeights | None, pooling: str) -> torch.Tensor:
        """What an exit reads from a layer's [b, T, H] output: the first token, or the mean over real tokens."""
        if pooling == "cls":
            return hidden_states[:, 0]
        if token_weights is None:
            return hidden_states.mean(dim=1)
        return (hidden_states * token_weights.weights).sum(dim=1) / token_weights.count

    @torch.no_grad()
    def set_exit_output_bias(self, value: float | Sequence[float]) -> None:
        """Start every exit's prediction at ``value``: its output layer's bias (the weights are untouched), one number
        (regression) or one per class. For a regression task, the training labels' mean: exits that start at 0 ask the
        backbone for the whole label offset first, and jointly trained exits then flatten its representations
        (results/exit_heads/README.md traces it on STS-B). For classification, the log class frequencies start every
        exit at the prior."""
        for head in self.exits:
            bias = head.output_layer.bias
            bias.copy_(torch.as_tensor(value, dtype=bias.dtype).expand_as(bias))

    def _layer_at(self, depth: int) -> nn.Module:
        """The transformer layer run at 0-indexed ``depth``."""
        return self._layers()[depth]

    def exit_head(self, depth: int) -> nn.Module:
        """The exit after 0-indexed layer ``depth`` (the same module for every layer with ``shared_exit``)."""
        return self.exits[depth if len(self.exits) > 1 else 0]

    def loop_modules(self) -> LoopModules:
        """The layers, exit heads and exit settings of one pass (see :class:`LoopModules`)."""
        layers, heads = self._layers(), list(self.exits)
        pooler = self._required_pooler() if self.config.exit_head_type in POOLED_HEAD_TYPES else None
        return LoopModules(layers, heads if len(heads) > 1 else heads * len(layers), self.config.exit_pooling, pooler)

    def _exit_logits(self, depth: int, hidden_states: torch.Tensor, token_weights: TokenWeights | None,
                     modules: LoopModules) -> torch.Tensor:
        summary = self._token_summary(hidden_states, token_weights, modules.pooling)
        if modules.pooler is not None:
            summary = self._pool(summary, modules.pooler)
        return modules.heads[depth](summary)

    def _layer_step(self, depth: int, hidden_states: torch.Tensor, mask: torch.Tensor | None,
                    token_weights: TokenWeights | None, modules: LoopModules) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``depth`` (0-indexed) and its exit: the unit that the loop runs, and that a CUDA graph captures."""
        hidden_states = modules.layers[depth](hidden_states, mask)
        return hidden_states, self._exit_logits(depth, hidden_states, token_weights, modules)

    def _exit_loop(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        tracker: ExitTracker | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the layers one by one (:func:`run_layers`, driven by a :class:`_TorchLayerPass`), computing every
        exit's logits.

        Without a ``tracker`` every layer runs on the whole batch and the per-layer logits (and hidden states, if
        asked) are returned. With one, the tracker decides after each layer which rows exit; those rows leave the
        batch (hidden states and masks are compacted) and the loop stops when none is left."""
        # a frozen backbone (DeeBERT stage 2) runs without autograd; the exit heads keep the caller's grad mode
        backbone_grad = torch.is_grad_enabled() and not self.backbone_frozen
        with torch.set_grad_enabled(backbone_grad):
            hidden_states, mask, token_weights = self._prepare(
                input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        layer_pass = _TorchLayerPass(self, hidden_states, mask, token_weights, backbone_grad, output_hidden_states)
        all_logits = run_layers(layer_pass, len(layer_pass.modules.layers), tracker)
        return all_logits, layer_pass.all_hidden or []

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> MultiExitOutput | tuple:
        """All exits in one pass. ``loss`` follows the training stage and the config's loss weighting.

        ``output_hidden_states`` and ``return_dict`` default to the config's, as in HF; as a tuple the output is
        (loss, logits, all_logits, layer_losses, hidden_states), the entries that are not None."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by the multi-exit models")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        layer_logits, hidden_states = self._exit_loop(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
        )
        all_logits = torch.stack(layer_logits)
        loss = layer_losses = None
        if labels is not None:
            layer_losses = per_layer_losses(all_logits, labels)
            loss = (self.loss_weights().to(layer_losses.device) * layer_losses).sum()
        output = MultiExitOutput(
            loss=loss,
            logits=all_logits[-1],
            all_logits=all_logits,
            layer_losses=layer_losses,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            exit_logits=all_logits.transpose(0, 1),
        )
        return output if return_dict is not False else output.to_tuple()

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy, pickling) leaves the CUDA graphs behind, which cannot be copied and would replay the
        # original's memory, and the validated-policy cache; the copy makes its own on first use
        state = super().__getstate__()
        state.pop("_exit_graphs", None)
        state.pop("_validated_policy", None)
        return state

    def exit_graphs(self, buckets: tuple[int, ...] | None = None, capture: bool | None = None):  # noqa: ANN201
        """The model's :class:`multiexit.cuda_graphs.ExitGraphs` (made on first use, for the device the model is on)."""
        from multiexit.cuda_graphs import DEFAULT_BUCKETS, ExitGraphs

        # a captured graph replays the memory it was captured on: a new graph set when the weights moved (.to(),
        # .half(), a round trip through the CPU), dropout switched, or the exits read differently
        first, last = next(self.parameters()), next(self.exits[-1].parameters())
        key = (first.device, first.dtype, first.data_ptr(), last.data_ptr(), self.training, self.config.exit_pooling)
        cached_key, graphs = getattr(self, "_exit_graphs", (None, None))
        if cached_key != key or buckets is not None or capture is not None:
            graphs = ExitGraphs(self, buckets or DEFAULT_BUCKETS, capture)
            object.__setattr__(self, "_exit_graphs", (key, graphs))  # not a submodule: no state dict, no .to()
        return graphs

    def early_exit(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        policy: ExitPolicy | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cuda_graphs: bool = False,
    ) -> EarlyExitOutput:
        """Real early exit: layers stop running for each row as soon as ``policy`` lets it exit.

        At batch size 1 this is the seeds' inference mode; for larger batches exited rows leave the batch, so each
        row gets exactly the exit layer and answer it would get alone. ``cuda_graphs`` (batch size 1 on a GPU) replays
        each layer and its exit from a CUDA graph captured per sequence-length bucket (:mod:`multiexit.cuda_graphs`)."""
        if torch.is_grad_enabled():
            # early exit never trains. An eval loop calls it in no_grad or inference mode already; there it skips the
            # context manager, which a decorator would enter per input, right after a pass of layers (cold caches)
            with torch.no_grad():
                return self.early_exit(input_ids, attention_mask, token_type_ids, policy, position_ids, inputs_embeds,
                                       cuda_graphs)
        if policy is None:
            raise ValueError("early_exit needs an ExitPolicy")
        # a batch-size-1 sweep calls this once per input with the same policy: validate it (and read the config)
        # once, not per input, where right after a pass of layers every lookup is a cache miss
        validated = self.__dict__.get("_validated_policy")
        if validated is None or validated[0] is not policy:
            policy.validate(self.config.num_labels, self.num_exit_layers)
            validated = self.__dict__["_validated_policy"] = (policy, self.num_exit_layers)
        reference = input_ids if input_ids is not None else inputs_embeds
        tracker = ExitTracker(policy, reference.shape[0], validated[1])
        if cuda_graphs and reference.shape[0] == 1 and input_ids is not None and position_ids is None:
            self.exit_graphs().run(input_ids, attention_mask, token_type_ids, tracker)
        else:
            self._exit_loop(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, tracker=tracker)
        answer, exit_layers = tracker.answer, tracker.exit_layer
        if not reference.is_cpu:  # the tracker's results are on the host
            answer, exit_layers = answer.to(reference.device), exit_layers.to(reference.device)
        return EarlyExitOutput(logits=answer, exit_layers=exit_layers)


class _TorchLayerPass:
    """The torch models' :class:`LayerPass`: the running rows' hidden states, attention mask and token weights, and
    the layers and exits of the pass (:class:`LoopModules`, resolved once). A frozen backbone (DeeBERT stage 2) runs
    its layers without autograd while the exit heads keep the caller's grad mode."""

    __slots__ = ("model", "modules", "hidden_states", "mask", "token_weights", "backbone_grad", "switch_grad",
                 "all_hidden")

    def __init__(self, model: MultiExitMixin, hidden_states: torch.Tensor, mask: torch.Tensor | None,
                 token_weights: TokenWeights | None, backbone_grad: bool, output_hidden_states: bool) -> None:
        self.model, self.modules = model, model.loop_modules()
        self.hidden_states, self.mask, self.token_weights = hidden_states, mask, token_weights
        self.backbone_grad = backbone_grad
        # no context manager per layer when nothing changes
        self.switch_grad = backbone_grad != torch.is_grad_enabled()
        self.all_hidden = [hidden_states] if output_hidden_states else None

    def layer(self, depth: int) -> None:
        with torch.set_grad_enabled(self.backbone_grad):
            self.hidden_states = self.modules.layers[depth](self.hidden_states, self.mask)

    def layer_and_exit(self, depth: int) -> torch.Tensor:
        if self.switch_grad:
            self.layer(depth)
            logits = self.model._exit_logits(depth, self.hidden_states, self.token_weights, self.modules)
        else:
            self.hidden_states, logits = self.model._layer_step(depth, self.hidden_states, self.mask,
                                                                self.token_weights, self.modules)
        if self.all_hidden is not None:
            self.all_hidden.append(self.hidden_states)
        return logits

    def keep_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.hidden_states.device, non_blocking=True)
        self.hidden_states = self.hidden_states.index_select(0, rows)
        self.mask = self.mask.index_select(0, rows) if self.mask is not None else None
        self.token_weights = self.token_weights.select(rows) if self.token_weights is not None else None
