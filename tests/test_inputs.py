"""Inputs never silently misread: task definitions, text files, files read back, killed writes."""

import errno
import json
import os
import re
import shutil
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import electra
import glue_data
import mtop
import train
from conftest import (
    TINY,
    Payload,
    edit_checkpoint,
    edit_json,
    make_world,
    minilm_folder,
    publish,
    run_args,
    write_tsv,
)
from support import checks as support_checks
from support import files as support_files
from support import run_state

# -- inputs never silently misread: what a task definition means is stated or refused ------------------

def news_labels_task(tmp_path: Path, labels: list[str], metric) -> Path:
    rows = [["text", "label"]] + [[f"story {i}", labels[i % len(labels)]] for i in range(12)]
    for split in ("train", "dev"):
        write_tsv(tmp_path / f"d/{split}.tsv", rows)
    spec = {"tasks": [{"name": "tone", "train": "d/train.tsv", "dev": "d/dev.tsv", "text": "text",
                       "label": "label", "type": "classification", "metric": metric}]}
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    return tmp_path / "tasks.json"


def test_f1_needs_two_labels_and_names_the_one_it_scores(tmp_path):
    """F1 on three labels is refused with the fix; on two it scores the second label, and the run's first
    lines say so, with the labels and where they came from."""
    with pytest.raises(ValueError,
                       match=r"metric 'f1' is binary F1 .* 3 labels \['sports', 'tech', 'world'\]"):
        glue_data.load_task_set(str(news_labels_task(tmp_path, ["sports", "tech", "world"], "f1")), tmp_path)
    task, = glue_data.load_task_set(str(news_labels_task(tmp_path, ["neg", "pos"], ["f1", "accuracy"])),
                                    tmp_path)
    line, = glue_data.describe_labels(task)
    assert "['neg', 'pos'] (from the sorted labels of" in line and "F1 scores 'pos'" in line
    # F1 of the second label, worked by hand: 2 TP, 1 FP, 1 FN -> 2*2 / (2*2 + 1 + 1)
    predictions, labels = np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 1, 0])
    assert glue_data.compute_metrics(task, predictions, labels)["f1"] == pytest.approx(4 / 6)


def test_labels_that_differ_only_in_spelling_are_named_at_the_start(tiny_model, token_cache, tmp_path,
                                                                    capsys):
    """A binary column written as 0/1 and 0.0/1.0 is four classes, as the file says: the run's first lines
    list them and warn that two pairs differ only in number format."""
    task_set = news_labels_task(tmp_path, ["0", "1", "0.0", "1.0"], "accuracy")
    train.main(run_args(tiny_model, token_cache, tmp_path / "run", "--task-set", str(task_set),
                        "--max-steps", "1", "--no-test", "--batch-size", "2"))
    out = capsys.readouterr().out
    assert "tone: 4 labels ['0', '0.0', '1', '1.0']" in out
    assert "warning: tone: the labels ['0', '0.0'] differ only in number format" in out
    assert "['1', '1.0']" in out


def cased_folder(tmp_path: Path, config: dict | None) -> Path:
    folder = tmp_path / "cased"
    folder.mkdir()
    words = [w for w in (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").split("\n") if w]
    capitalized = [c for c in dict.fromkeys(w.capitalize() for w in words[2000:3000]) if c not in set(words)]
    (folder / "vocab.txt").write_text("\n".join(words + capitalized + ["Paris", "US", "Café"]) + "\n",
                                      encoding="utf-8")  # each token once: a repeat is refused
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("lower", [False, True])
def test_vocab_tokenizer_follows_the_folders_casing_like_transformers(tmp_path, lower):
    """A vocab.txt folder's tokenizer_config.json decides the casing, as for transformers' BertTokenizer;
    a cased vocabulary without it is refused rather than lowercased."""
    folder = cased_folder(tmp_path, {"do_lower_case": lower})
    text = "Apple opened a store in Paris, US. Café au lait"
    reference = transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=lower)
    assert glue_data.load_tokenizer(folder).encode(text).ids == reference(text)["input_ids"]
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="has capital letters .* add a tokenizer_config.json"):
        glue_data.load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text('{"strip_accents": null}')  # says nothing of the case
    with pytest.raises(ValueError, match="has capital letters"):
        glue_data.load_tokenizer(folder)


