"""The multi-exit models in HF's own entry points: the Auto classes (registered on import, and through the remote code
saved beside the weights), the early-exit pipeline (with the torch model and with a stand-in that offers only the
pipeline's model protocol, as the ONNX Runtime model will), and ``Trainer`` (training, batch-first predictions that
equal the model's own outputs, a metric for every exit). Tiny random BERT, RoBERTa and ALBERT models with the packaged
MiniLM tokenizer: no network, no shared data.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tiny_runs import sst2_rows, threshold_between, tokenizer
from transformers import (
    AlbertConfig,
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    RobertaConfig,
    Trainer,
    TrainingArguments,
    pipeline,
)

from multiexit.errors import UserInputError
from multiexit.hf import PIPELINE_TASK, compute_exit_metrics
from multiexit.modeling import REMOTE_CODE_MODULE, EarlyExitOutput, takes_segment_ids
from multiexit.models import MODEL_CLASSES
from multiexit.policies import BudgetExit, EntropyExit, MaxProbExit, max_prob
from multiexit.tiny import STOCK_CLASSES, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

KINDS = ("bert", "roberta", "albert")
STOCK_CONFIGS = {"bert": BertConfig, "roberta": RobertaConfig, "albert": AlbertConfig}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201 - the MiniLM tokenizer
    return tokenizer()


def make_tiny(kind: str, tok, *, layers: int = 3, num_labels: int = 3, seed: int = 0, multi_exit: bool = True):  # noqa: ANN201
    """A tiny model of ``kind`` over the MiniLM vocabulary (RoBERTa's positions counted from its pad id)."""
    extra = {"pad_token_id": tok.pad_token_id} if kind == "roberta" else {}
    return tiny_model(kind, layers=layers, num_labels=num_labels, seed=seed, multi_exit=multi_exit,
                      vocab_size=len(tok), **extra).eval()


def save(model, tok, folder: Path) -> Path:  # noqa: ANN001
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def encode(tok, model, *texts: object, **kwargs: object) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The inputs the pipeline makes: segment ids where the model has segment embeddings."""
    return dict(tok(*texts, return_tensors="pt", return_token_type_ids=takes_segment_ids(model.config), **kwargs))


def outputs_equal(first: object, second: object) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))


# --------------------------------------------------------------------------------------------------------------------
# Auto classes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_auto_classes_load_a_saved_model_as_the_multi_exit_model(kind, tok, tmp_path):
    model = make_tiny(kind, tok)
    folder = save(model, tok, tmp_path / kind)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == f"multiexit_{kind}"
    assert saved["auto_map"]["AutoModelForSequenceClassification"] == \
        f"{REMOTE_CODE_MODULE}.{type(model).__name__}"
    assert (folder / f"{REMOTE_CODE_MODULE}.py").is_file()

    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, model.config_class) and isinstance(config, STOCK_CONFIGS[kind])
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(loaded) is MODEL_CLASSES[kind]
    batch = encode(tok, model, ["the cat sat on a mat", "a good film"], padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).all_logits, model(**batch).all_logits)
    policy = BudgetExit(layer=2)
    assert outputs_equal(loaded.early_exit(**batch, policy=policy), model.early_exit(**batch, policy=policy))


@pytest.mark.parametrize("kind", KINDS)
def test_a_stock_config_given_to_the_model_becomes_its_multi_exit_config(kind):
    config = tiny_config(kind, layers=2)
    before = config.to_dict()
    model = MODEL_CLASSES[kind](config)
    assert model.config is config and type(config) is model.config_class
    after = config.to_dict()
    assert after.pop("model_type") == f"multiexit_{kind}" and before.pop("model_type") == kind
    assert set(after) - set(before) == {"auto_map", "exit_head_type", "exit_loss_weighting",
                                        "exit_learned_weight_init", "exit_pooling"}
    assert {key: after[key] for key in before} == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_saved_before_the_multi_exit_model_types_still_loads(kind, tok, tmp_path, caplog):
    """Multi-exit checkpoints saved with the backbone's model_type (and no auto_map) load into the multi-exit classes
    as before, without HF's warning about another model type; through the Auto classes they are stock models (their
    config says so) until saved again."""
    model = make_tiny(kind, tok)
    folder = save(model, tok, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = kind
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / f"{REMOTE_CODE_MODULE}.py").unlink()

    with caplog.at_level(logging.WARNING):
        loaded = MODEL_CLASSES[kind].from_pretrained(folder).eval()
    assert "to instantiate a model of type" not in caplog.text
    assert type(loaded.config) is model.config_class and loaded.config.exit_head_type == model.config.exit_head_type
    batch = encode(tok, model, ["the cat sat on a mat", "a good film"], padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).all_logits, model(**batch).all_logits)
    assert type(AutoConfig.from_pretrained(folder)) is STOCK_CONFIGS[kind]  # what the old config.json says

    loaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["model_type"] == f"multiexit_{kind}"
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "resaved")) is MODEL_CLASSES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_a_stock_classification_checkpoint_loads_its_backbone_into_the_multi_exit_model(kind, tok, tmp_path):
    """The other direction of test_models.test_stock_base_model_loads_our_checkpoint: a stock checkpoint gives the
    multi-exit model its backbone (the exits start fresh), and the Auto classes still give the stock model for it."""
    stock = make_tiny(kind, tok, multi_exit=False)
    folder = save(stock, tok, tmp_path / "stock")
    model, info = MODEL_CLASSES[kind].from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith("exits.") for key in info["missing_keys"])
    prefix = stock.base_model_prefix
    ours, theirs = getattr(model, prefix).state_dict(), getattr(stock, prefix).state_dict()
    assert set(theirs) <= set(ours)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    assert type(AutoModelForSequenceClassification.from_pretrained(folder)) is STOCK_CLASSES[kind]


def run_fresh(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that has not imported this package, HF's remote-code cache under tmp_path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.slow
def test_trust_remote_code_loads_the_model_from_the_installed_package(tok, tmp_path):
    """Without this package imported, transformers loads a saved model with trust_remote_code=True through the
    modeling_multiexit.py beside its weights, which imports the installed package: the same classes, the same
    answers; saved again, the folder still names that file. Without trust_remote_code transformers refuses (it does
    not silently give a stock model); without the package installed, the file says what to install."""
    model = make_tiny("albert", tok)
    folder = save(model, tok, tmp_path / "model")
    batch = encode(tok, model, ["the cat sat on a mat", "a good film"], padding=True)
    torch.save({key: value for key, value in batch.items()}, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).all_logits
    code = f"""
