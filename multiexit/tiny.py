"""Tiny random BERT, RoBERTa and ALBERT models: the one factory that tests, benchmarks and examples build them with.

A tiny model has a hidden size of 32 and two attention heads, so a pass takes well under a millisecond on a CPU and a
test can run hundreds of them. Every size is set for ALBERT too, whose config defaults are xxlarge's.
"""

from __future__ import annotations

import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from multiexit.models import MODEL_CLASSES

TINY_SIZES = {"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37,
              "max_position_embeddings": 64}
CONFIG_CLASSES = {"bert": BertConfig, "roberta": RobertaConfig, "albert": AlbertConfig}
STOCK_CLASSES = {"bert": BertForSequenceClassification, "roberta": RobertaForSequenceClassification,
                 "albert": AlbertForSequenceClassification}


def tiny_config(model_type: str = "bert", *, layers: int = 2, num_labels: int = 2, **overrides: object
                ) -> PretrainedConfig:
    """A tiny config of ``model_type`` (bert, roberta, albert) with ``layers`` layers; ``overrides`` set any config
    field (sizes, ``attn_implementation``, exit settings such as ``exit_head_type`` or ``exit_pooling``).

    ALBERT shares its layers in two groups when it has more than one layer (so that tests see a group run at several
    depths); RoBERTa pads with id 1, as the real checkpoints do."""
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"model_type must be one of {', '.join(CONFIG_CLASSES)}, got {model_type!r}")
    settings: dict[str, object] = {**TINY_SIZES, "num_hidden_layers": layers, "num_labels": num_labels}
    if model_type == "albert":
        settings.update(embedding_size=16, num_hidden_groups=2 if layers > 1 else 1, inner_group_num=1)
    elif model_type == "roberta":
        settings.update(pad_token_id=1)
    settings.update(overrides)
    return CONFIG_CLASSES[model_type](**settings)


def tiny_model(model_type: str = "bert", *, layers: int = 2, num_labels: int = 2, seed: int = 0,
               multi_exit: bool = True, **overrides: object) -> PreTrainedModel:
    """A random tiny model, its weights drawn after ``torch.manual_seed(seed)``: the multi-exit class of
    ``model_type`` (or, with ``multi_exit=False``, the stock ``*ForSequenceClassification``, with a pooler as the hub
    checkpoints the seeds start from). ``overrides`` as for :func:`tiny_config`. Like any HF constructor it returns
    the model in training mode: call ``.eval()`` for inference."""
    config = tiny_config(model_type, layers=layers, num_labels=num_labels, **overrides)
    torch.manual_seed(seed)
    model_class = MODEL_CLASSES[model_type] if multi_exit else STOCK_CLASSES[model_type]
    return model_class(config)
