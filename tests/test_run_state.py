"""support/run_state.py through train.py: run state that never runs code, is never lost or non-finite."""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import glue_data
import train
from conftest import (
    ROOT,
    SMALL_GLUE,
    Payload,
    edit_checkpoint,
    edit_json,
    make_world,
    many_label_set,
    run_args,
)
from support import checks as support_checks
from support import run_state

# -- support/run_state.py through train.py: run state that never runs code, is never lost or non-finite ---

def test_pickled_checkpoint_is_never_loaded(tiny_model, token_cache, tmp_path):
    """A checkpoint.pt of the old pickle format, carrying a payload, is refused by --resume and by a new run,
    and the payload never runs; train.py writes checkpoint.safetensors, whose header holds JSON, not
    pickle."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"model": Payload(marker), "step": 1}, out / "checkpoint.pt")
    common = ["--tasks", "RTE", "--max-steps", "2", "--sampler", "uniform", "--no-test"]
    for extra in (["--resume"], []):
        with pytest.raises(SystemExit, match="pickle file. It is not loaded"):
            train.main(run_args(tiny_model, token_cache, out, *common, *extra))
    assert not marker.exists()
    fresh = tmp_path / "fresh"
    train.main(run_args(tiny_model, token_cache, fresh, *common))
    raw = (fresh / run_state.CHECKPOINT).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # safetensors: length, JSON header
    state = json.loads(header["__metadata__"]["mtop_checkpoint"])
    assert state["step"] == 2 and state["args"]["max_steps"] == 2
    assert b"\x80\x04" not in raw[:8 + int.from_bytes(raw[:8], "little")]  # no pickle protocol marker


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_checkpoint_gets_one_message(tiny_model, token_cache, tmp_path, damage):
    """An empty, truncated or random checkpoint file ends --resume with one message naming the file."""
    out = tmp_path / "run"
    common = ["--tasks", "RTE", "--max-steps", "4", "--sampler", "uniform", "--no-test"]
    train.main(run_args(tiny_model, token_cache, out, *common, "--stop-after", "2"))
    path = out / run_state.CHECKPOINT
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2],
                      "random": np.random.default_rng(0).bytes(4096)}[damage])
    with pytest.raises(SystemExit, match=f"{re.escape(str(path))} is damaged"):
        train.main(run_args(tiny_model, token_cache, out, *common, "--resume"))


def test_resume_drops_a_log_line_cut_off_by_a_crash(tiny_model, token_cache, tmp_path):
    """A log.jsonl whose last line was cut off does not block --resume: the broken record is dropped."""
    out = tmp_path / "run"
    common = ["--tasks", "RTE", "--max-steps", "4", "--sampler", "uniform", "--no-test"]
    train.main(run_args(tiny_model, token_cache, out, *common, "--stop-after", "2"))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"event": "step", "st')
    result = train.main(run_args(tiny_model, token_cache, out, *common, "--resume"))
    assert result["step"] == 4
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl") if '"event": "step"' in line]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_changed_training_data(tiny_model, token_cache, tmp_path):
    """--resume after the training file changed names the task whose data changed."""
    data = tmp_path / "glue"
    shutil.copytree(SMALL_GLUE / "RTE", data / "RTE")
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--tasks", "RTE", "--max-steps", "4", "--sampler", "uniform",
              "--no-test"]
    train.main(run_args(tiny_model, token_cache, out, *common, "--stop-after", "2"))
    lines = (data / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    (data / "RTE" / "train.tsv").write_text("".join(lines[:-5]))
    with pytest.raises(SystemExit, match="the training data of RTE changed"):
        train.main(run_args(tiny_model, token_cache, out, *common, "--resume"))


@pytest.mark.parametrize("change, expected", [
    ("dev label", "the dev data of nli changed"),
    ("dev text", "the dev data of nli changed"),
    ("metric", "the definition (type, labels, metrics, columns) of nli changed"),
    ("missing", "the definition (type, labels, metrics, columns) of sim changed"),
])
def test_resume_refuses_changed_dev_data_and_task_definitions(tiny_model, tmp_path, change, expected):
    """Between a stop and --resume, a flipped dev label, an edited dev text or a changed task definition
    would change the run's evaluations (and DTS's rewards): the resume is refused, naming what changed.
    A checkpoint written before these digests existed resumes on the training data's alone."""
    world = make_world(tmp_path / "w", tiny_model)
    flags = world["flags"] + ["--max-steps", "4"]
    train.main(flags + ["--stop-after", "2"])
    dev = tmp_path / "w" / "data" / "dev.tsv"
    rows = [line.split("\t") for line in dev.read_text().splitlines()]
    if change == "dev label":
        rows[1][2] = {"yes": "no", "no": "yes"}[rows[1][2]]
    elif change == "dev text":
        rows[3][1] = "an edited claim"
    if change.startswith("dev"):
        dev.write_text("".join("\t".join(r) + "\n" for r in rows))
    else:
        edit_json(tmp_path / "w" / "tasks.json", lambda spec: spec["tasks"][0 if change == "metric" else 1]
                  .update({"metric": "mcc"} if change == "metric" else {"missing": ["-"]}))
    with pytest.raises(SystemExit, match=re.escape(expected)):
        train.main(flags + ["--resume"])
    checkpoint = tmp_path / "w" / "run" / run_state.CHECKPOINT
    edit_checkpoint(checkpoint, lambda s: s.update(data={k: v for k, v in s["data"].items() if "/" not in k}))
    train.main(flags + ["--resume"])  # an older checkpoint: only the training data is compared