import json, os, sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert "multiexit" in sys.modules  # imported by the remote code, not before
batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
with torch.no_grad():
    torch.save(model(**batch).all_logits, {str(tmp_path / "logits.pt")!r})
model.save_pretrained({str(tmp_path / "resaved")!r})
print(type(model).__module__, type(model).__name__)
"""
    result = run_fresh(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["multiexit.albert", "MultiExitAlbertForSequenceClassification"]
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["auto_map"] == json.loads((folder / "config.json").read_text())["auto_map"]
    assert sorted(path.name for path in (tmp_path / "resaved").glob("*.py")) == [f"{REMOTE_CODE_MODULE}.py"]

    refused = run_fresh(f"""
from transformers import AutoModelForSequenceClassification
AutoModelForSequenceClassification.from_pretrained({str(folder)!r})
""", tmp_path)
    assert refused.returncode != 0 and "trust_remote_code=True" in refused.stderr

    missing = run_fresh(f"""
import sys

class NotInstalled:  # the package cannot be found, as where it is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "multiexit":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
from transformers import AutoModelForSequenceClassification
AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
""", tmp_path)
    assert missing.returncode != 0 and "multiexit-encoders package, which is not installed" in missing.stderr


# --------------------------------------------------------------------------------------------------------------------
# The early-exit pipeline
# --------------------------------------------------------------------------------------------------------------------


def splitting_policy(model, tok, texts: list[str]) -> MaxProbExit:  # noqa: ANN001
    """A max-prob threshold between the inputs' probabilities at layer 1, so that some exit there and others later."""
    with torch.no_grad():
        probabilities = [max_prob(model(**encode(tok, model, text)).all_logits[0]) for text in texts]
    return MaxProbExit(threshold=threshold_between(torch.cat(probabilities)))


