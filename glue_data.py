"""GLUE (and your own TSV/CSV tasks) for MTOP: task table, file reading, tokenization, batching, metrics,
(the text-file reader: support/files.py; the tokenizer: support/tokenizer.py; the leaderboard's files:
support/submission.py; the download: support/glue_download.py).

The path of the data through this file:

    files --load_split--> Examples (strings, label indices) --encode--> Encoded (flat token ids, cached)
          --batch_order + collate--> padded batches --model--> predictions
          --compute_metrics / task_score / glue_average--> scores      --write_submission--> GLUE zip

Paper map (MTOP, section 4.1 and Table 1):
    max sequence length 128               -> encode(max_length=128), longest-first truncation for pairs
    batch 16, one task per training step  -> batch_order(...) per task; the trainer picks the task
    dev metric m of Eq. (4)               -> compute_metrics + task_score: mean of the task's metrics, 0..1
    GLUE average of Table 1               -> glue_average (a mean over tasks; MNLI m/mm count as one)

Custom task sets (--task-set my_tasks.json; paths are relative to the JSON file; test, labels, metric and
missing are optional; labels default to the sorted set of train labels):
    {"tasks": [{"name": "topic", "train": "news/train.tsv", "dev": "news/dev.tsv", "test": "news/test.tsv",
                "text": ["title", "body"], "label": "topic", "type": "classification",
                "labels": ["world", "sports"], "metric": "accuracy", "missing": ["", "NULL"]}]}

Shape legend: n examples in a split, M tokens in a split (sum of the n lengths), B batch, T longest
example of the batch (<= max_length).

Decisions made here: label lists are fixed in GLUE_TASKS and never inferred from GLUE data (MNLI is
contradiction, entailment, neutral, the order of the original GLUE/BERT processors; Hugging Face
`datasets` uses another order). The primary metric (listed first) is what the paper's Table 1 reports:
F1 for MRPC and QQP, Spearman for STS-B; a task's score, for the GLUE average and for the scheduler's
probes, is the mean of all its metrics (GLUE's rule). `load_task_set("glue")` returns the paper's eight
tasks (WNLI only when named); AX has no training data and is predicted with the MNLI head when the
submission is written.

References: Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for NLU", ICLR 2019
(https://gluebenchmark.com); the file layout of the classic download_glue_data.py; Gorodkin, "Comparing
two K-category assignments by a K-category correlation coefficient", 2004 (multi-class MCC).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

# The text-file reader and the tokenizer live in support/ (files.py, tokenizer.py); they are part of this
# module's interface too: glue_data.read_table, text_lines, load_tokenizer.
from support.files import atomic_write, name_problem, read_table, text_lines  # noqa: F401
from support.tokenizer import load_tokenizer  # noqa: F401


@dataclass(frozen=True)
class Task:
    """One classification or regression task: its labels, metrics, files and columns.

    Columns are named as in the file's header row. Paths in `files` are relative to the data directory
    (GLUE) or absolute (custom tasks)."""
    name: str
    kind: str                            # "classification" | "regression"
    labels: tuple[str, ...] | None       # label strings; label index i means labels[i]; None for regression
    metrics: tuple[str, ...]             # the first is the primary one (Table 1); task_score averages all
    files: tuple[tuple[str, str], ...]   # ((split, path), ...), e.g. (("train", "CoLA/train.tsv"), ...)
    text: tuple[str, ...]                # one text column, or two for a sentence pair
    label: str | None                    # label column of train/dev files; None when there is none (AX)
    missing: tuple[str, ...] = ()        # label values meaning "no label": the row is skipped and counted
    short_rows_ok: bool = False          # QQP: rows with too few columns are a known defect: skip and count
    no_header: tuple[str, ...] = ()      # column names of train/dev files that have no header row (CoLA)
    labels_from: str = "GLUE's fixed list"  # where `labels` came from, for the run's first lines
    # A task made from a multi-label column (names joined by `separator`): its label is "1" when the row
    # lists `member`, else "0". Both "" for a plain label column.
    member: str = ""
    separator: str = ""

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.files)

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return tuple(split for split in self.splits if split.startswith("dev"))

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(split for split in self.splits if split.startswith("test"))

    def path(self, split: str, data_dir: str | Path) -> Path:
        files = dict(self.files)
        if split not in files:
            raise ValueError(f"task {self.name} has no split {split!r}; its splits are {', '.join(files)}")
        return Path(data_dir) / files[split]  # an absolute path (custom task) ignores data_dir


def _files(folder: str, *splits: str) -> tuple[tuple[str, str], ...]:
    return tuple((split, f"{folder}/{split}.tsv") for split in splits)


_SPLITS = ("train", "dev", "test")
# Label strings as written in the files; their order fixes what a head's output i means, so never change it.
_BINARY = ("0", "1")  # 1: acceptable (CoLA), positive (SST-2), paraphrase (MRPC, QQP), entailed (WNLI)
_NLI = ("contradiction", "entailment", "neutral")  # NOTE: the GLUE/BERT order, not Hugging Face datasets'
_ENTAILMENT = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")

GLUE_TASKS: dict[str, Task] = {task.name: task for task in (
    Task("CoLA", "classification", _BINARY, ("mcc",), _files("CoLA", *_SPLITS), ("sentence",), "label",
         no_header=("source", "label", "annotation", "sentence")),
    Task("SST-2", "classification", _BINARY, ("accuracy",), _files("SST-2", *_SPLITS), ("sentence",),
         "label"),
    Task("MRPC", "classification", _BINARY, ("f1", "accuracy"), _files("MRPC", *_SPLITS),
         ("#1 String", "#2 String"), "Quality"),
    Task("STS-B", "regression", None, ("spearman", "pearson"), _files("STS-B", *_SPLITS), _PAIR, "score"),
    Task("QQP", "classification", _BINARY, ("f1", "accuracy"), _files("QQP", *_SPLITS),
         ("question1", "question2"), "is_duplicate", short_rows_ok=True),
    Task("MNLI", "classification", _NLI, ("accuracy",),
         _files("MNLI", "train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"),
         _PAIR, "gold_label", missing=("-",)),  # '-': the annotators did not agree
    Task("QNLI", "classification", _ENTAILMENT, ("accuracy",), _files("QNLI", *_SPLITS),
         ("question", "sentence"), "label"),
    Task("RTE", "classification", _ENTAILMENT, ("accuracy",), _files("RTE", *_SPLITS), _PAIR, "label"),
    Task("WNLI", "classification", _BINARY, ("accuracy",), _files("WNLI", *_SPLITS), _PAIR, "label"),
    # The diagnostic set: test only, no labels in the file, predicted with the MNLI head, scored (by the
    # leaderboard) with Matthews correlation.
    Task("AX", "classification", _NLI, ("mcc",), (("test", "diagnostic/diagnostic.tsv"),), _PAIR, None),
)}

# Rows of the official files (header excluded), as "<task>/<split>".
OFFICIAL_ROWS: dict[str, int] = {
    "CoLA/train": 8551, "CoLA/dev": 1043, "CoLA/test": 1063, "SST-2/train": 67349, "SST-2/dev": 872,
    "SST-2/test": 1821, "MRPC/train": 3668, "MRPC/dev": 408, "MRPC/test": 1725, "STS-B/train": 5749,
    "STS-B/dev": 1500, "STS-B/test": 1379, "QQP/train": 363846, "QQP/dev": 40430, "QQP/test": 390965,
    "MNLI/train": 392702, "MNLI/dev_matched": 9815, "MNLI/dev_mismatched": 9832, "MNLI/test_matched": 9796,
    "MNLI/test_mismatched": 9847, "QNLI/train": 104743, "QNLI/dev": 5463, "QNLI/test": 5463,
    "RTE/train": 2490, "RTE/dev": 277, "RTE/test": 3000, "WNLI/train": 635, "WNLI/dev": 71,
    "WNLI/test": 146, "AX/test": 1104,
}


def _key(name: str) -> str:
    return name.lower().replace("-", "")  # "sst2", "SST-2" and "sst-2" name the same task


def load_task_set(task_set: str, data_dir: str | Path, names: list[str] | None = None) -> list[Task]:
    """The tasks of `task_set` ("glue", or the path of a task-set JSON file; a relative path is also
    looked up in data_dir), or only those in `names`."""
    if task_set == "glue":
        tasks = [task for task in GLUE_TASKS.values() if task.name != "AX"]
        if names is None:  # the paper's eight tasks: WNLI is left out, as in its Table 1
            return [task for task in tasks if task.name != "WNLI"]
    else:
        path = Path(task_set)
        if not path.is_file() and (Path(data_dir) / path).is_file():
            path = Path(data_dir) / path
        if not path.is_file():
            raise FileNotFoundError(f"--task-set {task_set!r} is neither 'glue' nor an existing JSON file")
        tasks = _tasks_from_json(path)
    if names is None:
        return tasks
    by_key = {_key(task.name): task for task in tasks}
    unknown = [name for name in names if _key(name) not in by_key]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))} in task set {task_set!r}; "
                         f"valid names: {', '.join(task.name for task in tasks)}")
    return [by_key[_key(name)] for name in names]


_JSON_KEYS = ("name", "train", "dev", "test", "text", "label", "type", "labels", "metric", "missing")
_JSON_REQUIRED = ("name", "train", "dev", "text", "label", "type")
# Two forms that stand for many tasks on one file (README, "Your own tasks"), with the keys of a task
# but "name" and "label": "label_columns" (one task per column) and "multi_label" (one binary task per
# label name of a column that lists names joined by "separator").
_FORM_KEYS = {"label_columns": ("label_columns", "prefix", "train", "dev", "test", "text", "type", "labels",
                                "metric", "missing"),
              "multi_label": ("multi_label", "separator", "prefix", "train", "dev", "test", "text", "type",
                              "labels", "metric", "missing")}
_FORM_REQUIRED = {"label_columns": ("label_columns", "train", "dev", "text", "type"),
                  "multi_label": ("multi_label", "separator", "train", "dev", "text")}


def _tasks_from_json(path: Path) -> list[Task]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: not a valid JSON file ({str(error)[:200]})") from None
    if not isinstance(spec, dict) or list(spec) != ["tasks"] or not isinstance(spec["tasks"], list) \
            or not spec["tasks"]:
        raise ValueError(f'{path}: expected {{"tasks": [{{"name": ..., "train": ..., ...}}, ...]}}')
    tasks = [task for number, entry in enumerate(spec["tasks"], 1)
             for task in _entry_tasks(entry, number, path)]
    names = [_key(task.name) for task in tasks]
    if len(set(names)) != len(names):
        twice = sorted({t.name for t in tasks if names.count(_key(t.name)) > 1})
        raise ValueError(f"{path}: task names must be unique (case and '-' aside), but {twice[:10]} "
                         "name more than one task; rename them (a form's tasks that collide with another "
                         "entry's can take a \"prefix\"; names within one form that differ only in case or "
                         "'-' need new labels)")
    return tasks


def _entry_tasks(entry: object, number: int, path: Path) -> list[Task]:
    """One entry of a task set: a task, or a form that stands for many (_FORM_KEYS)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: task #{number} must be a JSON object")
    form = [key for key in _FORM_KEYS if key in entry]
    if not form:
        return [_task_from_json(entry, number, path)]
    where = f"{path}: entry #{number} ({form[0]})"
    unknown = [key for key in entry if key not in _FORM_KEYS[form[0]]]
    absent = [key for key in _FORM_REQUIRED[form[0]] if key not in entry]
    if unknown or absent:
        problem = f"unknown key {unknown}" if unknown else f"missing field {absent}"
        raise ValueError(f"{where}: {problem}; this form's keys are {', '.join(_FORM_KEYS[form[0]])} "
                         f"(required: {', '.join(_FORM_REQUIRED[form[0]])})")
    prefix = entry.get("prefix", "")
    if not isinstance(prefix, str):
        raise ValueError(f"{where}: 'prefix' must be a string, got {prefix!r}")
    common = {k: v for k, v in entry.items()
              if k not in ("label_columns", "multi_label", "separator", "prefix")}
    if form[0] == "label_columns":
        columns = entry["label_columns"]
        if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns) \
                or len(set(columns)) != len(columns):
            raise ValueError(f"{where}: 'label_columns' must be a list of different column names, got "
                             f"{str(columns)[:200]}")
        return [_task_from_json(common | {"name": prefix + column, "label": column}, number, path)
                for column in columns]
    column, separator = entry["multi_label"], entry["separator"]
    if not isinstance(column, str) or not isinstance(separator, str) or not separator:
        raise ValueError(f"{where}: 'multi_label' must name a column and 'separator' be a non-empty string "
                         f"(what joins the names in a cell, e.g. \";\"), got {column!r} and {separator!r}")
    if entry.get("type", "classification") != "classification":
        raise ValueError(f"{where}: a multi-label column makes binary classification tasks; leave out 'type'")
    base = common | {"name": "-", "label": column, "type": "classification", "labels": ["0", "1"],
                     "metric": entry.get("metric", "f1")}
    if "labels" in entry:  # the names to make tasks of, as given
        names = entry["labels"]
        if not isinstance(names, list) or len(set(map(str, names))) != len(names) \
                or not all(isinstance(n, str) and n.strip() == n != "" for n in names):
            raise ValueError(f"{where}: 'labels' must list different label names (no surrounding space), got "
                             f"{str(names)[:200]}")
    else:  # every name in the train file's column, sorted
        values = _train_labels(_task_from_json(base, number, path))
        missing = set(entry.get("missing", []))
        names = sorted(set().union(*(split_names(v, separator) for v in values if v not in missing)))
    if not names or len(names) > 10_000:
        raise ValueError(f"{where}: column {column!r} lists {len(names)} label names; 1 to 10000 make tasks")
    source = f"column {column!r}: '1' when it lists the name, names separated by {separator!r}"
    return [replace(_task_from_json(base | {"name": prefix + name}, number, path, f"{where}, name {name!r}"),
                    member=name, separator=separator, labels_from=source) for name in names]