def test_diverging_run_stops_and_keeps_no_nonfinite_weights(tiny_model, token_cache, tmp_path):
    """--lr 1e10: the run stops with a message naming the step and task, and exits non-zero; no file under
    the run folder holds a NaN or infinite weight."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(run_args(tiny_model, token_cache, out, "--tasks", "RTE,STS-B", "--max-steps", "20",
                            "--eval-every", "1", "--interval", "5", "--lr", "1e10", "--warmup", "0",
                            "--no-test"))
    message = str(stop.value)
    assert message.startswith("error:") and re.search(r"at step \d+", message) and "Lower --lr" in message
    files = list(out.rglob("*.safetensors"))
    assert files, "the steps before the divergence left a checkpoint"
    for file in files:
        for name, tensor in load_file(str(file)).items():
            assert torch.isfinite(tensor.float()).all(), (file, name)


HEAP_PROBE = """
import ctypes, sys, torch
from support.system import limit_heap_growth
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "fixed":
    limit_heap_growth()
first = torch.ones(10 << 18)  # 10 MiB: above every threshold, so its own mapping
del first  # glibc's default now raises its threshold to 10 MiB
before = libc.mallinfo2().hblkhd  # bytes in separate mappings
second = torch.ones(6 << 18)  # 6 MiB
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


def has_mallinfo2() -> bool:
    import ctypes
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33")
def test_limit_heap_growth_keeps_large_tensors_out_of_the_heap(monkeypatch, tiny_model, token_cache,
                                                               tmp_path):
    """limit_heap_growth (train.py calls it for CPU training): a 6 MiB tensor made after a 10 MiB one was
    freed gets its own mapping (given back when freed), where glibc's default would put it in the heap,
    which fragments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES",
                                                                    "LD_PRELOAD"))}

    def mapped_mib(variant):
        done = subprocess.run([sys.executable, "-c", HEAP_PROBE, variant], cwd=ROOT, capture_output=True,
                              text=True,
                              env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])
    assert mapped_mib("default") == 0  # the default's threshold grew: the tensor went to the heap
    assert mapped_mib("fixed") == 6
    calls = []  # and train() sets it for a CPU run
    monkeypatch.setattr(train, "limit_heap_growth", lambda: calls.append(1))
    train.main(run_args(tiny_model, token_cache, tmp_path / "run", "--tasks", "RTE", "--max-steps", "1",
                        "--no-test"))
    assert calls == [1]


def test_torchrun_predict_shards_the_corpus_and_keeps_input_order(tiny_model, token_cache, tmp_path):
    """torchrun --nproc_per_node=2 train.py --predict: the processes share every chunk's batches, and the
    output equals a one-process run byte for byte, with chunks of 300 rows and with the whole corpus in
    one chunk (a corpus smaller than K chunks still keeps both processes busy, and the last line counts
    each one's rows); --predict-output naming the input is refused, the input unchanged."""
    out = tmp_path / "run"
    train.main(run_args(tiny_model, token_cache, out, "--tasks", "SST-2,STS-B", "--max-steps", "4",
                        "--interval", "2", "--no-test"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"sentence number {i} is {'good' if i % 3 else 'bad'}"})
                              + "\n"
                              for i in range(2500)))
    before = corpus.read_bytes()
    with pytest.raises(SystemExit, match="is the input file"):
        train.main(["--predict", str(corpus), "--checkpoint", str(out / "best"), "--predict-output",
                    str(corpus)])
    assert corpus.read_bytes() == before
    single = train.main(["--predict", str(corpus), "--checkpoint", str(out / "best"),
                         "--predict-output", str(tmp_path / "one.jsonl")])
    chunked = train.main(["--predict", str(corpus), "--checkpoint", str(out / "best"), "--predict-chunk",
                          "300",
                          "--predict-output", str(tmp_path / "small.jsonl")])
    assert chunked.read_text() == single.read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for chunk in ("300", "4096"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "train.py"), "--predict", str(corpus), "--checkpoint", str(out / "best"),
                   "--predict-output", str(tmp_path / "two.jsonl"), "--predict-chunk", chunk]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "two.jsonl").read_text() == single.read_text()
        shares = re.search(r"2500 rows \(per process: (\d+), (\d+)\)", done.stdout + done.stderr)
        counts = [int(n) for n in shares.groups()] if shares else [0, 0]
        assert sum(counts) == 2500 and min(counts) > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no parts left


