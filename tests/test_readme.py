"""The README's examples run as written: its Python snippets, in order and in one namespace, and its export command,
on a tiny random multi-exit BERT saved where the README's examples expect the demo's model (``runs/demo-bbc-news``).
A snippet that drifts from the API fails here instead of in a newcomer's hands.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import tokenizer

from multiexit.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

README = Path(__file__).resolve().parent.parent / "README.md"
DEMO_LABELS = ("business", "entertainment", "politics", "sport", "tech")


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def export_command() -> list[str]:
    """The README's ``python -m multiexit.onnx export ...`` line, run with this interpreter."""
    lines = [line for block in fenced_blocks("bash") for line in block.splitlines()
             if line.startswith("python -m multiexit.onnx export")]
    assert len(lines) == 1, "the README shows one export command"
    command = shlex.split(lines[0], comments=True)
    return [sys.executable, *command[1:]]


@pytest.mark.slow
def test_the_readme_examples_run_as_written(tmp_path, monkeypatch):
    tok = tokenizer()
    model = tiny_model("bert", layers=3, num_labels=len(DEMO_LABELS), vocab_size=len(tok),
                       id2label=dict(enumerate(DEMO_LABELS)), label2id={name: i for i, name in enumerate(DEMO_LABELS)})
    demo = tmp_path / "runs" / "demo-bbc-news"
    model.save_pretrained(demo)
    tok.save_pretrained(demo)

    subprocess.run(export_command(), cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    python_blocks = fenced_blocks("python")
    assert len(python_blocks) == 3, "the snippets this test checks: Python, Hugging Face, ONNX Runtime"
    for block in python_blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code

    layers, labels = 3, len(DEMO_LABELS)
    assert namespace["out"].all_logits.shape == (layers, 1, labels)
    assert namespace["out"].exit_logits.shape == (1, layers, labels)
    assert 1 <= int(namespace["exit_layers"][0]) <= layers  # the ONNX snippet's, the last one run
    assert type(namespace["model"]).__name__ == "OnnxMultiExitModel"
    [answer] = namespace["classifier"]("The prime minister announced new taxes on fuel today.", truncation=True,
                                       max_length=64)
    assert set(answer) == {"label", "score", "exit_layer"} and answer["label"] in DEMO_LABELS
    assert torch.is_tensor(namespace["logits"]) and namespace["logits"].shape == (1, labels)