def test_a_head_that_predicts_one_class_is_flagged(monkeypatch, tiny_model, token_cache, tmp_path, capsys):
    """Every dev row given one class: the evaluation line warns and log.jsonl records the task and its label,
    whatever its score."""
    real = train.predict_tasks

    def one_class(model, requests, *args, **kwargs):
        out = real(model, requests, *args, **kwargs)
        return [np.zeros_like(o) if task == "RTE" else o for (task, _, _), o in zip(requests, out)]
    monkeypatch.setattr(train, "predict_tasks", one_class)
    out = tmp_path / "run"
    train.main(run_args(tiny_model, token_cache, out, "--tasks", "RTE,STS-B", "--max-steps", "2", "--no-test",
                        "--sampler", "uniform"))
    assert "warning: one class for every dev row: RTE ('entailment')" in capsys.readouterr().out
    evals = [json.loads(line) for line in open(out / "log.jsonl") if '"eval"' in line]
    assert evals[-1]["one_class"] == {"RTE": "entailment"}


# -- inputs never silently misread: every text file is read one way ----------------------------------

@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_every_table_reads_a_bom_long_fields_crlf_and_trailing_blank_lines(tmp_path, suffix):
    """The one reader: a byte-order mark dropped, a field of 200,000 characters kept, CRLF line ends, blank
    lines at the end ignored, a lone carriage return kept in the text."""
    sep, carriage = ("\t", "x\ry") if suffix == ".tsv" else (",", '"x\ry"')  # csv: quoted, as csv wants
    big = "a" * 200_000
    path = tmp_path / f"t{suffix}"
    path.write_bytes(("\ufeffsentence" + sep + "label\r\n" + big + sep + "1\r\n" + carriage + sep + "0\n\n\n")
                     .encode("utf-8"))
    header, rows = glue_data.read_table(path)
    assert header == ["sentence", "label"]
    assert [(n, f) for n, f in rows] == [(2, [big, "1"]), (3, ["x\ry", "0"])]


@pytest.mark.parametrize("name, body", [
    ("bom.tsv", "\ufefftext\nA good film\n" + "b" * 131_073 + "\n\n"),
    ("bom.jsonl", '\ufeff{"text": "A good film"}\n{"text": "' + "b" * 131_073 + '"}\n'),
    ("quoted.csv", 'text,other\n"A good film",x\n' + "b" * 131_073 + ",y\n"),
])
def test_a_corpus_that_trains_also_labels(trained_folder, tmp_path, name, body):
    """--predict reads a corpus as training files are read: a byte-order mark, a field over csv's default
    limit of 131,072 characters, quotes in a .csv."""
    corpus = tmp_path / name
    corpus.write_text(body, encoding="utf-8")
    train.main(["--predict", str(corpus), "--checkpoint", str(trained_folder)])
    rows = [json.loads(line) for line in open(f"{corpus}.predictions.jsonl")]
    assert [r["row"] for r in rows] == [0, 1]
    assert all(set(r) == {"row", "labels"} and set(r["labels"]) == {"kind"} for r in rows)


@pytest.mark.parametrize("texts, message", [
    (["ok", None], r"texts\[1\] is None, a NoneType, not a string \(a missing value\?\)"),
    (["ok", float("nan")], r"texts\[1\] is nan, a float, not a string \(a missing value\?\)"),
    ("one text", "texts must be a list of strings, got str"),
    ([b"bytes"], r"texts\[0\] is b'bytes', a bytes"),
])
def test_labeller_names_the_item_that_is_not_a_string(trained_folder, texts, message):
    with pytest.raises(ValueError, match=message):
        train.Labeller(trained_folder)(texts)