def split_names(value: str, separator: str) -> set[str]:
    """The label names of a multi-label cell: 'earn; acq' with separator ';' -> {'earn', 'acq'}."""
    return {name.strip() for name in value.split(separator)} - {""}


def _task_from_json(entry: dict, number: int, path: Path, where: str = "") -> Task:
    where = where or f"{path}: task {entry.get('name', f'#{number}')!r}"
    unknown = [key for key in entry if key not in _JSON_KEYS]
    absent = [key for key in _JSON_REQUIRED if key not in entry]
    if unknown or absent:
        problem = f"unknown key {unknown}" if unknown else f"missing field {absent}"
        raise ValueError(f"{where}: {problem}; the keys are {', '.join(_JSON_KEYS)} "
                         f"(required: {', '.join(_JSON_REQUIRED)})")

    def strings(key: str, default: object, fewest: int = 1, most: int = 1) -> tuple[str, ...]:
        value = entry.get(key, default)  # a single string or a list of strings
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) \
                or not fewest <= len(value) <= most:
            wanted = "one string" if most == 1 else f"a list of {fewest} to {most} strings" if most < 100 \
                else f"a list of at least {fewest} strings"
            raise ValueError(f"{where}: {key!r} must be {wanted}, got {value!r}")
        return tuple(value)

    name, kind = entry["name"], entry["type"]
    if problem := name_problem(name):
        raise ValueError(f"{where}: 'name' {problem}")
    if kind not in ("classification", "regression"):
        raise ValueError(f"{where}: 'type' must be 'classification' or 'regression', got {kind!r}")
    allowed = ("accuracy", "f1", "mcc") if kind == "classification" else ("pearson", "spearman")
    metrics = strings("metric", allowed[0], 1, len(allowed))
    if not set(metrics) <= set(allowed):
        raise ValueError(f"{where}: metric {list(metrics)} is not one of {', '.join(allowed)} for {kind}")
    files = tuple((split, str(path.resolve().parent / strings(split, None)[0]))  # relative to the JSON file
                  for split in _SPLITS if split in entry)
    task = Task(name, kind, None, metrics, files, strings("text", None, 1, 2), strings("label", None)[0],
                missing=strings("missing", [], 0, 10_000))
    if task.label in task.text or len(set(task.text)) != len(task.text):
        raise ValueError(f"{where}: the columns must differ: 'text' {list(task.text)}, "
                         f"'label' {task.label!r}")
    if "labels" in entry and kind == "regression":
        raise ValueError(f"{where}: 'labels' is only for classification tasks")
    if kind == "regression":
        return task
    # Without "labels": the sorted set of the train labels, an order that does not depend on row order.
    given = "labels" in entry
    labels = strings("labels", None, 2, 10_000) if given else \
        tuple(sorted(set(_train_labels(task)) - set(task.missing)))
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ValueError(f"{where}: needs at least two different labels, got {list(labels)}")
    if "f1" in metrics and len(labels) != 2:
        raise ValueError(f"{where}: metric 'f1' is binary F1 (of the second label), but the task has "
                         f"{len(labels)} labels {list(labels)}; use 'accuracy' or 'mcc' (multi-class)")
    source = "the task set's 'labels'" if given else f"the sorted labels of {task.path('train', '')}"
    return replace(task, labels=labels, labels_from=source)


