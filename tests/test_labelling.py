"""Labelling: --predict (rows, ids, scores, task choice, torchrun) and Labeller."""

import json
import os
import threading
import zipfile

import numpy as np
import pytest
import torch

import glue_data
import mtop
import train
from conftest import SMALL_GLUE, edit_json, make_world, news_task_set, run_args
from support import labelling

# -- train.py: end to end, resume, prediction, torchrun -------------------------

def test_custom_task_set_trains_and_predicts_its_test_file(tiny_model, token_cache, tmp_path):
    """A JSON task set (two label columns of one file) trains end to end and writes <task>.tsv predictions."""
    task_set = news_task_set(tmp_path)
    out = tmp_path / "run"
    train.main(run_args(tiny_model, token_cache, out, "--task-set", str(task_set), "--max-steps", "6",
                        "--interval", "3", "--batch-size", "2"))
    with zipfile.ZipFile(out / "submission" / "test_predictions.zip") as z:
        assert z.namelist() == ["topic.tsv"]  # sentiment has no test file
        assert z.read("topic.tsv").decode().splitlines()[0] == "index\tprediction"
        assert z.read("topic.tsv").decode().splitlines()[1].split("\t")[1] in ("world", "sports")
    model, metadata = mtop.MTOP.load(out / "best")
    assert [t["labels"] for t in metadata["tasks"]] == [["world", "sports"], ["negative", "positive"]]


def test_predict_corpus_labels_each_row_with_its_id_scores_and_the_tasks_chosen(tiny_model, token_cache,
                                                                              tmp_path, capsys):
    """--predict: one line per row, in input order, with its 0-based row, its --id-column value and the
    label of every task that reads single texts, equal to each task's own predictions; --probabilities
    adds each class's probability (the softmax of the task's own logits, to 6 places); --predict-tasks
    chooses tasks; STS-B, a pair task, is left out of a one-text corpus and named once."""
    out = tmp_path / "run"
    train.main(run_args(tiny_model, token_cache, out, "--tasks", "SST-2,CoLA,STS-B", "--max-steps", "10",
                        "--interval", "5", "--no-test"))
    sentences = glue_data.load_split(glue_data.GLUE_TASKS["SST-2"], "dev", SMALL_GLUE).text_a
    sentences = [s.strip() for s in (sentences * 200)[:3000]]
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\n" + "".join(f"doc-{i}\t{s}\n" for i, s in enumerate(sentences)))
    capsys.readouterr()
    predict = ["--predict", str(corpus), "--checkpoint", str(out / "best"), "--text-columns", "text"]
    written = train.main(predict + ["--id-column", "id", "--probabilities"])
    assert capsys.readouterr().out.count("left out: STS-B (they read sentence pairs") == 1
    rows = [json.loads(line) for line in open(written)]
    assert [r["row"] for r in rows] == list(range(3000)) and [r["id"] for r in rows[:2]] == ["doc-0", "doc-1"]
    assert all(list(r) == ["row", "id", "labels", "probabilities"] for r in rows)
    model, metadata = mtop.MTOP.load(out / "best")
    encoded = glue_data.encode(glue_data.load_tokenizer(out / "best"), sentences, None, 128)
    for task in metadata["tasks"][:2]:  # SST-2 and CoLA
        name, labels = task["name"], task["labels"]
        expected = labelling.predict_encoded(model, name, encoded, None, "cpu", "fp32", task["scale"])
        assert [r["labels"][name] for r in rows] == [labels[i] for i in expected]
        own = np.zeros((3000, 2))
        for positions, logits in labelling.forward_batches(model, encoded, np.arange(3000), "cpu", "fp32",
                                                           active_task=name):
            own[positions] = torch.softmax(logits[name].double(), -1).numpy()
        found = np.array([[r["probabilities"][name][label] for label in labels] for r in rows])
        np.testing.assert_allclose(found, own, atol=6e-7, rtol=0)
    assert all("STS-B" not in r["labels"] for r in rows)
    chosen = train.main(predict + ["--predict-tasks", "CoLA", "--predict-output", str(tmp_path / "c.jsonl")])
    cola = [{"CoLA": r["labels"]["CoLA"]} for r in rows]
    assert [json.loads(line)["labels"] for line in open(chosen)] == cola
    bad_inputs = {"empty.tsv": "", "broken.jsonl": '{"text": "fine"}\n{"text": \n',
                  "nocolumn.tsv": "title\nA\n"}
    for name, content in bad_inputs.items():
        (tmp_path / name).write_text(content)
    for name, message in (("missing.tsv", "no such file"), ("empty.tsv", "empty"),
                          ("broken.jsonl", "broken.jsonl:2: not a JSON object"), ("nocolumn.tsv",
                                                                                  "no column 'text'")):
        with pytest.raises(SystemExit, match=message):
            train.main(["--predict", str(tmp_path / name), "--checkpoint", str(out / "best"),
                        "--text-columns", "text"])
    for extra, message in ((["--predict-tasks", "STS-B"], "'STS-B' reads sentence pairs"),
                           (["--predict-tasks", "nope"], "no task 'nope'"),
                           (["--id-column", "nope"], "no column 'nope'.*--id-column")):
        with pytest.raises(SystemExit, match=message):
            train.main(predict + extra + ["--predict-output", str(tmp_path / "never.jsonl")])
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "never.jsonl").exists()
    assert [p.name for p in tmp_path.glob("*.predictions.jsonl")] == ["corpus.tsv.predictions.jsonl"]