def test_labeller_labels_each_input_with_the_tasks_that_read_it(trained_folder, tmp_path):
    """Texts alone get the single-text tasks, pairs the pair tasks; the others are named once in a warning;
    `tasks` chooses, and a chosen task that cannot read the input, or an unknown one, is a ValueError;
    probabilities sum to 1 and their argmax is the label."""
    labeller = train.Labeller(trained_folder)
    with pytest.warns(UserWarning, match="nli, sim read sentence pairs") as caught:
        first, second = labeller(["a"]), labeller(["b"])
    assert len(caught) == 1 and set(first[0]) == set(second[0]) == {"kind"}
    with pytest.warns(UserWarning, match="kind read single texts"):
        scored = labeller(["a cat", "a dog"], ["x", "y"], probabilities=True)
    for row in scored:
        assert set(row["labels"]) == {"nli", "sim"} and set(row["probabilities"]) == {"nli"}
        p = row["probabilities"]["nli"]
        assert abs(sum(p.values()) - 1) < 1e-5 and max(p, key=p.get) == row["labels"]["nli"]
    only = train.Labeller(trained_folder, tasks=["sim"])
    assert [set(r) for r in only(["a"], ["b"])] == [{"sim"}]
    with pytest.raises(ValueError, match="task 'sim' reads sentence pairs; give pairs"):
        only(["a"])
    with pytest.raises(ValueError, match="no task 'nope'.*its tasks are nli, sim, kind"):
        train.Labeller(trained_folder, tasks=["nope"])
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        train.Labeller(trained_folder, batch_size=-1)
    with pytest.raises((ValueError, FileNotFoundError), match=r"not a folder written by MTOP.save \(a run "
                       f"folder's model is {re.escape(str(trained_folder))}"):
        train.Labeller(trained_folder.parent)  # the run folder, not its best/


def test_a_corpus_from_a_pipe_is_streamed(trained_folder, tmp_path):
    """--predict <(zcat corpus.tsv.gz): a pipe is read as a TSV stream and labelled like the file."""
    corpus = "text\n" + "".join(f"line {i}\n" for i in range(30))
    (tmp_path / "file.tsv").write_text(corpus)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(corpus))
    writer.start()
    train.main(["--predict", str(fifo), "--checkpoint", str(trained_folder), "--predict-output",
                str(tmp_path / "from-pipe.jsonl")])
    writer.join()
    train.main(["--predict", str(tmp_path / "file.tsv"), "--checkpoint", str(trained_folder),
                "--predict-output", str(tmp_path / "from-file.jsonl")])
    assert (tmp_path / "from-pipe.jsonl").read_text() == (tmp_path / "from-file.jsonl").read_text()


# -- inputs never silently misread: files read back are checked; killed writes are cleaned up ----------

@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(step="1"), "step is '1', not of type int"),
    (lambda s: s.update(step=10**30), "step is 1000000000000000000000000000000 with a history of 1 steps"),
    (lambda s: s.update(history=["elsewhere"]), "history names 'elsewhere', not one of this run's tasks"),
    (lambda s: s["optimizer"]["state"]["0"].update(exp_avg=3), "optimizer exp_avg of shape ()"),
    (lambda s: s.pop("history"), "history is missing"),
    (lambda s: s["best"].update(average=float("nan")), "best.average is nan"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr=-1e-3), "param_groups.lr is -0.001"),
    (lambda s: s["sampler"].update(exponent=float("nan")), "exponent is nan, not a finite number"),
    (lambda s: s["streams"]["nli"].update(position=-2), "streams.nli is"),
    (lambda s: s.update(rng=[]), "holds 0 generator states for 1 processes"),
    (lambda s: s["model"].update({"extra.weight": s["model"]["heads.0.dense.weight"]}), "does not fit"),
    # issue 27: every count and rate bounded, as param_groups.lr is
    (lambda s: s["optimizer"]["param_groups"][0].update(initial_lr=-1.0), "param_groups.initial_lr is -1.0"),
    (lambda s: s["lr_schedule"].update(base_lrs=[-1.0] * len(s["lr_schedule"]["base_lrs"])),
     "lr_schedule.base_lrs is [-1.0"),
    (lambda s: s["lr_schedule"].update(last_epoch=10**30), "lr_schedule.last_epoch is 10000"),
    (lambda s: s["sampler"].update(steps=10**30), "steps is 10000"),
    (lambda s: s["streams"]["nli"].update(epoch=10**30), "streams.nli is"),
])
def test_a_checkpoint_state_out_of_range_is_one_message(stopped_run, tmp_path, change, message):
    """Each field of the checkpoint's state is checked before any of it is used: a wrong type, a range or
    fields that disagree end --resume with one message naming the file and field, nothing trained."""
    run, flags = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    edit_checkpoint(copy / run_state.CHECKPOINT, change)
    before = (copy / run_state.CHECKPOINT).read_bytes()
    argv = [f if f != str(run) else str(copy) for f in flags] + ["--resume"]
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(argv)
    assert (copy / run_state.CHECKPOINT).read_bytes() == before  # nothing trained, nothing written