def describe_labels(task: Task) -> list[str]:
    """Lines for the start of a run: the task's labels and where they came from, which label binary F1
    scores, and a warning for labels that differ only in number format, case or surrounding space."""
    if task.kind == "regression":
        return [f"{task.name}: regression on column {task.label!r}"]
    lines = [f"{task.name}: {len(task.labels)} labels {list(task.labels)} (from {task.labels_from})"
             + (f"; F1 scores {task.labels[1]!r}" if "f1" in task.metrics else "")]
    groups: dict[str, list[str]] = {}
    for label in task.labels:
        groups.setdefault(_label_key(label), []).append(label)
    for same in (g for g in groups.values() if len(g) > 1):
        lines.append(f"warning: {task.name}: the labels {same} differ only in number format, case or space, "
                     "and are trained as different classes; give the task's \"labels\" or clean the column")
    return lines


def _label_key(label: str) -> str:
    """What two spellings of one label share: '1', '1.0' and ' 1' -> '1.0'; 'Yes' and 'yes' -> 'yes'."""
    text = label.strip().lower()
    try:
        return repr(float(text))
    except ValueError:
        return text


def _train_labels(task: Task) -> list[str]:
    path = task.path("train", "")
    if not path.is_file():
        raise FileNotFoundError(_missing_message(task, "train", path))
    header, rows = _read_table(path, None)
    column = column_indices(header, (task.label,), path)[0]
    for line, fields in rows:
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {line}: {len(fields)} columns, expected {len(header)} "
                             f"({', '.join(header)}); a text with a tab or a line break in it?")
    return [fields[column].strip() for _, fields in rows]