def test_a_shard_of_the_batches_gives_what_one_process_gives_for_its_rows(trained_folder):
    """Labeller.label_encoded with shard (r, K): the K shards' rows are disjoint, cover the input, and each
    row's result is the one-process result (its labels and probabilities as written); a 100-row input
    (two batches) gives both of two
    processes work."""
    labeller = train.Labeller(trained_folder)
    texts = [f"sentence {i} " + "word " * (i % 23) for i in range(100)]
    encoded = labeller.encode(texts, texts)
    whole = labeller.label_encoded(encoded, ["nli", "sim"], probabilities=True)
    for world in (2, 3):
        shards = [labeller.label_encoded(encoded, ["nli", "sim"], True, (r, world)) for r in range(world)]
        assert sorted(k for shard in shards for k in shard) == list(range(100))
        assert sum(bool(shard) for shard in shards) == 2  # 100 rows are two batches of 64
        assert {k: v for shard in shards for k, v in shard.items()} == whole


def test_labelling_in_mode_separate_runs_the_chosen_tasks_passes_only(tiny_model, tmp_path):
    """Prompt tuning ("separate") takes one encoder pass per task: labelling with a task choice runs the
    chosen tasks' passes and no other, and each task's labels are its own pass's (predict_encoded)."""
    world = make_world(tmp_path, tiny_model)
    train.main(world["flags"] + ["--mode", "separate"])
    labeller = train.Labeller(tmp_path / "run" / "best")
    texts = [f"sentence {i} " + "word " * (i % 7) for i in range(40)]  # one batch
    encoded = labeller.encode(texts, texts)
    passes, encode = [], labeller.model.encode
    labeller.model.encode = lambda *a, **k: passes.append(1) or encode(*a, **k)
    for chosen in (["sim"], ["nli", "sim"]):
        passes.clear()
        found = labeller.label_encoded(encoded, chosen)
        assert len(passes) == len(chosen)
        for name in chosen:
            own = labelling.predict_encoded(labeller.model, name, encoded, None, "cpu", "fp32",
                                            labeller.scales[name])
            got = [found[k][name] for k in range(40)]
            if name == "sim":
                np.testing.assert_allclose(got, own, atol=1e-4)  # rounded to 4 places
            else:
                assert got == [labeller.labels[name][i] for i in own]


def test_a_custom_task_named_like_a_glue_split_trains_and_predicts(tiny_model, token_cache, tmp_path):
    """A custom task called AX (GLUE's diagnostic set has that name) gets its own AX.tsv, not MNLI's."""
    task_set = news_task_set(tmp_path)
    edit_json(task_set, lambda spec: spec["tasks"][0].update(name="AX"))
    out = tmp_path / "run"
    train.main(run_args(tiny_model, token_cache, out, "--task-set", str(task_set), "--max-steps", "4",
                        "--interval", "2", "--batch-size", "2"))
    with zipfile.ZipFile(out / "submission" / "test_predictions.zip") as z:
        assert z.namelist() == ["AX.tsv"]
        assert z.read("AX.tsv").decode().splitlines()[1].split("\t")[1] in ("world", "sports")


def test_a_progress_line_comes_every_30_seconds_inside_a_chunk(trained_folder, tmp_path, monkeypatch, capsys):
    """--predict prints a progress line inside a chunk whenever 30 seconds have passed (a clock that
    moves 31 s per reading: a line per batch of 64), naming the chunk's rows."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("text\n" + "".join(f"text {i}\n" for i in range(300)))
    clock = iter(range(0, 10**6, 31))
    monkeypatch.setattr(labelling.time, "perf_counter", lambda: float(next(clock)))
    train.main(["--predict", str(corpus), "--checkpoint", str(trained_folder), "--predict-chunk", "300"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rows 0-299: ")]
    expected = [f"rows 0-299: {n}/300 rows" for n in (64, 128, 192, 256, 300)]
    assert [line.split(" (")[0] for line in lines] == expected


def test_a_pipe_needs_an_output_and_its_format_can_be_named(trained_folder, tmp_path):
    """A pipe has no folder to write beside and no suffix: without --predict-output it is refused before
    any work; with it a TSV stream is labelled, and --predict-format jsonl reads a JSONL stream."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit, match="is a pipe, with no folder to write beside: give --predict-output"):
        train.main(["--predict", str(fifo), "--checkpoint", str(trained_folder)])
    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(12))
    writer = threading.Thread(target=lambda: fifo.write_text(lines))
    writer.start()
    train.main(["--predict", str(fifo), "--checkpoint", str(trained_folder), "--predict-format", "jsonl",
                "--predict-output", str(tmp_path / "out.jsonl")])
    writer.join()
    assert [json.loads(line)["row"] for line in open(tmp_path / "out.jsonl")] == list(range(12))