def expected_answer(model, inputs: dict, policy) -> list[dict]:  # noqa: ANN001
    """Each row's label, score and exit layer from the model's own early exit (on the model's device: HF's pipeline
    moves a torch model to the first GPU where there is one)."""
    output = model.early_exit(**{key: value.to(model.device) for key, value in inputs.items()}, policy=policy)
    probabilities = torch.softmax(output.logits.float().cpu(), dim=-1)
    return [{"label": model.config.id2label[int(row.argmax())], "score": pytest.approx(float(row.max()), abs=1e-6),
             "exit_layer": int(layer)} for row, layer in zip(probabilities, output.exit_layers)]


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_answers_each_input_by_real_early_exit(kind, tok):
    model = make_tiny(kind, tok, layers=4)
    texts = sst2_rows(12, seed=3)
    policy = splitting_policy(model, tok, texts)
    classifier = pipeline(PIPELINE_TASK, model=model, tokenizer=tok, policy=policy)

    answers = classifier(texts)
    assert answers == [expected_answer(model, encode(tok, model, text), policy)[0] for text in texts]
    assert len({answer["exit_layer"] for answer in answers}) > 1  # the inputs exit at different layers
    assert classifier(texts[0]) == answers[:1]  # HF's text-classification: one text gives a list of one

    # batches: padded as the pipeline pads them, run by batched early exit (exited rows leave the batch)
    batched = classifier(texts, batch_size=5)
    expected = [answer for start in range(0, len(texts), 5)
                for answer in expected_answer(model, encode(tok, model, texts[start:start + 5], padding=True), policy)]
    assert batched == expected

    # sentence pairs, as HF's pipeline takes them
    pairs = [{"text": first, "text_pair": second} for first, second in zip(texts[:4], texts[4:8])]
    assert classifier(pairs) == [expected_answer(model, encode(tok, model, pair["text"], pair["text_pair"]), policy)[0]
                                 for pair in pairs]
    # the policy of a call wins over the pipeline's; top_k as HF's pipeline, every entry with the exit layer
    assert [answer["exit_layer"] for answer in classifier(texts, policy=BudgetExit(layer=2))] == [2] * len(texts)
    ranked = classifier(texts[0], top_k=None)
    assert len(ranked) == 3 and {entry["exit_layer"] for entry in ranked} == {answers[0]["exit_layer"]}
    assert ranked[0]["label"] == answers[0]["label"]


class ProtocolOnlyModel:
    """Only what the pipeline's model protocol names (config, num_exit_layers, device, early_exit), as a non-torch
    runtime such as the ONNX Runtime model offers it: no forward, no .to(), no nn.Module."""

    __slots__ = ("_model", "config", "num_exit_layers", "device", "calls")

    def __init__(self, model) -> None:  # noqa: ANN001
        self._model = model
        self.config = model.config
        self.num_exit_layers = model.num_exit_layers
        self.device = torch.device("cpu")
        self.calls = 0

    def early_exit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None, *, policy: object) -> EarlyExitOutput:
        self.calls += 1
        output = self._model.early_exit(input_ids, attention_mask, token_type_ids, policy=policy)
        return EarlyExitOutput(output.logits.clone(), output.exit_layers.clone())


def test_pipeline_runs_any_model_with_the_protocol(tok):
    model = make_tiny("bert", tok, layers=4)
    stand_in = ProtocolOnlyModel(model)
    texts = sst2_rows(10, seed=4)
    policy = splitting_policy(model, tok, texts)
    classifier = pipeline(PIPELINE_TASK, model=stand_in, tokenizer=tok, policy=policy)
    assert classifier.device == torch.device("cpu")
    reference = pipeline(PIPELINE_TASK, model=model, tokenizer=tok, policy=policy, device="cpu")
    assert classifier(texts) == reference(texts)
    assert classifier(texts, batch_size=4) == reference(texts, batch_size=4)
    assert stand_in.calls == len(texts) + 3


@pytest.mark.slow
def test_pipeline_serves_the_onnx_runtime_model(tok, tmp_path):
    """The deployment path: the same pipeline on the model exported to ONNX Runtime gives the torch model's labels
    and exit layers (scores within fp32 tolerance), one input at a time and batched."""
    pytest.importorskip("onnxruntime")
    from multiexit.onnx import OnnxMultiExitModel, export_onnx

    model = make_tiny("bert", tok, layers=4).eval()
    texts = sst2_rows(10, seed=4)
    policy = splitting_policy(model, tok, texts)
    onnx_model = OnnxMultiExitModel.from_pretrained(export_onnx(model, tmp_path / "onnx", tok), threads=1)
    served = pipeline(PIPELINE_TASK, model=onnx_model, tokenizer=tok, policy=policy)
    reference = pipeline(PIPELINE_TASK, model=model, tokenizer=tok, policy=policy, device="cpu")
    for batch_size in (1, 4):
        answers, expected = served(texts, batch_size=batch_size), reference(texts, batch_size=batch_size)
        assert [(a["label"], a["exit_layer"]) for a in answers] == [(e["label"], e["exit_layer"]) for e in expected]
        assert np.allclose([a["score"] for a in answers], [e["score"] for e in expected], atol=1e-5)
    assert len({answer["exit_layer"] for answer in served(texts)}) > 1  # the policy splits the inputs


