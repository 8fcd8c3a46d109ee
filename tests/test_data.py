"""glue_data.py: reading GLUE and custom task sets (the many-label forms), bad files, tokenizing and its
cache, batching."""

import json
import os
import re
import shutil
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import glue_data
import train
from conftest import (
    GLUE,
    GLUE_ENV,
    ROOT,
    SMALL_GLUE,
    TOPICS,
    many_label_set,
    minilm_folder,
    news_task_set,
    real_glue,
    tiny_mtop,
    write_many_label_files,
    write_tsv,
)
from support import labelling

# -- glue_data.py: reading glue files ----------------------------------------------------------

def test_every_glue_file_reads_to_its_official_row_count():
    """Each GLUE file on this machine reads to the official number of rows; only train/dev have labels."""
    glue, checked = real_glue(), 0
    for name, task in GLUE.items():
        for split in task.splits:
            if not task.path(split, glue).is_file():
                continue
            examples = glue_data.load_split(task, split, glue)
            assert len(examples) == glue_data.OFFICIAL_ROWS[f"{name}/{split}"], (name, split)
            assert examples.skipped == 0 and examples.note == ""
            assert (examples.labels is None) == split.startswith("test")
            assert (examples.text_b is None) == (len(task.text) == 1)
            checked += 1
    assert checked >= 21  # CoLA, SST-2, MRPC, STS-B, RTE, WNLI x3, QNLI dev/test, AX
    cola_dev = glue_data.load_split(GLUE["CoLA"], "dev", glue)  # no header, no final newline
    assert cola_dev.text_a[-1] == (glue / "CoLA/dev.tsv").read_text().split("\n")[-1].split("\t")[3]
    mrpc = glue_data.load_split(GLUE["MRPC"], "train", glue)  # BOM before the label column's name
    assert mrpc.labels[:2].tolist() == [1, 0] and mrpc.text_b[0].startswith("Referring to him")
    assert glue_data.load_split(GLUE["STS-B"], "dev", glue).labels[:2].tolist() == [5.0, 4.75]


MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def mnli_row(index: int, premise: str, hypothesis: str, *labels: str) -> list[str]:
    return [str(index), "31193", f"{index}n", "government", "( ( a b ) )", "( c )", "(ROOT (S a))",
            "(ROOT (S c))", premise, hypothesis, *labels]


def test_mnli_reader_uses_fixed_label_order_and_skips_dash_labels(tmp_path):
    """MNLI in its real column layout: labels map to (contradiction, entailment, neutral); '-' rows are
    counted and left out of the labelled rows."""
    write_tsv(tmp_path / "MNLI/train.tsv", [MNLI_COLUMNS + ["label1", "gold_label"],
                                         mnli_row(0, '" Quoted start', "b", "neutral", "entailment"),
                                         mnli_row(1, "c", "d", "neutral", "neutral"),
                                         mnli_row(2, "e", "f", "contradiction", "contradiction")])
    dev_header = MNLI_COLUMNS + [f"label{i}" for i in range(1, 6)] + ["gold_label"]
    write_tsv(tmp_path / "MNLI/dev_matched.tsv", [dev_header, mnli_row(0, "a", "b", *["neutral"] * 6),
                                               mnli_row(1, "c", "d", "neutral", "entailment", "neutral",
                                                         "contradiction", "entailment", "-"),
                                               mnli_row(2, "e", "f", *["entailment"] * 6)])
    write_tsv(tmp_path / "MNLI/test_matched.tsv", [MNLI_COLUMNS, mnli_row(0, "a", "b"), mnli_row(1, "c",
                                                                                                 "d")])
    task = GLUE["MNLI"]
    assert task.labels == ("contradiction", "entailment", "neutral")
    assert task.dev_splits == ("dev_matched", "dev_mismatched")
    assert task.test_splits == ("test_matched", "test_mismatched")
    train = glue_data.load_split(task, "train", tmp_path)
    assert train.labels.tolist() == [1, 2, 0] and train.text_a[0] == '" Quoted start' and train.skipped == 0
    dev = glue_data.load_split(task, "dev_matched", tmp_path)
    assert dev.labels[dev.labelled].tolist() == [2, 1] and dev.labelled.tolist() == [0, 2]
    assert dev.labels[1] == -1 and dev.text_a == ["a", "c", "e"] and dev.skipped == 1
    assert "skipped 1" in dev.note and "lines 3" in dev.note
    test = glue_data.load_split(task, "test_matched", tmp_path)
    assert test.labels is None and test.text_b == ["b", "d"]