def test_full_disk_stops_the_run_with_one_message_and_keeps_the_last_checkpoint(tiny_model, token_cache,
                                                                                tmp_path,
                                                                               monkeypatch):
    """A write that fails for lack of space ends the run with one message that says so; the previous
    checkpoint is whole and a later --resume continues from it."""
    out = tmp_path / "run"
    common = ["--tasks", "RTE", "--max-steps", "6", "--sampler", "uniform", "--no-test", "--save-every", "2"]
    train.main(run_args(tiny_model, token_cache, out, *common, "--stop-after", "2"))
    real = run_state.save_file

    def no_space(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_state, "save_file", no_space)
    with pytest.raises(SystemExit,
                       match="no space left on the device while writing .*checkpoint.safetensors"):
        train.main(run_args(tiny_model, token_cache, out, *common, "--resume"))
    assert run_state.load_checkpoint(out / run_state.CHECKPOINT)["step"] == 2
    assert not list(out.glob(".checkpoint*"))  # no temporary file left behind
    monkeypatch.setattr(run_state, "save_file", real)
    assert train.main(run_args(tiny_model, token_cache, out, *common, "--resume"))["step"] == 6


def test_the_size_check_of_mtop_json_bounds_the_file_evaluations_write(tiny_model, token_cache, tmp_path):
    """support.checks.check_metadata_size, run before the first step, is an upper bound of the size of the
    best/mtop.json a run then writes (here with long task names and labels, two dev splits for MNLI-like
    names), so a run it lets through never fails to write it."""
    world = make_world(tmp_path / "w", tiny_model)
    edit_json(tmp_path / "w" / "tasks.json", lambda spec: spec["tasks"][2].update(
        name="k" * 90, labels=["yes", "no"] + [f"label {i} " + "x" * 90 for i in range(200)]))
    args = train.parse_args(world["flags"] + ["--max-steps", "2"])
    train.start_process(args)
    tasks, data, model, _ = train.set_up(args, 0, 1, "cpu")
    bound = support_checks.check_metadata_size(model, train.model_metadata(tasks, data, args), tasks)
    train.main(world["flags"] + ["--max-steps", "2"])
    written = (tmp_path / "w" / "run" / "best" / "mtop.json").stat().st_size
    assert written <= bound < 2 * written


def test_the_eta_counts_the_evaluations_and_probes_still_to_come():
    """run_state.still_to_come, the ETA's counts once a step is trained (before its own evaluation),
    against counting them one step at a time: an evaluation after every eval_every-th step and after the
    last, a DTS probe before every interval-th step."""
    for total in range(1, 40):
        for every in range(1, 12):
            for interval in range(0, 12):
                for step in range(1, total + 1):
                    evals = sum(1 for k in range(step, total + 1) if k % every == 0 or k == total)
                    probes = sum(1 for k in range(step, total) if interval and k % interval == 0)
                    assert run_state.still_to_come(step, total, every, interval) == (evals, probes), \
                        (step, total, every, interval)


def test_the_training_digest_is_the_one_earlier_versions_wrote(minilm_tokenizer, tmp_path):
    """data_fingerprint's training digest of a task with missing labels equals the digest of the data as
    versions before this one held it (only the labelled rows tokenized, the train rows counted among
    them): their checkpoints still resume. Reference: the old layout built anew with glue_data.encode."""
    task_set = many_label_set(tmp_path)
    [lang] = glue_data.load_task_set(str(task_set), ".", ["lang"])
    encoded = glue_data.load_encoded(lang, "train", ".", minilm_tokenizer, 32)
    train_rows = encoded.labelled[::2]  # a seeded sample, as --max-train-examples draws
    examples = glue_data.load_split(lang, "train", ".")
    old = glue_data.encode(minilm_tokenizer, [examples.text_a[i] for i in examples.labelled], None, 32)
    positions = np.searchsorted(examples.labelled, train_rows)
    expected = hashlib.sha256(old.ids.tobytes() + old.offsets.tobytes() + positions.tobytes()
                              + examples.labels[examples.labelled].tobytes()).hexdigest()[:16]
    data = {"lang": {"train": encoded, "train_idx": train_rows, "dev": {}, "probe": (encoded, train_rows)}}
    assert len(encoded.labelled) < len(encoded)  # rows without a label are there, kept out of the digest
    assert run_state.data_fingerprint([lang], data)["lang"] == expected