# ---------------------------------------------------------------------------------------------------------
# Reading files


@dataclass
class Examples:
    """The rows of one split, in file order: the text of every row, and the task's label of every row.
    A row whose label is in task.missing keeps its text (other tasks may read the same file) but is left
    out of this task: `labelled` lists the rows that count."""
    text_a: list[str]
    text_b: list[str] | None       # None for single-sentence tasks
    labels: np.ndarray | None      # (n,) int64 label indices (-1: no label) or float32 targets (nan: no
    #                                label); None for test splits
    labelled: np.ndarray           # (k,) int64, ascending: the rows this task trains and scores on
    skipped: int                   # rows left out of this task: known defects (QQP, MNLI '-'), no label
    path: Path
    note: str = ""                 # one line saying what was skipped, for the log; "" when nothing was

    def __len__(self) -> int:
        return len(self.text_a)


def missing_files(tasks: list[Task], data_dir: str | Path,
                  splits: tuple[str, ...] = ("train", "dev", "test")) -> list[Path]:
    """Files of `tasks` that do not exist; "dev" and "test" stand for all dev or test splits of a task."""
    missing = []
    for task in tasks:
        for split in task.splits:
            wanted = split in splits or split.startswith("dev") and "dev" in splits \
                or split.startswith("test") and "test" in splits
            if wanted and not task.path(split, data_dir).is_file():
                missing.append(task.path(split, data_dir))
    return missing