def test_a_checkpoint_tensor_of_another_dtype_is_refused_not_cast(stopped_run, tmp_path):
    """A checkpoint whose word embeddings are stored as int8 (crafted, or from another program) would be
    cast into the fp32 model without a word: it is refused, naming the tensor and both dtypes."""
    run, flags = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / run_state.CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("word_embeddings.weight") and k.startswith("t.model"))
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, str(path), metadata=metadata)
    argv = [f if f != str(run) else str(copy) for f in flags] + ["--resume", "--no-test"]
    with pytest.raises(SystemExit, match="encoder.word_embeddings.weight is torch.int8, the model's is "
                                         "torch.float32"):
        train.main(argv)


def test_a_checkpoint_older_than_a_flag_resumes_at_the_flags_old_behaviour(stopped_run, tmp_path):
    """A checkpoint written before a flag existed (run_state.ADDED_FLAGS: train.py's defaults, which train
    as the code before them did) resumes with that default and is refused with another value."""
    added = ["pooling", "head_lr"]  # the flags newer than the checkpoints of earlier versions
    defaults = vars(train.parse_args([]))
    assert run_state.ADDED_FLAGS == {k: defaults[k] for k in added}
    run, flags = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    predict_flags = ["id_column", "predict_tasks", "probabilities", "predict_format", "revision",
                     "argv"]  # newer too, and none shapes a training
    assert set(predict_flags) <= run_state.RUN_ONLY
    edit_checkpoint(copy / run_state.CHECKPOINT, lambda s: [s["args"].pop(k) for k in added + predict_flags])
    argv = [f if f != str(run) else str(copy) for f in flags] + ["--resume", "--no-test"]
    with pytest.raises(SystemExit, match=re.escape("--pooling 'mean' -> 'mean+cls'")):
        train.main(argv + ["--pooling", "mean+cls"])
    with pytest.raises(SystemExit, match=re.escape("--head-lr 0.0 -> 0.001")):
        train.main(argv + ["--head-lr", "1e-3"])
    train.main(argv)
    assert json.loads((copy / "log.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_settings_file_of_thousands_of_tasks_gets_a_short_message(trained_folder, tmp_path):
    """mtop.json naming 5,000 tasks its weights do not have: one message that names the first keys and
    how many there are, not every one of them."""
    best = tmp_path / "best"
    shutil.copytree(trained_folder, best)
    edit_json(best / "mtop.json", lambda s: s.update(tasks=[[f"t{i}", 2] for i in range(5000)]))
    with pytest.raises(ValueError) as refused:
        mtop.MTOP.load(best)
    assert "does not match" in str(refused.value) and "in all)" in str(refused.value)
    assert len(str(refused.value)) < 4000


def test_deeply_nested_checkpoint_json_is_refused_fast(tmp_path):
    path = tmp_path / run_state.CHECKPOINT
    save_file({"x": torch.zeros(1)}, str(path), metadata={"mtop_checkpoint": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="is damaged"):
        run_state.load_checkpoint(path)


def test_leftovers_of_killed_writes_are_cleaned_up_by_the_next_run(stopped_run, tmp_path, capsys):
    """A temporary checkpoint file of a killed write is removed when the folder's run goes on; a best/
    caught between its two renames is put back."""
    run, flags = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    stale = copy / f".{run_state.CHECKPOINT}.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    own = copy / ".tmpAb3xYz"  # safetensors' own temporary file, which it renames when complete
    own.write_bytes(b"\0" * 1000)
    kept = copy / "notes.tmp"  # not a temporary file of ours or safetensors': left alone
    kept.write_text("mine")
    train.main([f if f != str(run) else str(copy) for f in flags] + ["--resume", "--stop-after", "1"])
    assert not stale.exists() and not own.exists() and kept.exists()
    assert "left by a write that was killed" in capsys.readouterr().out
    # best/ caught between its renames: the clean-up alone puts it back (a later evaluation would hide it)
    best = (copy / "best" / "model.safetensors").read_bytes()
    (copy / "best").rename(copy / "best.old")
    run_state.Run._clean_up(types.SimpleNamespace(out=copy, rank=0))
    assert (copy / "best" / "model.safetensors").read_bytes() == best and not (copy / "best.old").exists()


def test_a_refused_run_leaves_the_folder_of_another_run_alone(stopped_run, tmp_path):
    """A new run started by mistake in a folder whose run may still be writing is refused before it
    touches anything, its temporary files included."""
    run, flags = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    in_flight = copy / f".{run_state.CHECKPOINT}.xyz.tmp"
    in_flight.write_bytes(b"\0")
    with pytest.raises(SystemExit, match="exists: continue that run with --resume"):
        train.main([f if f != str(run) else str(copy) for f in flags])
    assert in_flight.exists()


def test_a_cased_model_trains_and_labels_with_its_casing(tmp_path, capsys):
    """A vocab.txt model whose tokenizer_config.json says do_lower_case false: best/ keeps that file,
    so --predict and Labeller tokenize as training did (transformers' BertTokenizer is the reference)."""
    folder = cased_folder(tmp_path, {"do_lower_case": False})
    torch.manual_seed(0)
    electra.Electra(electra.ElectraConfig(vocab_size=len((folder / "vocab.txt").read_text().split()),
                                          embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2,
                                          intermediate_size=32)).save_pretrained(folder)
    world = make_world(tmp_path / "w", folder)
    train.main(world["flags"])
    best = tmp_path / "w" / "run" / "best"
    assert json.loads((best / "tokenizer_config.json").read_text()) == {"do_lower_case": False}
    text = "Apple opened a store in Paris, US."
    reference = transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)
    assert glue_data.load_tokenizer(best).encode(text).ids == reference(text)["input_ids"]
    with pytest.warns(UserWarning, match="kind read single texts"):
        assert set(train.Labeller(best)([text], [text])[0]) == {"nli", "sim"}


def test_a_full_disk_while_logging_is_one_message(monkeypatch, tmp_path):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_state, "open", no_space, raising=False)
    with pytest.raises(SystemExit, match="cannot append to .*log.jsonl .No space left on device.; free some"):
        run_state.JsonlLog(tmp_path / "log.jsonl", True).write(event="step", step=1)


def test_a_full_disk_reported_by_safetensors_is_one_message(tmp_path):
    """safetensors reports a full disk as its own error, not an OSError: it gets the same message."""
    from safetensors import SafetensorError

    def write(tmp):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")
    with pytest.raises(OSError, match="no space left on the device while writing"):
        support_files.atomic_write(tmp_path / "model.safetensors", write)
    assert list(tmp_path.iterdir()) == []


def test_output_dir_that_cannot_be_written_is_refused_before_work(monkeypatch, tiny_model, token_cache,
                                                                  tmp_path):
    monkeypatch.setattr(support_checks, "writable", lambda path: False)
    with pytest.raises(SystemExit, match="cannot be written here"):
        train.main(run_args(tiny_model, token_cache, tmp_path / "ro" / "run", "--tasks", "RTE"))
    assert not (tmp_path / "ro").exists()


def test_a_pickled_hub_model_that_is_refused_says_why(tmp_path, hub):
    """A hub repository with only a pytorch_model.bin whose pickle holds more than tensors: the download
    is refused with the reason, nothing is installed, and the pickle's code never runs."""
    root, url, _ = hub
    folder = publish(root, "org/evil", electra.Electra(electra.ElectraConfig(**TINY)), pickled=True)
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin was refused: its pickle holds more than tensors"):
        electra.Electra.from_pretrained("org/evil", cache_dir=tmp_path / "cache", hub_url=url)
    assert not marker.exists() and list((tmp_path / "cache" / "models").iterdir()) == []  # no .part left
