"""Every broken input gets one message naming it, a non-zero exit, no traceback; random bytes and rows
(hypothesis) get a clean result or the project's own error."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glue_data
import train
from conftest import ROOT, SMALL_GLUE, edit_json, make_world, write_tsv
from support import corpus as support_corpus

# -- bad input: every broken input gets one message that names it, a non-zero exit, no traceback --------

def bad_flag(flag: str, value: str):
    return lambda w: (w["flags"] + [flag, value], flag)


def task_change(change, expected: str):
    def case(w):
        edit_json(w["root"] / "tasks.json", lambda spec: change(spec["tasks"]))
        return w["flags"], expected
    return case


def file_change(relative: str, content: bytes | str, expected: str):
    def case(w):
        path = w["root"] / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return w["flags"], expected.format(path=path)
    return case


def model_change(change, expected: str):
    def case(w):
        change(w["root"] / "model")
        return w["flags"], expected
    return case


def predict_case(corpus: str | bytes | None, expected: str, extra=(), trained=True, edit=None):
    def case(w):
        path = w["root"] / ("corpus.tsv" if corpus is not None else "missing.tsv")
        if corpus is not None:
            path.write_bytes(corpus if isinstance(corpus, bytes) else corpus.encode())
        best = w["root"] / "best"
        if trained:
            shutil.copytree(w["trained"], best)
        if edit:
            edit(best)
        return ["--predict", str(path), "--checkpoint", str(best), *extra], expected.format(path=path,
                                                                                            best=best)
    return case


def uppercased(tokens: list[str], start: int) -> list[str]:
    """The tokens from `start` on in capitals where that makes no repeated token (a repeat is refused)."""
    taken = set(tokens)
    out = tokens[:start]
    for token in tokens[start:]:
        upper = token.upper()
        out.append(upper if upper not in taken else token)
        taken.add(upper)
    return out


def deep_jsonl_case(w):
    path = w["root"] / "corpus.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    shutil.copytree(w["trained"], w["root"] / "best")
    argv = ["--predict", str(path), "--checkpoint", str(w["root"] / "best")]
    return argv, "corpus.jsonl:1: not a JSON object"


BAD_HEADER = "premise\thypothesis\tlabel\tscore\n"


BAD_INPUTS = {
    # flags (argparse stops with exit status 2 and names the flag)
    **{f"flag {f} {v}": bad_flag(f, v) for f, v in [
        ("--batch-size", "0"), ("--batch-size", "-3"), ("--lr", "0"), ("--lr", "-1e-5"), ("--lr", "nan"),
        ("--lr", "inf"), ("--warmup", "1"), ("--warmup", "-0.1"), ("--interval", "0"), ("--epochs", "0"),
        ("--max-length", "0"), ("--gamma", "nan"), ("--c", "inf"), ("--max-grad-norm", "-1"),
        ("--max-grad-norm", "nan"), ("--weight-decay", "inf"), ("--probe-size", "-1"), ("--save-every", "0"),
        ("--log-every", "0"), ("--task-prompt-len", "0"), ("--shared-prompt-len", "-1"), ("--temperature",
                                                                                          "nan"),
        ("--mode", "prefix"), ("--sampler", "greedy"), ("--dtype", "fp16"), ("--prompt-entry", "middle"),
        ("--prompt-init", "zeros"), ("--predict-chunk", "0"), ("--max-train-examples", "-1"), ("--lr",
                                                                                               "abc"),
        ("--head-lr", "-1"), ("--head-lr", "nan"), ("--pooling", "max")]},
    "flag --pooling mean+cls without prompts": lambda w: (w["flags"] + ["--mode", "none", "--pooling",
                                                                         "mean+cls"], "mode 'none'"),
    "flag --max-length too short for a pair": lambda w: (w["flags"] + ["--max-length", "4"],
                                                         "--max-length 4"),
    "flag --max-length beyond the positions": lambda w: (w["flags"] + ["--max-length", "1000"],
                                                         "--max-length 1000"),
    "flag --device cuda without CUDA": lambda w: (w["flags"] + ["--device", "cuda"], "--device cuda"),
    "flag --output-dir is a file": lambda w: ((w["root"] / "afile").write_text("x") and
                                              w["flags"] + ["--output-dir", str(w["root"] / "afile")],
                                              "afile"),
    "flag --resume without a checkpoint": lambda w: (w["flags"] + ["--resume"], "--resume: no checkpoint"),
    "flag --tasks unknown": lambda w: (w["flags"] + ["--tasks", "nli,nope"], "'nope'"),
    "flag --task-set missing": lambda w: (w["flags"] + ["--task-set", str(w["root"] / "none.json")],
                                          "none.json"),
    # the task set
    "task set not JSON": file_change("tasks.json", "{tasks: [", "tasks.json: not a valid JSON"),
    "task set not an object": file_change("tasks.json", "[1, 2]", "tasks.json: expected"),
    "task set no tasks": file_change("tasks.json", '{"tasks": []}', "tasks.json: expected"),
    "task missing field": task_change(lambda t: t[0].pop("label"), "missing field ['label']"),
    "task unknown key": task_change(lambda t: t[0].update(lable="x"), "unknown key ['lable']"),
    "task bad type": task_change(lambda t: t[0].update(type="ranking"), "'type' must be"),
    "task bad metric": task_change(lambda t: t[0].update(metric="bleu"), "metric ['bleu']"),
    "task regression metric on classes": task_change(lambda t: t[0].update(metric="pearson"),
                                                     "metric ['pearson']"),
    "task three texts": task_change(lambda t: t[0].update(text=["a", "b", "c"]), "'text' must be"),
    "task text is the label": task_change(lambda t: t[0].update(label="premise"), "the columns must differ"),
    "task name with a slash": task_change(lambda t: t[0].update(name="a/b"), "'name' 'a/b' holds '/'"),
    "task name empty": task_change(lambda t: t[0].update(name=""), "'name' must be"),
    "task duplicate names": task_change(lambda t: t[1].update(name="NLI"), "must be unique"),
    "task labels on regression": task_change(lambda t: t[1].update(labels=["a", "b"]), "'labels' is only"),
    "task one label": task_change(lambda t: t[0].update(labels=["yes"]), "'labels' must be"),
    "task label not in labels": task_change(lambda t: t[0].update(labels=["yes", "maybe"]),
                                            "label 'no' is not one of"),
    "task missing train file": task_change(lambda t: t[0].update(train="data/nothere.tsv"), "nothere.tsv"),
    "task text column absent": task_change(lambda t: t[0].update(text=["premise", "hypo"]),
                                           "no column 'hypo'"),
    "task label column absent": task_change(lambda t: t[1].update(label="scores"), "no column 'scores'"),
    # the files of every split
    "train row with a missing column": file_change("data/train.tsv", BAD_HEADER + "a\tb\tyes\n",
                                                   "{path}, line 2"),
    "dev row with an extra column": file_change("data/dev.tsv", BAD_HEADER + "a\tb\tyes\t1\tx\n",
                                                "{path}, line 2"),
    "dev header only": file_change("data/dev.tsv", BAD_HEADER, "{path}: no examples"),
    "train empty file": file_change("data/train.tsv", "", "{path}: the file is empty"),
    "train not UTF-8": file_change("data/train.tsv", BAD_HEADER.encode() + b"caf\xe9\tb\tyes\t1\n",
                                   "{path}, line 2"),
    "dev bad regression target": file_change("data/dev.tsv", BAD_HEADER + "a\tb\tyes\tlots\n",
                                             "'lots' is not a number"),
    "dev unknown class": file_change("data/dev.tsv", BAD_HEADER + "a\tb\tmaybe\t1\n", "label 'maybe'"),
    "test lacks a text column": file_change("data/test.tsv", "premise\nа cat\n",
                                            "{path}: no column 'hypothesis'"),
    "test not UTF-8": file_change("data/test.tsv", b"premise\thypothesis\n\xff\xfe\tb\n", "{path}, line 2"),
    "test header only": file_change("data/test.tsv", "premise\thypothesis\n", "{path}: no examples"),
    # the model folder
    "model folder missing": lambda w: (w["flags"] + ["--model", str(w["root"] / "nomodel")], "nomodel"),
    "model without config.json": model_change(lambda m: (m / "config.json").unlink(), "config.json"),
    "model config not JSON": model_change(lambda m: (m / "config.json").write_text("{"), "not valid JSON"),
    "model config of another type": model_change(
        lambda m: edit_json(m / "config.json", lambda c: c.update(model_type="gpt2")), "model_type 'gpt2'"),
    "model config bad activation": model_change(
        lambda m: edit_json(m / "config.json", lambda c: c.update(hidden_act="relu")), "hidden_act 'relu'"),
    "model weights missing": model_change(lambda m: (m / "model.safetensors").unlink(), "model.safetensors"),
    "model weights truncated": model_change(
        lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:1000]),
        "truncated"),
    "model weights of another shape": model_change(
        lambda m: edit_json(m / "config.json", lambda c: c.update(intermediate_size=96)), "wrong shapes"),
    "model without a vocabulary": model_change(lambda m: (m / "vocab.txt").unlink(),
                                               "neither tokenizer.json"),
    "model tokenizer.json broken": model_change(
        lambda m: (m / "tokenizer.json").write_text("{not json"), "tokenizer.json: not a tokenizer file"),
    "model vocabulary without [CLS]": model_change(
        lambda m: (m / "vocab.txt").write_text("[PAD]\nthe\n"), "no [CLS]"),
    "model vocabulary larger than the table": model_change(
        lambda m: (m / "vocab.txt").write_text((m / "vocab.txt").read_text() + "extra1\nextra2\n"),
        "30524 tokens"),
    "model vocabulary much smaller": model_change(
        lambda m: (m / "vocab.txt").write_text("\n".join((m / "vocab.txt").read_text().split("\n")[:1000])),
        "1000 tokens"),
    # run state
    "run pickled checkpoint": lambda w: ((w["root"] / "run").mkdir()
                                         or (w["root"] / "run/checkpoint.pt").write_bytes(b"x")
                                         and w["flags"], "pickle file"),
    "run damaged checkpoint": lambda w: ((w["root"] / "run").mkdir()
                                         or (w["root"] / "run/checkpoint.safetensors")
                                         .write_bytes(b"\x00" * 64) and w["flags"] + ["--resume"],
                                         "is damaged"),
    "run another run's checkpoint": lambda w: ((w["root"] / "run").mkdir()
                                               or (w["root"] / "run/checkpoint.safetensors")
                                               .write_bytes(b"\x00") and w["flags"],
                                               "exists: continue that run"),
    # corpus labelling
    "predict corpus missing": predict_case(None, "no such file {path}", trained=False),
    "predict checkpoint missing": predict_case("text\nA\n", "no such folder", trained=False),
    "predict output is the input": lambda w: predict_case("text\nA\n",
                                                          "--predict-output {path} is the input file",
                                                      extra=("--predict-output",
                                                             str(w["root"] / "corpus.tsv")))(w),
    "predict output folder missing": lambda w: predict_case("text\nA\n", "does not exist",
                                                        extra=("--predict-output",
                                                               str(w["root"] / "no/out.jsonl")))(w),
    "predict corpus not UTF-8": predict_case(b"text\n\xff\xfe\n", "not UTF-8"),
    "predict corpus empty": predict_case("", "{path}: the file is empty"),
    "predict corpus column absent": predict_case("title\nA\n", "{path}:1: no column 'text'",
                                                 extra=("--text-columns", "text")),
    "predict corpus row too long": predict_case("text\nA\tB\n", "{path}:2: 2 columns"),
    "predict jsonl broken line": lambda w: jsonl_case(w),
    "predict mtop.json without fields": predict_case("text\nA\n", "missing field", edit=lambda b: edit_json(
        b / "mtop.json", lambda s: s.pop("tasks"))),
    "predict mtop.json not JSON": predict_case("text\nA\n", "not valid JSON",
                                               edit=lambda b: (b / "mtop.json").write_text("{")),
    "predict weights missing": predict_case("text\nA\n", "no weights file",
                                            edit=lambda b: (b / "model.safetensors").unlink()),
    "predict --device cuda without CUDA": predict_case("text\nA\n", "--device cuda", extra=("--device",
                                                                                            "cuda")),
    # issue 19: inputs that could be misread are refused before any work, with the field named
    "flag --device of no kind": bad_flag("--device", "tpu9"),
    "flag --device cuda:7 of a CPU build": bad_flag("--device", "cuda:7"),
    "flag input-positions past the positions": lambda w: (
        w["flags"] + ["--prompt-entry", "input-positions", "--max-length", "512"], "puts 44 prompts"),
    "flag heldout probes of a tiny task": lambda w: (
        write_tsv(w["root"] / "data/train.tsv", [["premise", "hypothesis", "label", "score"]] + [
            [f"p {i}", f"h {i}", ["yes", "no"][i % 2], "1.5"] for i in range(8)])
        and w["flags"] + ["--probe-on", "heldout"], "8 rows leave none"),
    "task f1 on three labels": task_change(lambda t: t[0].update(labels=["yes", "no", "maybe"], metric="f1"),
                                           "metric 'f1' is binary F1"),
    "train header names a column twice": file_change("data/train.tsv", "premise\thypothesis\tlabel\tpremise\n"
                                                     "a\tb\tyes\t1\nc\td\tno\t2\n",
                                                     "names column 'premise' more than once"),
    "test file of another size (GLUE)": lambda w: (
        ["--data-dir", str(SMALL_GLUE), "--tasks", "RTE", "--model", str(w["root"] / "model"), "--output-dir",
         str(w["root"] / "run"), "--cache-dir", str(w["root"] / "cache"), "--max-steps", "2"],
        "16 rows, but GLUE's RTE test file has 3000"),
    "model config size as a string": model_change(
        lambda m: edit_json(m / "config.json", lambda c: c.update(vocab_size="30522")), "vocab_size must be"),
    "model config 100000 layers": model_change(
        lambda m: edit_json(m / "config.json", lambda c: c.update(num_hidden_layers=100_000)),
        "num_hidden_layers must be a whole number from 1 to 256"),
    "model cased vocabulary without casing": model_change(lambda m: (m / "vocab.txt").write_text("\n".join(
        uppercased((m / "vocab.txt").read_text().split("\n"), 2000))), "has capital letters"),
    "model casing not a boolean": model_change(
        lambda m: (m / "tokenizer_config.json").write_text('{"do_lower_case": "no"}'),
        "do_lower_case must be true or false"),
    "predict output is a folder": lambda w: predict_case("text\nA\n", "cannot write a file there",
                                                         extra=("--predict-output", str(w["root"])))(w),
    "predict mtop.json labels as a string": predict_case("text\nA\n", "must be 2 strings", edit=lambda b:
        edit_json(b / "mtop.json", lambda s: s["metadata"]["tasks"][0].update(labels="xy"))),
    "predict corpus whose header is blank": predict_case("\ntext\nA\n", "the header row is empty"),
    "model config pad id past the vocabulary": model_change(
        lambda m: edit_json(m / "config.json", lambda c: c.update(pad_token_id=40000)), "pad_token_id 40000"),
    "predict three text columns": predict_case("a\tb\tc\nx\ty\tz\n", "names 3 columns",
                                               extra=("--text-columns", "a,b,c")),
    "predict mtop.json labels of the wrong count": predict_case("text\nA\n", "must be 2 strings",
                                                                edit=lambda b:
        edit_json(b / "mtop.json", lambda s: s["metadata"]["tasks"][0].update(labels=["yes"]))),
    "predict mtop.json NaN scale": predict_case("text\nA\n", "std > 0", edit=lambda b: edit_json(
        b / "mtop.json", lambda s: s["metadata"]["tasks"][1].update(scale=[float("nan"), 1.0]))),
    "predict mtop.json 20000 tasks": predict_case("text\nA\n", "1 to 10000", edit=lambda b: edit_json(
        b / "mtop.json", lambda s: s.update(tasks=[[f"t{i}", 2] for i in range(20_000)]))),
    "predict mtop.json task of no classes": predict_case("text\nA\n", "item 0", edit=lambda b: edit_json(
        b / "mtop.json", lambda s: s["tasks"][0].__setitem__(1, "2"))),
    "predict mtop.json far too large": predict_case("text\nA\n", "bytes; a settings file", edit=lambda b:
        (b / "mtop.json").write_text((b / "mtop.json").read_text() + " " * (2 << 20))),
    "predict mtop.json max_length -1": predict_case("text\nA\n", "max_length -1", edit=lambda b: edit_json(
        b / "mtop.json", lambda s: s["metadata"].update(max_length=-1))),
    "predict config of 2^40 units": predict_case("text\nA\n", "hidden_size must be", edit=lambda b: edit_json(
        b / "mtop.json", lambda s: s["encoder_config"].update(hidden_size=2**40))),
    # issue 27: a repeated vocabulary token; task names that cannot name a file; the new --predict flags
    "model vocab with a repeated token": model_change(lambda m: (m / "vocab.txt").write_text(
        "\n".join((lines := (m / "vocab.txt").read_text().split("\n"))[:1001] + lines[1000:])),
        "line 1002: the token"),
    "task name with a line break": task_change(lambda t: t[0].update(name="a\nb"), "holds '\\n'"),
    "task name of 300 characters": task_change(lambda t: t[0].update(name="x" * 300),
                                               "is 300 characters long"),
    "predict mtop.json task name '..'": predict_case("text\nA\n", "the name is '..'", edit=lambda b:
        edit_json(b / "mtop.json", lambda s: s["tasks"][0].__setitem__(0, ".."))),
    "predict id column absent": predict_case("text\nA\n", "no column 'id'", extra=("--id-column", "id")),
    "predict id column is the text": predict_case("text\nA\n", "also a text column",
                                                  extra=("--id-column", "text", "--text-columns", "text")),
    "predict the same text column twice": predict_case("text\nA\n", "names 'text' twice",
                                                       extra=("--text-columns", "text,text")),
    "flag --seed -1": bad_flag("--seed", "-1"),
    "flag --seed 2**40": bad_flag("--seed", str(2**40)),
    "flag --predict-chunk 10**30": bad_flag("--predict-chunk", str(10**30)),
    "predict mtop.json nested 100,000 deep": predict_case("text\nA\n", "nested too deeply", edit=lambda b:
        (b / "mtop.json").write_text("[" * 100_000 + "]" * 100_000)),
    "predict corpus line nested 100,000 deep": lambda w: deep_jsonl_case(w),
    "labels that would overflow mtop.json": task_change(lambda t: t[2].update(
        labels=["yes", "no"] + [f"label {i} " + "x" * 240 for i in range(5_000)]), "over its limit"),
    "predict a task that is not there": predict_case("text\nA\n", "no task 'topic'",
                                                     extra=("--predict-tasks", "topic")),
    "predict a pair task on one text": predict_case("text\nA\n", "'nli' reads sentence pairs",
                                                    extra=("--predict-tasks", "nli")),
}


def jsonl_case(w):
    path = w["root"] / "corpus.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    shutil.copytree(w["trained"], w["root"] / "best")
    return ["--predict", str(path), "--checkpoint",
            str(w["root"] / "best")], "corpus.jsonl:2: not a JSON object"


def test_bad_input_suite_is_large_enough_and_counted_in_the_reference():
    """The suite below covers at least 60 distinct broken inputs, as many as docs/reference.md says."""
    print(f"bad-input suite: {len(BAD_INPUTS)} broken inputs")
    assert len(BAD_INPUTS) >= 60
    stated = re.search(r"The tests try (\d+) distinct broken inputs",
                       (ROOT / "docs" / "reference.md").read_text())
    assert stated and int(stated.group(1)) == len(BAD_INPUTS)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_message(name, tiny_model, trained_folder, tmp_path, capsys):
    """train.py stops with a non-zero exit and one message naming the file, line, key or flag, with no
    traceback (nothing but SystemExit escapes), and changes no input file."""
    world = make_world(tmp_path, tiny_model) | {"trained": trained_folder}
    argv, expected = BAD_INPUTS[name](world)
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "run" not in p.parts
              and "cache" not in p.parts}
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    code = stop.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None), name
    assert isinstance(code, int) or message.startswith("error:"), message
    assert expected in message, (name, message)
    assert "Traceback" not in message
    for path, before in inputs.items():
        assert path.read_bytes() == before, f"{name} changed {path}"


# -- property-based: random bytes and rows get a clean result or the project's own error --------------------

RANDOM_CELLS = st.one_of(st.text(alphabet=list("ab ,\t\"'\\n\r\x00é€"), max_size=12), st.sampled_from(["yes",
                                                                                                       "no",
                                                                                                       "1.5",
                                                                                                       "nan",
                                                                                                       ""]))


RANDOM_ROWS = st.lists(st.lists(RANDOM_CELLS, min_size=0, max_size=5), max_size=8)


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def custom_task(folder: Path, suffix: str, kind: str = "classification") -> glue_data.Task:
    return glue_data.Task("t", kind, ("yes", "no") if kind == "classification" else None,
                          ("accuracy",) if kind == "classification" else ("pearson",),
                          (("train", str(folder / f"train{suffix}")),), ("a", "b"), "label")


@PROPERTY_SETTINGS
@given(content=st.one_of(st.binary(max_size=200), RANDOM_ROWS.map(
    lambda rows: "\n".join("\t".join(r) for r in [["a", "b", "label"]] + rows).encode())),
       suffix=st.sampled_from([".tsv", ".csv"]), kind=st.sampled_from(["classification", "regression"]))
def test_table_reader_gives_rows_or_a_clear_error(content, suffix, kind):
    """load_split on any bytes (and on random rows under a valid header) returns examples whose fields
    line up, or raises ValueError naming the file: never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        task = custom_task(Path(folder), suffix, kind)
        (Path(folder) / f"train{suffix}").write_bytes(content)
        try:
            examples = glue_data.load_split(task, "train", folder)
        except ValueError as err:
            assert f"train{suffix}" in str(err)
            return
        assert len(examples.text_a) == len(examples.text_b) == len(examples.labels)
        if kind == "regression":
            assert np.isfinite(examples.labels).all()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                        inner,
                                                                                        max_size=4),
                           max_leaves=12)