def _missing_message(task: Task, split: str, path: Path) -> str:
    if GLUE_TASKS.get(task.name) == task:
        return (f"{task.name} {split}: {path} does not exist. Download GLUE (train.py fetches it into a "
                "--data-dir that holds no GLUE file yet; or support.glue_download.download_glue), or leave "
                f"{task.name} out with --tasks.")
    return f"task {task.name!r} {split}: {path} does not exist; check the path in the task-set JSON file."


def _read_table(path: Path, header: tuple[str, ...] | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    header, rows = read_table(path, header)
    return header, list(rows)


def column_indices(header: list[str], columns: tuple[str, ...], path: Path) -> list[int]:
    """Where the named columns are; one that is absent or named twice in the header is an error."""
    absent = [column for column in columns if column not in header]
    if absent:
        raise ValueError(f"{path}: no column {', '.join(map(repr, absent))}; the header has {header}")
    twice = [column for column in columns if header.count(column) > 1]
    if twice:
        where = [i + 1 for i, name in enumerate(header) if name == twice[0]]
        raise ValueError(f"{path}: the header names column {twice[0]!r} more than once (columns "
                         f"{', '.join(map(str, where))}); give each column its own name")
    return [header.index(column) for column in columns]


def load_split(task: Task, split: str, data_dir: str | Path) -> Examples:
    """The rows of one split. Test splits come without labels. Known defects are skipped and counted;
    any other malformed row raises an error that names the file and the line."""
    path = task.path(split, data_dir)
    if not path.is_file():
        raise FileNotFoundError(_missing_message(task, split, path))
    is_test = split.startswith("test")
    header, rows = _read_table(path, task.no_header if task.no_header and not is_test else None)
    has_labels = task.label is not None and not is_test
    columns = column_indices(header, task.text + ((task.label,) if has_labels else ()), path)
    label_index = {label: index for index, label in enumerate(task.labels or ())}
    no_label = -1 if task.kind == "classification" else float("nan")
    text_a, text_b, labels, labelled, short, unlabelled = [], [], [], [], [], []
    for line, fields in rows:
        if len(fields) != len(header):
            if task.short_rows_ok and len(fields) < len(header):
                short.append(line)
                continue
            raise ValueError(f"{path}, line {line}: {len(fields)} columns, expected {len(header)} "
                             f"({', '.join(header)}); a text with a tab or a line break in it?")
        if has_labels:
            value = fields[columns[-1]].strip()
            if value in task.missing:
                unlabelled.append(line)
                labels.append(no_label)
            else:
                labelled.append(len(text_a))
                labels.append(_parse_label(task, value, label_index, f"{path}, line {line}"))
        text_a.append(fields[columns[0]])
        if len(task.text) == 2:
            text_b.append(fields[columns[1]])
    reasons = ((short, "rows with too few columns"),
               (unlabelled, f"rows labelled {' or '.join(map(repr, task.missing))}"))
    note = "; ".join(f"skipped {len(lines)} {why} (lines {', '.join(map(str, lines[:5]))}"
                     f"{', ...' if len(lines) > 5 else ''})" for lines, why in reasons if lines)
    dtype = np.float32 if task.kind == "regression" else np.int64
    return Examples(text_a, text_b if len(task.text) == 2 else None,
                    np.array(labels, dtype=dtype) if has_labels else None,
                    np.array(labelled, dtype=np.int64) if has_labels else np.arange(len(text_a)),
                    len(short) + len(unlabelled), path,
                    f"{task.name} {split}: {note} in {path}" if note else "")


def _parse_label(task: Task, value: str, label_index: dict[str, int], where: str) -> int | float:
    if task.separator:  # a multi-label column: does this row list the task's name?
        value = "1" if task.member in split_names(value, task.separator) else "0"
    if task.kind == "classification":
        if value not in label_index:
            raise ValueError(f"{where}: label {value!r} is not one of {list(task.labels)} (task {task.name})")
        return label_index[value]
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if not np.isfinite(target):
        raise ValueError(f"{where}: regression target {value!r} is not a number (task {task.name})")
    return target


# ---------------------------------------------------------------------------------------------------------
# Tokenization and the on-disk cache


@dataclass
class Encoded:
    """Token ids of a split, stored flat: example i is ids[offsets[i]:offsets[i + 1]]."""
    ids: np.ndarray             # (M,) int32
    type_ids: np.ndarray        # (M,) int8: 0 for [CLS] A [SEP], 1 for B [SEP]
    offsets: np.ndarray         # (n + 1,) int64
    labels: np.ndarray | None   # (n,) int64 or float32 (Examples.labels); None for test splits and corpora
    note: str = ""              # what load_split skipped (Examples.note)
    labelled: np.ndarray | None = None  # (k,) the rows with a label (Examples.labelled); None: every row
    # Which texts these are (load_encoded): tasks whose Encoded has the same non-empty key read the same
    # texts, share these token arrays, and can be predicted from one encoder pass (support.labelling).
    texts: str = ""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (n,) tokens per example, special tokens included


def encode(tokenizer: Tokenizer, text_a: list[str], text_b: list[str] | None = None,
           max_length: int = 128) -> Encoded:
    """Tokenize single sentences or pairs, [CLS] A [SEP] (B [SEP]), truncated to max_length tokens
    (pairs: longest first, tokens come off the longer text until the pair fits). NOTE: this sets the
    tokenizer's truncation to max_length and turns its padding off."""
    if text_b is not None and len(text_b) != len(text_a):
        raise ValueError(f"text_a has {len(text_a)} texts but text_b has {len(text_b)}")
    tokenizer.no_truncation()  # the heads count whole
    tokenizer.no_padding()
    if text_b is None:
        text_a = [_head(tokenizer, t, max_length) for t in text_a]
    else:
        pairs = [_pair_head(tokenizer, a, b, max_length) for a, b in zip(text_a, text_b)]
        text_a, text_b = [a for a, _ in pairs], [b for _, b in pairs]
    _set_truncation(tokenizer, max_length)
    batch = text_a if text_b is None else list(zip(text_a, text_b))
    # encode_batch runs on Rust threads; the "fast" variant skips character offsets, which we do not use.
    encodings = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)(batch)
    offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encodings), np.int64, len(encodings)), out=offsets[1:])
    flat = itertools.chain.from_iterable
    return Encoded(np.fromiter(flat(e.ids for e in encodings), np.int32, offsets[-1]),
                   np.fromiter(flat(e.type_ids for e in encodings), np.int8, offsets[-1]), offsets, None)


