"""The multi-exit models in HF's own tools: an early-exit pipeline task, and a ``Trainer`` metric for every exit.

* ``pipeline("early-exit-text-classification", model=..., tokenizer=..., policy=<an ExitPolicy>)``: HF's
  text-classification pipeline (same inputs: a text, a ``{"text": ..., "text_pair": ...}`` pair, or a list of them;
  same ``top_k`` and ``function_to_apply``), answering by real early exit: each input gets its ``label`` and
  ``score`` at the layer where ``policy`` let it exit, and that ``exit_layer`` (1-indexed). With ``batch_size=`` the
  inputs are padded into batches and run by the model's batched early exit, where exited rows leave the batch. The
  task is registered when this module is imported (as it is by ``import multiexit`` and every module of the
  package).
* :func:`compute_exit_metrics`: a ``compute_metrics`` for ``Trainer`` that scores every exit from the batch-first
  per-exit logits the model returns (``MultiExitOutput.exit_logits``).

The pipeline asks of its model only what :class:`EarlyExitModel` names, so the torch model and any other runtime with
the same ``early_exit`` (an ONNX Runtime session, say) serve it alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, EvalPrediction, PretrainedConfig
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_classification import TextClassificationPipeline

from multiexit.modeling import EarlyExitOutput, takes_segment_ids
from multiexit.policies import POLICIES, ExitPolicy
from multiexit.replay import MetricFn, per_layer_scores

__all__ = [
    "PIPELINE_TASK",
    "EarlyExitModel",
    "EarlyExitTextClassificationPipeline",
    "compute_exit_metrics",
]

PIPELINE_TASK = "early-exit-text-classification"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # given to early_exit where the tokenizer made them


class EarlyExitModel(Protocol):
    """What the early-exit pipeline needs of a model (the multi-exit torch models have it all):

    * ``config``: a ``PretrainedConfig`` with ``num_labels`` and ``id2label`` (``type_vocab_size``: segment ids are
      fed where it is above 1, as the runner feeds them; ``problem_type`` as HF's pipeline reads it);
    * ``num_exit_layers``: the number of exits, for checking a policy against the model;
    * ``device``: the ``torch.device`` its inputs go to (the pipeline puts them there, and moves a torch model there
      when given another ``device``);
    * ``early_exit(input_ids, attention_mask=None, token_type_ids=None, policy=...)``: an :class:`EarlyExitOutput`
      of torch tensors, ``logits`` [batch, num_labels] (each row's answer at its exit) and ``exit_layers`` [batch]
      (1-indexed), for a padded batch of any size."""

    config: PretrainedConfig
    num_exit_layers: int
    device: torch.device

    def early_exit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None, *, policy: ExitPolicy) -> EarlyExitOutput: ...


def _require_exit_model(model: object) -> None:
    missing = [name for name in ("config", "num_exit_layers", "device", "early_exit") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"the {PIPELINE_TASK} pipeline needs a model with an exit after every layer, and "
            f"{type(model).__name__} has no {', '.join(missing)}: load a multi-exit checkpoint (saved by this "
            f"package) with AutoModelForSequenceClassification or MultiExit*ForSequenceClassification, or use "
            f"pipeline('text-classification') for a stock model"
        )


class EarlyExitTextClassificationPipeline(TextClassificationPipeline):
    """HF's text-classification pipeline answering by real early exit (see the module's description); ``policy``
    (an :class:`ExitPolicy`, checked against the model) is given when the pipeline is made or with each call."""

    def __init__(self, model: EarlyExitModel, **kwargs: Any) -> None:
        _require_exit_model(model)
        if not isinstance(model, torch.nn.Module) and kwargs.get("device") is None:
            # HF's default device (the first GPU where there is one) would mean moving the model: a model that is
            # not a torch module runs where it is, and takes its inputs on its own device
            kwargs["device"] = model.device
        super().__init__(model=model, **kwargs)

    def check_model_type(self, supported_models: object) -> None:
        """What this pipeline needs is the model's exits (checked when it is made), not a class of HF's mapping."""

    def _sanitize_parameters(self, policy: ExitPolicy | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if policy is not None:
            if not isinstance(policy, ExitPolicy):
                raise TypeError(f"policy must be an ExitPolicy ({', '.join(cls.__name__ for cls in POLICIES.values())}"
                                f"), got {type(policy).__name__}")
            policy.validate(self.model.config.num_labels, self.model.num_exit_layers)  # UserInputError, a ValueError
            forward_params["policy"] = policy
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs: str | dict | list, **tokenizer_kwargs: Any) -> dict[str, torch.Tensor]:
        # segment ids as the runner tokenises its data, whatever the tokenizer returns by default
        tokenizer_kwargs.setdefault("return_token_type_ids", takes_segment_ids(self.model.config))
        return super().preprocess(inputs, **tokenizer_kwargs)

    def _forward(self, model_inputs: dict[str, torch.Tensor], policy: ExitPolicy | None = None) -> dict:
        if policy is None:
            raise ValueError(f"the {PIPELINE_TASK} pipeline needs an exit policy: pipeline(..., policy=PatienceExit("
                             f"patience=2)) or a call with policy=...")
        output = self.model.early_exit(**{key: model_inputs[key] for key in MODEL_INPUTS if key in model_inputs},
                                       policy=policy)
        return {"logits": output.logits, "exit_layers": output.exit_layers}

    def postprocess(self, model_outputs: dict, **postprocess_params: Any) -> dict | list[dict]:
        result = super().postprocess(model_outputs, **postprocess_params)
        exit_layer = int(model_outputs["exit_layers"][0])
        if isinstance(result, dict):
            return {**result, "exit_layer": exit_layer}
        return [{**entry, "exit_layer": exit_layer} for entry in result]  # top_k: one entry per label


PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=EarlyExitTextClassificationPipeline,
                                    pt_model=AutoModelForSequenceClassification, type="text")


def compute_exit_metrics(metric: str | MetricFn) -> Callable[[EvalPrediction], dict[str, float]]:
    """A ``compute_metrics`` for HF's ``Trainer`` that scores every exit of a multi-exit model.

    ``metric`` is a task name of :mod:`multiexit.data` (``"sst2"``, ``"mrpc"``, ``"bbc-news"``: its official
    metrics) or a function ``(predictions, labels) -> {name: value}`` taking class indices (regression: values).
    The returned metrics are every exit's under ``layer_<k>_<name>`` and the last exit's under the plain names, as a
    single-exit model's would be (``Trainer`` prefixes them with ``eval_``).

    It reads the per-exit logits [N, L, C], the last of the predictions ``Trainer`` gathers: the model returns them
    batch first as ``exit_logits``, after ``logits`` (and ``hidden_states`` when asked for)."""
    if isinstance(metric, str):
        from multiexit.data import compute_metrics, get_task  # datasets, scipy, sklearn: loaded only when needed

        task = get_task(metric)

        def metric_fn(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            return compute_metrics(task, predictions, labels)
    else:
        metric_fn = metric

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        outputs = prediction.predictions
        exit_logits = np.asarray(outputs[-1] if isinstance(outputs, (tuple, list)) else outputs)
        if exit_logits.ndim != 3:
            raise ValueError(f"compute_exit_metrics reads the per-exit logits [examples, exits, labels] (the model's "
                             f"exit_logits, the last prediction Trainer gathers), got an array of shape "
                             f"{exit_logits.shape}")
        scores = per_layer_scores(torch.from_numpy(exit_logits), np.asarray(prediction.label_ids), metric_fn)
        results = {f"layer_{depth}_{name}": value
                   for depth, score in enumerate(scores, start=1) for name, value in score.metrics.items()}
        return {**results, **scores[-1].metrics}

    return compute
