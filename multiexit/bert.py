"""Multi-exit BERT and RoBERTa for sequence classification: an exit head after every layer.

Both subclass the stock HF classes and keep their module names (``bert.*`` / ``roberta.*``), so any stock
checkpoint (``BertModel``, ``BertForSequenceClassification``, ...) loads with its backbone weights and freshly
initialised exits, and a stock ``BertModel`` can load the backbone of our checkpoints (HF warns that the checkpoint's
type, ``multiexit_bert``, is not ``bert``). The layer loop, the heads and the losses live in
:mod:`multiexit.modeling`; its defaults for embeddings and layers fit both models as they are.

Their configs are the stock ones with their own ``model_type`` (``multiexit_bert``, ``multiexit_roberta``), registered
with HF's ``AutoConfig`` and ``AutoModelForSequenceClassification`` when this module is imported.
"""

from __future__ import annotations

from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel, RobertaConfig, RobertaModel, RobertaPreTrainedModel

from multiexit.modeling import MultiExitConfigMixin, MultiExitMixin, register_auto_classes

__all__ = [
    "MultiExitBertConfig",
    "MultiExitBertForSequenceClassification",
    "MultiExitRobertaConfig",
    "MultiExitRobertaForSequenceClassification",
]


class MultiExitBertConfig(MultiExitConfigMixin, BertConfig):
    """``BertConfig`` of a multi-exit BERT (exit settings: see :mod:`multiexit.modeling`)."""

    model_type = "multiexit_bert"
    backbone_model_type = "bert"


class MultiExitRobertaConfig(MultiExitConfigMixin, RobertaConfig):
    """``RobertaConfig`` of a multi-exit RoBERTa (exit settings: see :mod:`multiexit.modeling`)."""

    model_type = "multiexit_roberta"
    backbone_model_type = "roberta"


def _classifier_dropout(config: BertConfig | RobertaConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class MultiExitBertForSequenceClassification(MultiExitMixin, BertPreTrainedModel):
    """BERT with an exit after each of its layers. Default exits: PABEE's Linear heads on the shared pooler."""

    config_class = MultiExitBertConfig
    default_exit_head_type = "shared_pooler"

    def __init__(self, config: BertConfig, **exit_settings: object) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        self._init_exits(_classifier_dropout(config), exit_settings)
        self.post_init()

    def _pretrained_pooler(self) -> nn.Linear:
        return self.bert.pooler.dense  # BertPooler: this dense, then its activation, Tanh


class MultiExitRobertaForSequenceClassification(MultiExitMixin, RobertaPreTrainedModel):
    """RoBERTa with an exit after each layer. RoBERTa classification checkpoints have no pretrained pooler, so the
    default exit is RoBERTa's own classification-head shape, one per layer."""

    config_class = MultiExitRobertaConfig
    default_exit_head_type = "classification_head"

    def __init__(self, config: RobertaConfig, **exit_settings: object) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self._init_exits(_classifier_dropout(config), exit_settings)
        self.post_init()


register_auto_classes(MultiExitBertConfig, MultiExitBertForSequenceClassification)
register_auto_classes(MultiExitRobertaConfig, MultiExitRobertaForSequenceClassification)