def _head(tokenizer: Tokenizer, text: str, max_length: int, more_than: int = 0) -> str:
    """What of a text can reach max_length tokens. A text of up to 1,000 characters per token is kept
    whole; a longer one is cut at a space (a word boundary: the tokens before it are the whole text's
    first tokens) once what precedes the space gives at least max_length tokens and more than
    `more_than`, trying 8 * max_length characters and doubling; a text with no such space is kept whole.
    The tokenizer would otherwise split a whole 200 MB line before truncating it (tens of GB). Needs
    the tokenizer's truncation off."""
    size = 8 * max_length
    while len(text) > max(size, 1000 * max_length):
        cut = text.rfind(" ", 0, size)
        if cut > 0 and len(tokenizer.encode(text[:cut], add_special_tokens=False)) > max(max_length - 1,
                                                                                          more_than):
            return text[:cut]
        size *= 2
    return text


def _pair_head(tokenizer: Tokenizer, a: str, b: str, max_length: int) -> tuple[str, str]:
    """A pair cut as _head cuts, keeping which text has more tokens: longest-first truncation gives an odd
    token to the first text only when it has more (ties go to the second). Only when both are long are
    they counted whole; a long text with a short one is cut after more tokens than the short one has (or
    kept whole)."""
    long_a, long_b = len(a) > 1000 * max_length, len(b) > 1000 * max_length
    if not (long_a or long_b):
        return a, b
    a_first = _count(tokenizer, a) > _count(tokenizer, b) if long_a and long_b else long_a
    if a_first:
        b = _head(tokenizer, b, max_length)
        return _head(tokenizer, a, max_length, more_than=_count(tokenizer, b)), b
    a = _head(tokenizer, a, max_length)
    return a, _head(tokenizer, b, max_length, more_than=_count(tokenizer, a) - 1)