def test_pipeline_loads_a_saved_model_by_its_folder(tok, tmp_path):
    model = make_tiny("bert", tok, layers=4)
    folder = save(model, tok, tmp_path / "model")
    texts = sst2_rows(6, seed=5)
    policy = splitting_policy(model, tok, texts)
    classifier = pipeline(PIPELINE_TASK, model=str(folder), policy=policy)
    assert type(classifier.model) is type(model)
    assert classifier(texts) == pipeline(PIPELINE_TASK, model=model, tokenizer=tok, policy=policy)(texts)


def test_pipeline_errors_are_clear(tok):
    model = make_tiny("bert", tok, layers=3)
    with pytest.raises(TypeError, match="needs a model with an exit after every layer.*BertForSequenceClassification"):
        pipeline(PIPELINE_TASK, model=make_tiny("bert", tok, multi_exit=False), tokenizer=tok, policy=BudgetExit())
    with pytest.raises(UserInputError, match="can first exit at layer 5, but the model has only 3 layers"):
        pipeline(PIPELINE_TASK, model=model, tokenizer=tok, policy=BudgetExit(layer=5))
    with pytest.raises(UserInputError, match="does not support regression"):
        pipeline(PIPELINE_TASK, model=make_tiny("bert", tok, num_labels=1), tokenizer=tok,
                 policy=EntropyExit(threshold=0.5))
    with pytest.raises(TypeError, match="policy must be an ExitPolicy"):
        pipeline(PIPELINE_TASK, model=model, tokenizer=tok, policy="pabee")
    classifier = pipeline(PIPELINE_TASK, model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="needs an exit policy"):
        classifier("the cat sat")
    with pytest.raises(UserInputError, match="only 3 layers"):
        classifier("the cat sat", policy=BudgetExit(layer=4))


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_trains_and_gathers_batch_first_predictions(tok, tmp_path):
    """16 examples in batches of 8: Trainer.predict returns the last exit's logits [16, C] and every exit's
    [16, L, C] (not the layer-first all_logits, nor the per-batch layer losses), equal to the model's own outputs on
    the same batches; compute_exit_metrics scores every exit."""
    layers, num_labels = 3, 2
    model = make_tiny("bert", tok, layers=layers, num_labels=num_labels)
    texts = sst2_rows(16, seed=6)
    encoded = tok(texts, padding="max_length", max_length=16, truncation=True)
    labels = [index % num_labels for index in range(len(texts))]
    dataset = datasets.Dataset.from_dict({**encoded, "labels": labels})
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                  per_device_eval_batch_size=8, max_steps=3, learning_rate=1e-3, report_to="none",
                                  use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, eval_dataset=dataset,
                      compute_metrics=compute_exit_metrics("sst2"))
    assert trainer.model_accepts_loss_kwargs is False  # the loss is a batch mean: Trainer scales it itself
    before = {name: value.clone() for name, value in model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], value) for name, value in model.named_parameters())

    prediction = trainer.predict(dataset)
    logits, exit_logits = prediction.predictions
    assert logits.shape == (16, num_labels) and exit_logits.shape == (16, layers, num_labels)
    assert prediction.label_ids.tolist() == labels
    model.eval()
    with torch.no_grad():
        own = [model(**{key: torch.tensor(encoded[key][start:start + 8]) for key in encoded})
               for start in (0, 8)]
    assert np.array_equal(logits, torch.cat([output.logits for output in own]).numpy())
    assert np.array_equal(exit_logits, torch.cat([output.exit_logits for output in own]).numpy())
    assert np.array_equal(exit_logits[:, -1], logits)

    metrics = prediction.metrics
    for depth in range(1, layers + 1):
        accuracy = float((exit_logits[:, depth - 1].argmax(-1) == np.array(labels)).mean())
        assert metrics[f"test_layer_{depth}_acc"] == pytest.approx(accuracy)
    assert metrics["test_acc"] == metrics[f"test_layer_{layers}_acc"]
    assert set(trainer.evaluate()) >= {"eval_loss", "eval_acc", "eval_layer_1_acc"}


def test_compute_exit_metrics_takes_a_metric_function():
    exit_logits = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]], dtype=np.float32)  # [N=2, L=2, C]
    from transformers import EvalPrediction

    def agreement(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"agree": float((predictions == labels).mean())}

    metrics = compute_exit_metrics(agreement)(EvalPrediction(predictions=(exit_logits[:, -1], exit_logits),
                                                             label_ids=np.array([0, 1])))
    assert metrics == {"layer_1_agree": 0.5, "layer_2_agree": 0.0, "agree": 0.0}
    with pytest.raises(ValueError, match="per-exit logits"):
        compute_exit_metrics(agreement)(EvalPrediction(predictions=exit_logits[:, -1], label_ids=np.array([0, 1])))
