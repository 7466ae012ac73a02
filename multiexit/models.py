"""The multi-exit model class of each backbone, by ``model_type`` (the runner's ``--model_type``)."""

from __future__ import annotations

from multiexit.albert import MultiExitAlbertForSequenceClassification
from multiexit.bert import MultiExitBertForSequenceClassification, MultiExitRobertaForSequenceClassification

MODEL_CLASSES = {
    "bert": MultiExitBertForSequenceClassification,
    "roberta": MultiExitRobertaForSequenceClassification,
    "albert": MultiExitAlbertForSequenceClassification,
}
