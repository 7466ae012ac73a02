"""Multi-exit ALBERT for sequence classification.

ALBERT shares its layer weights: depth i runs layer group ``int(i / (L / G))`` (G = ``num_hidden_groups``), as
the stock ``AlbertTransformer`` does, while every depth gets its own exit head. The layer loop, heads and losses
live in :mod:`multiexit.modeling`. Its config is ALBERT's with its own ``model_type`` (``multiexit_albert``),
registered with HF's ``AutoConfig`` and ``AutoModelForSequenceClassification`` when this module is imported.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AlbertConfig, AlbertModel, AlbertPreTrainedModel

from multiexit.modeling import MultiExitConfigMixin, MultiExitMixin, register_auto_classes

__all__ = [
    "MultiExitAlbertConfig",
    "MultiExitAlbertForSequenceClassification",
]


class MultiExitAlbertConfig(MultiExitConfigMixin, AlbertConfig):
    """``AlbertConfig`` of a multi-exit ALBERT (exit settings: see :mod:`multiexit.modeling`)."""

    model_type = "multiexit_albert"
    backbone_model_type = "albert"


class MultiExitAlbertForSequenceClassification(MultiExitMixin, AlbertPreTrainedModel):
    """ALBERT with an exit after each depth. Default exits: PABEE's Linear heads on ALBERT's pretrained pooler."""

    config_class = MultiExitAlbertConfig
    default_exit_head_type = "shared_pooler"

    def __init__(self, config: AlbertConfig, **exit_settings: object) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = AlbertModel(config, add_pooling_layer=True)
        self._init_exits(config.classifier_dropout_prob, exit_settings)
        self.post_init()

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        # ALBERT's embeddings are smaller than its hidden size; the encoder maps them up before layer 1
        embeddings = super()._embed(input_ids, token_type_ids, position_ids, inputs_embeds)
        return self.albert.encoder.embedding_hidden_mapping_in(embeddings)

    def _layers(self) -> list[nn.Module]:
        groups = list(self.albert.encoder.albert_layer_groups)
        layers_per_group = self.config.num_hidden_layers / self.config.num_hidden_groups
        return [groups[int(depth / layers_per_group)] for depth in range(self.config.num_hidden_layers)]

    def _pretrained_pooler(self) -> nn.Linear:
        return self.albert.pooler  # AlbertModel: this pooler, then pooler_activation, Tanh


register_auto_classes(MultiExitAlbertConfig, MultiExitAlbertForSequenceClassification)