def _count(tokenizer: Tokenizer, text: str, piece: int = 1 << 20) -> int:
    """Tokens in a text (no special tokens), counted a piece of about `piece` characters at a time, cut at
    spaces (each word's tokens are its own), so that memory stays bounded. Needs truncation off."""
    total, start = 0, 0
    while start < len(text):
        end = text.find(" ", start + piece) if start + piece < len(text) else -1
        end = len(text) if end < 0 else end
        total += len(tokenizer.encode(text[start:end], add_special_tokens=False))
        start = end
    return total


def _set_truncation(tokenizer: Tokenizer, max_length: int) -> None:
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="longest_first")


_CACHE_VERSION = "glue_data-cache-2"  # bump when the cached arrays change meaning


def load_encoded(task: Task, split: str, data_dir: str | Path, tokenizer: Tokenizer, max_length: int = 128,
                 cache_dir: str | Path | None = None, shared: dict | None = None) -> Encoded:
    """load_split + encode, with labels. Tasks whose split reads the same file with the same text
    columns (and max_length) read the same texts: pass one `shared` dict to every call and they get the
    same token arrays, tokenized once, with the same Encoded.texts key. With a cache_dir, the tokens and
    each task's labels are kept as .npz files whose names hash everything that shapes them (the file's
    bytes and format, the tokenizer, max_length, the columns, the labels, the split): a changed file or
    tokenizer gets new entries; old ones are not read."""
    path = task.path(split, data_dir)
    if not path.is_file():
        raise FileNotFoundError(_missing_message(task, split, path))
    _set_truncation(tokenizer, max_length)  # so that the tokenizer's JSON is the same on every call
    is_test = split.startswith("test")
    source = (task.text, () if is_test else task.no_header, task.short_rows_ok,  # what picks the texts
              "csv" if path.suffix.lower() == ".csv" else "tsv")
    shared = {} if shared is None else shared
    stat = path.stat()  # a file read by many tasks is hashed once (the key names its size and time)
    file_key = ("sha256", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if file_key not in shared:
        shared[file_key] = hashlib.sha256(path.read_bytes()).hexdigest()
    texts = _digest(_CACHE_VERSION, shared[file_key], tokenizer.to_str(), str(max_length), repr(source))
    labels_key = _digest(texts, repr((task.label, task.labels, task.kind, task.missing, task.member,
                                      task.separator)), "test" if is_test else "labelled")
    cache = Path(cache_dir) if cache_dir is not None else None
    tokens = shared.get(texts) or _read_npz(cache and cache / f"tokens-{texts[:24]}.npz")
    labels = _read_npz(cache and cache / f"{task.name}-{split}-{labels_key[:24]}.npz")
    if tokens is None or labels is None:
        examples = load_split(task, split, data_dir)
        if tokens is None:
            encoded = encode(tokenizer, examples.text_a, examples.text_b, max_length)
            tokens = {"ids": encoded.ids, "type_ids": encoded.type_ids, "offsets": encoded.offsets}
            _write_npz(cache and cache / f"tokens-{texts[:24]}.npz", tokens)
        labels = {"labelled": examples.labelled, "note": np.array(examples.note)}
        if examples.labels is not None:
            labels["labels"] = examples.labels
        _write_npz(cache and cache / f"{task.name}-{split}-{labels_key[:24]}.npz", labels)
    shared[texts] = tokens
    return Encoded(tokens["ids"], tokens["type_ids"], tokens["offsets"], labels.get("labels"),
                   str(labels["note"]), labels["labelled"], texts)


def _digest(*parts: str) -> str:
    key = hashlib.sha256()
    for part in parts:
        key.update(part.encode() + b"\0")
    return key.hexdigest()


def _read_npz(path: Path | None) -> dict[str, np.ndarray] | None:
    if not path or not path.is_file():
        return None
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _write_npz(path: Path | None, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would add ".npz" to a name
            np.savez(file, **arrays)
    if path:
        atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------------
# Batching


def batch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                shuffle: bool = True) -> list[np.ndarray]:
    """One epoch of batches as index arrays; every index appears exactly once.

    shuffle=True (training): shuffle, sort each chunk of 50 batches by length, cut it into batches, shuffle
    the batch order. The same (seed, epoch) always gives the same batches, so a resumed run regenerates
    them and skips the batches it has done. shuffle=False (evaluation): sorted by length for speed; the
    caller puts predictions back in file order with `predictions[indices] = batch_predictions`."""
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    # Sorting within a chunk puts texts of similar length in one batch (little padding); the chunk is a
    # random sample, so which examples meet in a batch still changes every epoch.
    chunk = 50 * batch_size
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        order[start:start + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # Without this the steps inside a chunk would run from short to long texts.
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(encoded: Encoded, indices: np.ndarray, pad_id: int = 0, multiple: int = 1,
            limit: int | None = None) -> dict[str, torch.Tensor]:
    """The examples `indices` as a batch padded to its longest example (not to max_length), rounded up
    to a multiple of `multiple` (8 on GPUs: few distinct shapes, each of which may cost a kernel plan) but
    never past `limit`, the positions the model has for text (MTOP.max_text_length)."""
    indices = np.asarray(indices)
    starts = encoded.offsets[indices]                          # (B,)
    lengths = encoded.offsets[indices + 1] - starts            # (B,)
    longest = int(lengths.max())
    width = -(-longest // multiple) * multiple
    positions = np.arange(min(width, max(longest, limit)) if limit else width)  # (T,)
    mask = positions < lengths[:, None]                        # (B, T) True on real tokens
    flat_index = np.where(mask, starts[:, None] + positions, 0)  # (B, T) into the flat arrays
    batch = {
        "input_ids": torch.from_numpy(np.where(mask, encoded.ids[flat_index], pad_id).astype(np.int64)),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "token_type_ids": torch.from_numpy(np.where(mask, encoded.type_ids[flat_index], 0).astype(np.int64)),
    }
    if encoded.labels is not None:
        batch["labels"] = torch.from_numpy(encoded.labels[indices])  # (B,) int64 or float32
    return batch


# ---------------------------------------------------------------------------------------------------------
# Metrics, on a 0..1 scale (the leaderboard shows them x100)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class, label index 1 (MRPC paraphrase, QQP duplicate); 0 without true positives."""
    true_pos = np.sum((predictions == 1) & (labels == 1))
    false_pos = np.sum((predictions == 1) & (labels != 1))
    false_neg = np.sum((predictions != 1) & (labels == 1))
    return float(2 * true_pos / (2 * true_pos + false_pos + false_neg)) if true_pos else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's K-class form; the usual formula for 2 classes); 0 if undefined."""
    classes = int(max(predictions.max(), labels.max())) + 1
    confusion = np.bincount(labels * classes + predictions, minlength=classes * classes)
    confusion = confusion.reshape(classes,
                                  classes).astype(np.float64)  # (true, predicted); floats: no overflow
    total, correct = confusion.sum(), np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    numerator = correct * total - predicted_counts @ true_counts
    denominator = np.sqrt((total**2 - predicted_counts @ predicted_counts)
                          * (total**2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator > 0 else 0.0  # constant predictions -> 0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (undefined)."""
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denominator, -1.0, 1.0)) if denominator > 0 else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group_starts = np.flatnonzero(starts_group)
    group_ends = np.append(group_starts[1:], len(values))          # exclusive
    ranks = np.empty(len(values))
    ranks[order] = ((group_starts + group_ends + 1) / 2)[np.cumsum(starts_group) - 1]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson correlation of the (tie-averaged) ranks."""
    return pearson(_average_ranks(x), _average_ranks(y))


_METRIC_FUNCTIONS = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson,
                     "spearman": spearman}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics; predictions are class indices (classification) or numbers (regression)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise ValueError(f"{task.name}: need 1-d predictions and labels of one length, got "
                         f"{predictions.shape} and {labels.shape} (pass class indices, not logits)")
    if task.kind == "classification":
        if not np.all(predictions == np.round(predictions)):
            raise ValueError(f"{task.name}: classification predictions must be class indices (argmax)")
        predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
    else:
        predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
    return {name: _METRIC_FUNCTIONS[name](predictions, labels) for name in task.metrics}


def task_score(task: Task, metrics: dict[str, float]) -> float:
    """A task's GLUE score: the mean of its metrics (MRPC: F1 and accuracy; STS-B: Spearman and Pearson).
    A metric may come per split with a suffix (MNLI: "accuracy_matched", "accuracy_mismatched"); its
    splits are averaged first, so MNLI scores (m + mm) / 2 as on the leaderboard."""
    values = []
    for name in task.metrics:
        found = [value for key, value in metrics.items() if key == name or key.startswith(f"{name}_")]
        if not found:
            raise ValueError(f"{task.name}: no {name!r} among the metrics {list(metrics)}")
        values.append(np.mean(found))
    return float(np.mean(values))


def primary_score(task: Task, metrics: dict[str, float]) -> float:
    """The one metric per task that the paper's Table 1 reports and averages: the first of task.metrics
    (CoLA MCC, MRPC and QQP F1, STS-B Spearman, accuracy elsewhere; MNLI m and mm averaged)."""
    return task_score(replace(task, metrics=task.metrics[:1]), metrics)


def glue_average(scores: dict[str, float]) -> float:
    """The GLUE average: an unweighted mean over tasks. Keys are task names or "<task>/<split>"; splits of
    one task are averaged first, so MNLI matched and mismatched count as one task. WNLI counts if it is
    in `scores` (the paper leaves it out of Table 1)."""
    if not scores:
        raise ValueError("glue_average needs at least one score")
    per_task: dict[str, list[float]] = {}
    for key, score in scores.items():
        per_task.setdefault(key.split("/")[0], []).append(score)
    return float(np.mean([np.mean(task_scores) for task_scores in per_task.values()]))