def test_qqp_reader_skips_and_counts_rows_with_too_few_columns(tmp_path):
    """QQP's malformed rows (a question broken over two lines) are skipped and counted, the rest read."""
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "QQP/train.tsv", "\t".join(header) + "\n"
           + "0\t1\t2\tHow do I learn?\tHow to learn?\t1\n"
           + "1\t3\t4\tWhat is a\nbroken question?\tAnother one\t0\n"
           + "2\t5\t6\tWhy?\tWhy not?\t0")  # and no final newline
    write_tsv(tmp_path / "QQP/test.tsv", [["id", "question1", "question2"], ["0", "Is it?", "Is it so?"]])
    train = glue_data.load_split(GLUE["QQP"], "train", tmp_path)
    assert train.labels.tolist() == [1, 0] and train.text_b == ["How to learn?", "Why not?"]
    assert train.skipped == 2 and "too few columns" in train.note and "lines 3, 4" in train.note
    assert glue_data.load_split(GLUE["QQP"], "test", tmp_path).text_a == ["Is it?"]


# -- glue_data.py: custom task sets ------------------------------------------------------------

def test_readme_task_set_example_loads_as_documented(tmp_path):
    """The task-set JSON of README.md loads: two tasks on one file, missing labels left out of one task."""
    spec = re.search(r"```json\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    (tmp_path / "tasks.json").write_text(spec)
    rows = [["title", "body", "topic", "tone"], ["A", "B", "world", "0.5"], ["C", "D", "sports", "1.5"],
            ["E", "F", "NULL", "2"]]
    for split in ("train", "dev"):
        write_tsv(tmp_path / f"news/{split}.tsv", rows)
    write_tsv(tmp_path / "news/test.tsv", [["title", "body"], ["X", "Y"]])
    topic, tone = glue_data.load_task_set(str(tmp_path / "tasks.json"), tmp_path)
    assert (topic.kind, topic.labels, tone.kind, tone.metrics) == ("classification", ("world", "sports"),
                                                                   "regression", ("pearson",))
    train = glue_data.load_split(topic, "train", tmp_path)
    assert train.labelled.tolist() == [0, 1] and len(train) == 3  # the NULL row is left out of topic only
    assert glue_data.load_split(tone, "train", tmp_path).labels.tolist() == [0.5, 1.5, 2.0]


def test_custom_task_set_reads_two_label_columns_of_one_file(tmp_path):
    """Two tasks read one file with different label columns; given labels keep their order, others are
    sorted."""
    topic, sentiment = glue_data.load_task_set(str(news_task_set(tmp_path)), tmp_path / "elsewhere")
    assert topic.labels == ("world", "sports") and sentiment.labels == ("negative", "positive")
    assert topic.metrics == ("accuracy",) and sentiment.metrics == ("f1", "accuracy")
    assert topic.test_splits == ("test",) and sentiment.test_splits == ()
    train = glue_data.load_split(topic, "train", "unused: paths are relative to the JSON file")
    assert train.labels.tolist() == [1, 0, 1, 0, 1] and train.text_b[0] == "A late goal."
    test = glue_data.load_split(topic, "test", tmp_path)  # the test file has no label column
    assert test.labels is None and test.text_a == ["Vote"]
    chosen = glue_data.load_task_set(str(tmp_path / "tasks.json"), ".", ["Sentiment"])
    assert [task.name for task in chosen] == ["sentiment"]


def test_custom_task_missing_labels_leave_out_rows_of_that_task_only(tmp_path):
    """Rows whose label is in `missing` are dropped (and counted) for that task, kept for the other."""
    topic, sentiment = glue_data.load_task_set(str(news_task_set(tmp_path)), tmp_path)
    kept = glue_data.load_split(sentiment, "dev", tmp_path)
    assert [kept.text_a[i] for i in kept.labelled] == ["A late goal.", "Talks fail.", "Record fee."]
    assert kept.labels[kept.labelled].tolist() == [1, 0, 1] and kept.labels[[2, 3]].tolist() == [-1, -1]
    assert kept.skipped == 2 and "NULL" in kept.note and len(kept) == 5
    assert glue_data.load_split(topic, "dev", tmp_path).labelled.tolist() == [0, 1, 2, 3, 4]


def test_custom_csv_task_reads_quoted_commas(tmp_path):
    """A .csv file is read with the csv module: quoted fields may hold commas."""
    write_tsv(tmp_path / "reviews.csv", 'text,stars\n"Good, really",4.5\nBad,1\n')
    spec = {"tasks": [{"name": "stars", "train": "reviews.csv", "dev": "reviews.csv", "text": "text",
                       "label": "stars", "type": "regression", "metric": "spearman"}]}
    (tmp_path / "set.json").write_text(json.dumps(spec))
    [task] = glue_data.load_task_set(str(tmp_path / "set.json"), tmp_path)
    examples = glue_data.load_split(task, "train", tmp_path)
    assert examples.text_a == ["Good, really", "Bad"] and examples.labels.dtype == np.float32
    assert task.num_labels == 1 and task.labels is None


@pytest.mark.parametrize("change, expected", [
    ({"lable": "topic"}, "unknown key ['lable']"),
    ({"label": None}, "missing field ['label']"),
    ({"type": "ranking"}, "'type' must be 'classification' or 'regression'"),
    ({"metric": "bleu"}, "metric ['bleu'] is not one of accuracy, f1, mcc"),
    ({"text": ["a", "b", "c"]}, "'text' must be a list of 1 to 2 strings"),
])
def test_task_set_json_errors_name_the_task_and_the_problem(tmp_path, change, expected):
    """A wrong task-set JSON raises one message naming the file, the task and what is wrong."""
    entry = {"name": "topic", "train": "t.tsv", "dev": "t.tsv", "text": "title", "label": "topic",
             "type": "classification", "labels": ["a", "b"]} | change
    entry = {key: value for key, value in entry.items() if value is not None}
    (tmp_path / "set.json").write_text(json.dumps({"tasks": [entry]}))
    with pytest.raises(ValueError) as error:
        glue_data.load_task_set(str(tmp_path / "set.json"), tmp_path)
    assert "set.json: task 'topic'" in str(error.value) and expected in str(error.value)


# -- glue_data.py: many label sets on one file ----------------------------------------------------

@pytest.mark.parametrize("form", ["columns", "multi"])
def test_a_form_for_many_label_sets_gives_the_tasks_of_one_entry_each(tmp_path, form):
    """"label_columns" and "multi_label" stand for one task per column or per name: the same names, files,
    metric and labels per row as an entry for each, the labels counted by hand from the file."""
    entries = glue_data.load_task_set(str(many_label_set(tmp_path / "a", "entries")), ".")
    tasks = glue_data.load_task_set(str(many_label_set(tmp_path / "b", form)), ".")
    assert [t.name for t in tasks] == [*TOPICS, "tone", "lang"] == [t.name for t in entries]
    header, *rows = [line.split("\t") for line in (tmp_path / "b/train.tsv").read_text().splitlines()]
    for task, entry in zip(tasks[:4], entries):
        assert (task.labels, task.metrics, task.kind) == (("0", "1"), ("f1",), "classification")
        assert [Path(f).name for _, f in task.files] == [Path(f).name for _, f in entry.files]
        topic_listed = [task.name in [n.strip() for n in row[header.index("topics")].split(";")]
                        for row in rows]
        by_hand = [int(row[header.index(task.name)]) for row in rows]
        assert by_hand == [int(x) for x in topic_listed]  # the two columns of the file agree
        assert glue_data.load_split(task, "train", ".").labels.tolist() == by_hand
    if form == "multi":  # the start of a run says what the binary labels mean
        assert "column 'topics': '1' when it lists the name" in " ".join(glue_data.describe_labels(tasks[0]))


def test_a_multi_label_column_makes_a_task_per_name_in_train_unless_labels_chooses(tmp_path):
    """Without "labels" every name of the train column is a task, sorted; "prefix" goes before each name;
    an empty cell is a row with no name (all 0), not a missing label."""
    write_many_label_files(tmp_path)
    files = {"train": "train.tsv", "dev": "dev.tsv", "text": "text"}
    spec = {"tasks": [{"multi_label": "topics", "separator": ";", "prefix": "topic-", **files}]}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    tasks = glue_data.load_task_set(str(tmp_path / "t.json"), ".")
    assert [t.name for t in tasks] == [f"topic-{n}" for n in sorted(TOPICS)]
    header, *rows = [line.split("\t") for line in (tmp_path / "train.tsv").read_text().splitlines()]
    empty = [i for i, row in enumerate(rows) if row[header.index("topics")] == ""]
    assert empty  # the file has rows with no topic: they count, as 0 for every task
    for task in tasks:
        examples = glue_data.load_split(task, "train", ".")
        assert len(examples.labelled) == len(rows) and not examples.labels[empty].any()
    assert glue_data.split_names(" a;b ;; a", ";") == {"a", "b"}


@pytest.mark.parametrize("change, expected", [
    ({"separator": ""}, "'separator' be a non-empty string"),
    ({"type": "regression"}, "leave out 'type'"),
    ({"labels": ["sport", "sport"]}, "must list different label names"),
    ({"labels": ["a/b"]}, "holds '/'; a task name can name a file"),
    ({"name": "x"}, "unknown key ['name']"),
    ({"label_columns": ["sport"]}, "unknown key"),
])
def test_a_bad_many_label_form_is_one_message_naming_the_entry(tmp_path, change, expected):
    """A form with a wrong or missing key is refused when the task set loads, naming the entry."""
    write_many_label_files(tmp_path)
    entry = {"multi_label": "topics", "separator": ";", "train": "train.tsv", "dev": "dev.tsv",
             "text": "text"}
    (tmp_path / "t.json").write_text(json.dumps({"tasks": [entry | change]}))
    with pytest.raises(ValueError, match="entry #1") as error:
        glue_data.load_task_set(str(tmp_path / "t.json"), ".")
    assert expected in str(error.value)
    spec = {"tasks": [{"label_columns": ["sport", "money"], "train": "train.tsv", "dev": "dev.tsv",
                       "text": "text", "type": "classification"},
                      {"name": "Sport", "label": "sport", "train": "train.tsv", "dev": "dev.tsv",
                       "text": "text", "type": "classification"}]}
    (tmp_path / "t.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="name more than one task.*prefix"):
        glue_data.load_task_set(str(tmp_path / "t.json"), ".")


def test_tasks_on_one_file_are_tokenized_once_and_share_their_tokens(tmp_path, monkeypatch, minilm_tokenizer):
    """load_encoded with one `shared` dict: tasks that read the same texts get the same token arrays (one
    tokenization, one Encoded.texts key), each with its own labels; rows with a missing label keep their
    text and are left out of `labelled`; another text column is another key."""
    tasks = {t.name: t for t in glue_data.load_task_set(str(many_label_set(tmp_path)), ".")}
    calls = []
    real_encode = glue_data.encode
    monkeypatch.setattr(glue_data, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    shared = {}
    loaded = {name: glue_data.load_encoded(task, "dev", ".", minilm_tokenizer, 32, None, shared)
              for name, task in tasks.items()}
    assert len(calls) == 1 and len({e.texts for e in loaded.values()}) == 1
    assert all(e.ids is loaded["sport"].ids for e in loaded.values())
    alone = glue_data.load_encoded(tasks["lang"], "dev", ".", minilm_tokenizer, 32)  # no sharing: the same
    for name in ("ids", "type_ids", "offsets", "labels", "labelled", "texts"):
        assert np.array_equal(getattr(alone, name), getattr(loaded["lang"], name))
    header, *rows = [line.split("\t") for line in (tmp_path / "dev.tsv").read_text().splitlines()]
    lang = [row[header.index("lang")] for row in rows]
    assert loaded["lang"].labelled.tolist() == [i for i, value in enumerate(lang) if value != "?"]
    assert loaded["sport"].labelled.tolist() == list(range(len(rows)))
    np.testing.assert_allclose(loaded["tone"].labels, [float(row[header.index("tone")]) for row in rows])
    other = glue_data.load_encoded(dataclasses_replace(tasks["sport"], text=("id",)), "dev", ".",
                                   minilm_tokenizer, 32, None, shared)
    assert other.texts != loaded["sport"].texts and len(calls) == 3  # alone and other tokenized again



def test_tasks_share_tokens_only_when_they_read_the_same_texts(tmp_path, minilm_tokenizer):
    """Everything that decides which texts a split holds is in the shared key: the same bytes read as a .tsv
    (a quote is text: 3 rows) and as a .csv (a quoted line break: 2 rows) are two sets of texts, shared
    or cached. The reference is each task loaded and tokenized on its own."""
    write_tsv(tmp_path / "train.tsv", [["text", "label"], ["a", "0"], ["b", "1"]])
    body = 'text\n"first line\nsecond line"\nthird\n'
    for name in ("t.tsv", "t.csv"):
        (tmp_path / name).write_text(body, encoding="utf-8")
    spec = {"tasks": [{"name": kind, "train": "train.tsv", "dev": "train.tsv", "test": f"t.{kind}",
                       "text": "text", "label": "label", "type": "classification"}
                      for kind in ("tsv", "csv")]}
    (tmp_path / "set.json").write_text(json.dumps(spec))
    tasks = glue_data.load_task_set(str(tmp_path / "set.json"), str(tmp_path))
    for cache in (None, tmp_path / "cache"):
        shared = {}
        for task in tasks:
            loaded = glue_data.load_encoded(task, "test", tmp_path, minilm_tokenizer, 16, cache, shared)
            alone = glue_data.encode(minilm_tokenizer, glue_data.load_split(task, "test", tmp_path).text_a,
                                     None, 16)
            assert len(loaded) == {"tsv": 3, "csv": 2}[task.name]
            assert np.array_equal(loaded.ids, alone.ids) and np.array_equal(loaded.offsets, alone.offsets)

# -- glue_data.py: bad input -------------------------------------------------------------------

def test_unknown_task_name_lists_the_valid_names():
    """--tasks with a typo names the unknown task and lists the valid ones; 'sst2' matches SST-2."""
    with pytest.raises(ValueError, match=r"unknown task 'SST3'.*valid names: CoLA, SST-2, MRPC"):
        glue_data.load_task_set("glue", SMALL_GLUE, ["CoLA", "SST3"])
    assert [t.name for t in glue_data.load_task_set("glue", SMALL_GLUE, ["sst2", "mnli"])] == ["SST-2",
                                                                                               "MNLI"]
    assert [t.name for t in glue_data.load_task_set("glue",
                                                    SMALL_GLUE)] == [n for n in GLUE if n not in ("AX",
                                                                                                  "WNLI")]
    assert [t.name for t in glue_data.load_task_set("glue", SMALL_GLUE, ["WNLI"])] == ["WNLI"]  # when named


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    """A missing GLUE file raises an error naming the expected path, the download and --tasks."""
    expected = tmp_path / "MNLI" / "train.tsv"
    with pytest.raises(FileNotFoundError) as error:
        glue_data.load_split(GLUE["MNLI"], "train", tmp_path)
    assert str(expected) in str(error.value) and "download" in str(error.value).lower()
    assert "--tasks" in str(error.value)
    missing = glue_data.missing_files([GLUE["MNLI"], GLUE["RTE"]], SMALL_GLUE, ("train", "dev"))
    assert [p.relative_to(SMALL_GLUE).as_posix() for p in missing] == \
        ["MNLI/train.tsv", "MNLI/dev_matched.tsv", "MNLI/dev_mismatched.tsv"]


@pytest.mark.parametrize("bad_line, expected", [
    (b"2\tA.\tB.\tentailed\n", "line 3: label 'entailed' is not one of ['entailment', 'not_entailment']"),
    (b"2\tA.\tentailment\n", "line 3: 3 columns, expected 4"),
    (b"2\tA \xff.\tB.\tentailment\n", "line 3: bytes that are not UTF-8"),
])
def test_bad_rows_raise_an_error_naming_file_and_line(tmp_path, bad_line, expected):
    """An unknown label, a wrong column count or non-UTF-8 bytes raise, naming file and line."""
    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n1\tA.\tB.\tentailment\n" + bad_line)
    with pytest.raises(ValueError) as error:
        glue_data.load_split(GLUE["RTE"], "train", tmp_path)
    assert f"{path}, {expected}" in str(error.value)


# -- glue_data.py: tokenization and cache ------------------------------------------------------

def test_tokenizers_match_transformers_on_singles_and_pairs(tmp_path, minilm_tokenizer):
    """tokenizer.json and vocab.txt tokenizers give BertTokenizer's ids and type ids, truncated alike."""
    shutil.copy(minilm_folder() / "vocab.txt", tmp_path / "vocab.txt")
    from_vocab = glue_data.load_tokenizer(tmp_path)
    texts = os.environ.get(GLUE_ENV) and real_glue() or SMALL_GLUE  # real sentences when they are here
    rte = glue_data.load_split(GLUE["RTE"], "dev", texts)
    pairs_a = rte.text_a[:60] + ["Crème brûlée in 北京 [MASK] naïve", ""]
    pairs_b = rte.text_b[:60] + ["ÉCOLE  \t tabs", "only b"]
    singles = glue_data.load_split(GLUE["CoLA"], "dev", texts).text_a[:60] + ["Straße, Ünïcode…"]
    oracles = (transformers.BertTokenizer(vocab=str(minilm_folder() / "vocab.txt")),
               transformers.BertTokenizer.from_pretrained(minilm_folder()))
    for ours, oracle in zip((from_vocab, minilm_tokenizer), oracles):
        for max_length in (128, 24):
            for text_a, text_b in ((pairs_a, pairs_b), (singles, None)):
                encoded = glue_data.encode(ours, text_a, text_b, max_length)
                expected = oracle(text_a, text_b, truncation=True, max_length=max_length)
                for i, (start, end) in enumerate(zip(encoded.offsets[:-1], encoded.offsets[1:])):
                    assert encoded.ids[start:end].tolist() == expected["input_ids"][i]
                    assert encoded.type_ids[start:end].tolist() == expected["token_type_ids"][i]


def test_very_long_texts_are_cut_before_tokenizing_with_the_same_tokens(minilm_tokenizer):
    """A text far longer than max_length tokens can hold is cut before the tokenizer sees it (a 200 MB line
    would otherwise be split whole), and gives the very tokens of the whole text, whatever it holds: long
    words (one [UNK] each), scripts without spaces (Thai), punctuation, Chinese characters, characters
    the normalizer drops (controls, soft hyphens, zero-width), accents, no-break spaces; singles, and pairs
    with short texts of every length around the cut one's (longest-first truncation gives the longer text
    an odd budget's extra token). The reference is the tokenizer on the whole text."""
    import random as stdlib_random
    rng = stdlib_random.Random(0)
    thai = "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22"
    parts = ["a" * 1000, "word", "x.y.z", "\u4e2d\u6587\u5b57", "\x00\x01", "e\u0301", "   \t", "!!",
             "longer", thai * 30, "a\u00ad" * 101, "\x1c\u200b", "\u00a0", "\u00ad" * 50]
    texts = ["".join(rng.choice(parts) + rng.choice((" ", "")) for _ in range(n)) for n in (5, 30, 200, 3000)]
    texts += [("a" * 1000 + " ") * 200, "\x00 " * 20000 + "tail words here", thai * 41000,
              ("a\u00ad" * 101 + " ") * 700, ("\u00ad" * 300 + " ") * 300 + "late words " * 50]
    for max_length in (8, 32):
        for a in texts:
            cut = glue_data.encode(minilm_tokenizer, [a], None, max_length).ids.tolist()
            minilm_tokenizer.enable_truncation(max_length, strategy="longest_first")
            assert cut == minilm_tokenizer.encode(a).ids, (max_length, a[:60])
        # Pairs of long texts with few tokens (the reference keeps every combination of overflowing pieces),
        # equal counts and counts one apart among them, and short texts of every length around theirs.
        unk = ("a" * 1000 + " ") * (2 * max_length)
        longs = [unk, unk + " x", ("a\u00ad" * 101 + " ") * (8 * max_length),
                 "\x00 " * (600 * max_length) + "tail words here"]
        shorts = [texts[1], "!" * (40 * max_length), "one two " * 9, "one two " * 9 + "three"]
        pairs = [(s, long) for s in shorts for long in longs] + [(x, y) for x in longs for y in longs]
        for a, b in pairs + [(b, a) for a, b in pairs]:
            pair = glue_data.encode(minilm_tokenizer, [a], [b], max_length).ids.tolist()
            assert pair == minilm_tokenizer.encode(a, b).ids


def test_the_tokenizer_never_sees_a_very_long_text_whole(minilm_tokenizer):
    """The point of the cut: a 2-million-character text (a runaway line) reaches the tokenizer only in
    pieces of a bounded size (its head, or 1 MB pieces to count a pair's tokens), single or paired."""
    seen = []

    class Recording:  # the tokenizer, noting the longest text each call hands it
        def __getattr__(self, name):
            method = getattr(minilm_tokenizer, name)

            def call(*args, **kwargs):
                texts = [s for a in args for s in (a if isinstance(a, list) else [a]) for s in
                         (s if isinstance(s, tuple) else (s,)) if isinstance(s, str)]
                seen.append(max(map(len, texts), default=0))
                return method(*args, **kwargs)
            return call

    huge = "many words in a runaway line " * 75_000
    short = "a short premise"
    for a, b in ((huge, None), (short, huge), (huge, short), (huge, huge)):
        seen.clear()
        encoded = glue_data.encode(Recording(), [a], None if b is None else [b], 32)
        assert encoded.lengths.tolist() == [32] and max(seen) <= (1 << 20) + 100, max(seen)


def test_truncation_is_longest_first_and_respects_max_length(minilm_tokenizer):
    """Pairs lose tokens from the longer text first; nothing is longer than max_length."""
    words = lambda n: " ".join(["word"] * n)  # "word" is one token
    text_a, text_b = [words(50), words(50), words(5)], [words(10), words(40), words(5)]
    encoded = glue_data.encode(minilm_tokenizer, text_a, text_b, 32)
    assert encoded.lengths.tolist() == [32, 32, 13]
    second_segment = [int(encoded.type_ids[s:e].sum()) - 1 for s, e in zip(encoded.offsets,
                                                                           encoded.offsets[1:])]
    assert second_segment == [10, 14, 5]  # B kept whole; 29 text tokens split 15/14; short pair untouched
    assert glue_data.encode(minilm_tokenizer, [words(500)], None, 16).lengths.tolist() == [16]


def test_cache_is_hit_on_second_call_and_missed_when_the_file_changes(tmp_path, monkeypatch,
                                                                      minilm_tokenizer):
    """A second load reads the .npz without tokenizing; an edited file or another max_length tokenizes
    again."""
    write_tsv(tmp_path / "RTE/dev.tsv", (SMALL_GLUE / "RTE/dev.tsv").read_text(encoding="utf-8"))
    cache = tmp_path / "cache"
    first = glue_data.load_encoded(GLUE["RTE"], "dev", tmp_path, minilm_tokenizer, 128, cache)
    real_encode = glue_data.encode

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds this split")
    monkeypatch.setattr(glue_data, "encode", must_not_tokenize)
    second = glue_data.load_encoded(GLUE["RTE"], "dev", tmp_path, minilm_tokenizer, 128, cache)
    for name in ("ids", "type_ids", "offsets", "labels"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    rows = len(glue_data.load_split(GLUE["RTE"], "dev", tmp_path))
    assert second.ids.dtype == np.int32 and second.labels.dtype == np.int64 and len(second) == rows
    # the tokens and the task's labels, written atomically: no .part left
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["RTE", "tokens"]
    assert all(p.suffix == ".npz" for p in cache.iterdir())
    text = (tmp_path / "RTE/dev.tsv").read_text(encoding="utf-8")
    write_tsv(tmp_path / "RTE/dev.tsv", text.rsplit("\n", 2)[0] + "\n")  # drop the last row
    for max_length in (128, 64):
        with pytest.raises(AssertionError, match="tokenized"):
            glue_data.load_encoded(GLUE["RTE"], "dev", tmp_path, minilm_tokenizer, max_length, cache)
    monkeypatch.setattr(glue_data, "encode", real_encode)
    assert len(glue_data.load_encoded(GLUE["RTE"], "dev", tmp_path, minilm_tokenizer, 128, cache)) == rows - 1


# -- glue_data.py: batching --------------------------------------------------------------------

def test_batch_order_is_deterministic_and_uses_each_index_once():
    """Batches depend only on (seed, epoch); every index appears exactly once, with or without shuffling."""
    lengths = np.random.default_rng(0).integers(3, 128, 2003)
    first, again = glue_data.batch_order(lengths, 16, 7, 2), glue_data.batch_order(lengths, 16, 7, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(first) == len(again) == 126
    longest = [lengths[batch].max() for batch in first[:50]]
    assert np.any(np.diff(longest) < 0)  # the steps do not run from short to long texts within a chunk
    other_epoch = glue_data.batch_order(lengths, 16, 7, 3)
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
    for batches in (first, other_epoch, glue_data.batch_order(lengths, 16, 7, 2, shuffle=False)):
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(2003))
        assert max(len(batch) for batch in batches) == 16


def test_rounding_up_a_batch_stops_at_the_positions_the_model_has(monkeypatch):
    """GPU batches are rounded up to a multiple of 8, but never past MTOP.max_text_length: with prompts at
    positions 0..P-1 ("input-positions") and the longest text the checks allow, labelling and a training
    step run where 8-rounding alone would index past the position table (hand count: 32 positions, P =
    3 * 3 + 5 = 14, so 18 for text; a 17-token text rounds to 24 without the limit, to 18 with it)."""
    model = tiny_mtop("mtop", prompt_entry="input-positions")
    assert model.max_text_length == 32 - (3 * 3 + 5) == 18
    ids = np.arange(4, 4 + 17, dtype=np.int32)
    encoded = glue_data.Encoded(ids, np.zeros(17, np.int8), np.array([0, 17]), np.array([1]))
    assert glue_data.collate(encoded, [0], multiple=8)["input_ids"].shape == (1, 24)
    assert glue_data.collate(encoded, [0], multiple=8, limit=18)["input_ids"].shape == (1, 18)
    assert glue_data.collate(encoded, [0], multiple=8, limit=30)["input_ids"].shape == (1, 24)
    monkeypatch.setattr(labelling, "pad_multiple", lambda device: 8)  # the GPU's rounding, on the CPU
    labelling.predict_encoded(model, "cola", encoded, None, "cpu", "fp32")
    stream = train.TaskStream(encoded, np.array([0]), 1, 0, multiple=8, limit=model.max_text_length)
    batch = stream.next()
    assert batch["input_ids"].shape == (1, 18)
    model.loss(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], "cola"),
               batch["labels"], "cola").backward()


def test_bucketed_batches_hold_little_padding(minilm_tokenizer):
    """On CoLA train (batch 16) padding is under 10% of the text tokens, against >100% when padding to 128."""
    lengths = glue_data.load_encoded(GLUE["CoLA"], "train", real_glue(), minilm_tokenizer).lengths
    batches = glue_data.batch_order(lengths, 16, 0, 0)
    padding = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)
    assert padding / lengths.sum() < 0.10 < (128 * len(lengths) - lengths.sum()) / lengths.sum()


def test_unshuffled_order_lets_predictions_return_to_file_order():
    """Evaluation batches are sorted by length; scattering by their indices restores file order."""
    lengths = np.random.default_rng(1).integers(3, 50, 101)
    batches = glue_data.batch_order(lengths, 8, 0, 0, shuffle=False)
    assert np.all(np.diff(lengths[np.concatenate(batches)]) >= 0)
    restored = np.empty(101, dtype=np.int64)
    for batch in batches:
        restored[batch] = lengths[batch]  # stand-in for the model's predictions of this batch
    assert np.array_equal(restored, lengths)


def test_collate_pads_to_the_longest_example_of_the_batch(minilm_tokenizer):
    """collate gives (B, T) int64 tensors padded with pad_id, the mask, type ids and typed labels."""
    encoded = glue_data.encode(minilm_tokenizer, ["a b c d e", "a"], ["x", "y z"])
    encoded.labels = np.array([0.5, 4.0], dtype=np.float32)
    batch = glue_data.collate(encoded, np.array([1, 0]), pad_id=-1)
    assert batch["input_ids"].shape == (2, 9) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][0, -3:].tolist() == [-1] * 3 and batch["attention_mask"].sum(1).tolist() == [6,
                                                                                                           9]
    assert batch["input_ids"][1].tolist() == encoded.ids[encoded.offsets[0]:encoded.offsets[1]].tolist()
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]  # [CLS] a [SEP] y z [SEP] pad
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.0, 0.5]
    encoded.labels = None
    assert "labels" not in glue_data.collate(encoded, [0])
    rounded = glue_data.collate(encoded, np.array([1, 0]), multiple=8)  # 9 tokens -> 16 columns
    assert rounded["input_ids"].shape == (2, 16) and rounded["attention_mask"].sum(1).tolist() == [6, 9]