TASK_KEYS = st.sampled_from(["name", "train", "dev", "test", "text", "label", "type", "labels", "metric",
                              "missing", "other"])


@PROPERTY_SETTINGS
@given(tasks=st.lists(st.dictionaries(TASK_KEYS, JSON_VALUES | st.sampled_from(
    ["train.tsv", "classification", "regression", "a", ["a", "b"], "label"]), max_size=10), max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_task_set_loader_gives_tasks_or_a_clear_error(tasks, raw):
    """load_task_set on random task entries (or random bytes) gives tasks or a ValueError/FileNotFoundError
    naming the JSON file: never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "train.tsv").write_text("a\tb\tlabel\nx\ty\tyes\nz\tw\tno\n")
        path = Path(folder) / "tasks.json"
        path.write_bytes(raw if raw is not None else json.dumps({"tasks": tasks}).encode())
        try:
            loaded = glue_data.load_task_set(str(path), folder)
        except (ValueError, FileNotFoundError) as err:
            assert "tasks.json" in str(err) or "train.tsv" in str(err) or "no such" in str(err).lower()
            return
        assert all(isinstance(t, glue_data.Task) for t in loaded)


@PROPERTY_SETTINGS
@given(content=st.one_of(st.binary(max_size=200), RANDOM_ROWS.map(
    lambda rows: "\n".join("\t".join(r) for r in [["text"]] + rows).encode())),
       suffix=st.sampled_from([".tsv", ".jsonl"]), columns=st.sampled_from([[], ["text"], ["text", "b"]]))
def test_corpus_reader_gives_rows_or_a_clear_error(content, suffix, columns):
    """read_corpus on any bytes yields (row, id, text, text or None) with rows 0, 1, ... and strings, or
    stops with one 'error:' message naming the corpus: never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"corpus{suffix}"
        path.write_bytes(content)
        try:
            rows = list(support_corpus.read_corpus(path, columns))
        except SystemExit as stop:
            assert str(stop.code).startswith("error:") and "corpus" in str(stop.code)
            return
        assert [row for row, _, _, _ in rows] == list(range(len(rows)))
        for _, ident, text_a, text_b in rows:
            assert ident is None and isinstance(text_a, str) and (text_b is None or isinstance(text_b, str))
