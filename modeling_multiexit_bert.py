"""Multi-exit BERT and RoBERTa for sequence classification: an exit head after every layer.

Both subclass the stock HF classes and keep their module names (``bert.*`` / ``roberta.*``), so any stock
checkpoint (``BertModel``, ``BertForSequenceClassification``, ...) loads with its backbone weights and freshly
initialised exits, and a stock ``BertModel`` can load the backbone of our checkpoints. The layer loop, the heads and
the losses live in :mod:`modeling_multiexit`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel, RobertaConfig, RobertaModel, RobertaPreTrainedModel

from modeling_multiexit import MultiExitMixin, set_exit_settings


def _classifier_dropout(config: BertConfig | RobertaConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class MultiExitBertForSequenceClassification(MultiExitMixin, BertPreTrainedModel):
    """BERT with an exit after each of its layers. Default exits: PABEE's Linear heads on the shared pooler."""

    default_exit_head_type = "shared_pooler"

    def __init__(self, config: BertConfig, **exit_settings: object) -> None:
        super().__init__(config)
        set_exit_settings(config, **exit_settings)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        self._init_exits(_classifier_dropout(config))
        self.post_init()

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.bert.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )

    def _layer_at(self, depth: int) -> nn.Module:
        return self.bert.encoder.layer[depth]

    def _pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bert.pooler(hidden_states)

    def _backbone(self) -> nn.Module:
        return self.bert


class MultiExitRobertaForSequenceClassification(MultiExitMixin, RobertaPreTrainedModel):
    """RoBERTa with an exit after each layer. RoBERTa classification checkpoints have no pretrained pooler, so the
    default exit is RoBERTa's own classification-head shape, one per layer."""

    default_exit_head_type = "classification_head"

    def __init__(self, config: RobertaConfig, **exit_settings: object) -> None:
        super().__init__(config)
        set_exit_settings(config, **exit_settings)
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self._init_exits(_classifier_dropout(config))
        self.post_init()

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.roberta.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )

    def _layer_at(self, depth: int) -> nn.Module:
        return self.roberta.encoder.layer[depth]

    def _backbone(self) -> nn.Module:
        return self.roberta
