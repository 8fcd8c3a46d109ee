"""Faults: kills in the middle of a write, one process per run folder and output, SIGTERM and Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, make_world
from support import run_state

# -- faults: a kill in the middle of writing leaves the last complete state --------------------------------

DIE_DURING = '''
import os, sys
sys.path.insert(0, {root!r})
import support.run_state
import train
calls = 0

def dying(*args, **kwargs):  # the {which} call starts writing, then the process is killed
    global calls
    calls += 1
    if calls == {which}:
        {half_write}
        os._exit(9)
    return real(*args, **kwargs)

real = {target}
{target} = dying
train.main(sys.argv[1:])
'''


def run_dying(target: str, which: int, half_write: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = DIE_DURING.format(root=str(ROOT), target=target, which=which, half_write=half_write)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def run_plain(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True,
                          env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_kill_during_a_checkpoint_write_then_resume_matches_an_unbroken_run(tiny_model, tmp_path):
    """A process killed halfway through writing its second checkpoint leaves the first one whole; --resume
    from it ends with weights bitwise equal to a run that was never interrupted."""
    world = make_world(tmp_path / "w", tiny_model)
    flags = [f for f in world["flags"]]
    flags[flags.index("--max-steps") + 1] = "12"
    unbroken = flags + ["--output-dir", str(tmp_path / "unbroken"), "--save-every", "4"]
    broken = flags + ["--output-dir", str(tmp_path / "broken"), "--save-every", "4"]
    run_plain(unbroken)
    died = run_dying("support.run_state.save_file", 2, "open(args[1], 'wb').write(b'\\\\0' * 4096)", broken)
    assert died.returncode == 9, died.stderr[-2000:]
    # the last whole one
    assert run_state.load_checkpoint(tmp_path / "broken" / run_state.CHECKPOINT)["step"] == 4
    run_plain(broken + ["--resume"])
    a = run_state.load_checkpoint(tmp_path / "unbroken" / run_state.CHECKPOINT)
    b = run_state.load_checkpoint(tmp_path / "broken" / run_state.CHECKPOINT)
    assert a["step"] == b["step"] == 12 and a["history"] == b["history"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_kill_during_predict_leaves_the_previous_output_whole(tiny_model, trained_folder, tmp_path):
    """A --predict killed after its first chunk leaves no file under the output's name (or the previous
    one, untouched); the next run writes the complete output."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("text\n" + "".join(f"text number {i}\n" for i in range(50)))
    target = tmp_path / "out.jsonl"
    argv = ["--predict", str(corpus), "--checkpoint", str(trained_folder), "--predict-output", str(target),
            "--predict-chunk", "10"]
    died = run_dying("train.Labeller.label_encoded", 3, "pass", argv)
    assert died.returncode == 9 and not target.exists()
    run_plain(argv)
    whole = target.read_text()
    assert len(whole.splitlines()) == 50
    died = run_dying("train.Labeller.label_encoded", 3, "pass", argv)
    assert died.returncode == 9 and target.read_text() == whole


# -- faults: one process per run folder and output; SIGTERM and Ctrl-C stop cleanly ----------------------

def hold_in_child(lock: Path) -> subprocess.Popen:
    """A separate process that holds `lock` (support.files.held) until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from support.files import held\nwith held(Path({str(lock)!r}), 'x'):\n"
            "    print('held', flush=True)\n    time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_run_folder_and_an_output_are_held_by_one_process_at_a_time(tiny_model, trained_folder, tmp_path):
    """While one process holds a run folder (or a --predict output), a second stops with one message
    naming it and the holder's pid, before any work and without touching it; once the holder is killed
    (SIGKILL: no clean-up), the lock is free again. Two trainings started together in one folder: one
    trains, the other is refused."""
    world = make_world(tmp_path / "w", tiny_model)
    out = tmp_path / "w" / "run"
    holder = hold_in_child(tmp_path / "w" / ".run.lock")
    with pytest.raises(SystemExit, match=rf"--output-dir {re.escape(str(out))} is in use by another process "
                                         rf"\(pid {holder.pid}\)"):
        train.main(world["flags"])
    assert not out.exists()
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("text\nA\n")
    target = tmp_path / "labels.jsonl"
    predict = ["--predict", str(corpus), "--checkpoint", str(trained_folder), "--predict-output", str(target)]
    output_holder = hold_in_child(tmp_path / ".labels.jsonl.lock")
    with pytest.raises(SystemExit, match="--predict-output .* is in use by another process"):
        train.main(predict)
    for child in (holder, output_holder):
        child.kill()
        child.wait()
    train.main(predict)
    assert target.exists() and not list(tmp_path.glob(".labels*"))  # the lock file goes with its holder
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), *world["flags"], "--max-steps", "40"]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    ended = [(p.wait(timeout=300), p.stderr.read()) for p in both]
    assert sorted(code for code, _ in ended) == [0, 1]
    assert "is in use by another process" in next(err for code, err in ended if code == 1)
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 41))  # one run's steps, once each


def signal_when(process: subprocess.Popen, ready, number: int) -> None:
    """Send the signal once ready() holds (polled every 50 ms, for at most 120 s)."""
    deadline = time.time() + 120
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(number)


@pytest.mark.parametrize("number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_bitwise(tiny_model, tmp_path,
                                                                                   number, code):
    """A signal mid-run: the step in hand finishes, a checkpoint of it is written, the run says how to go
    on and exits with 128 + the signal's number; --resume then ends bitwise equal to an unbroken run."""
    world = make_world(tmp_path / "w", tiny_model)
    flags = world["flags"] + ["--max-steps", "60", "--save-every", "1000"]
    run_plain(flags + ["--output-dir", str(tmp_path / "unbroken")])
    broken = flags + ["--output-dir", str(tmp_path / "broken")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *broken], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    log_file = tmp_path / "broken" / "log.jsonl"
    signal_when(process, lambda: log_file.exists() and log_file.read_text().count('"loss"') >= 5, number)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == code, output[-2000:]
    stopped = re.search(rf"stopped by {signal.Signals(number).name} after step (\d+), checkpoint written; "
                        "continue with --resume", output)
    assert stopped and 5 <= int(stopped.group(1)) < 60
    state = run_state.load_checkpoint(tmp_path / "broken" / run_state.CHECKPOINT)
    assert state["step"] == int(stopped.group(1))
    run_plain(broken + ["--resume"])
    a, b = (load_file(str(tmp_path / d / "best" / "model.safetensors")) for d in ("unbroken", "broken"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_during_predict_leaves_no_partial_output(trained_folder, tmp_path):
    """--predict stopped by SIGTERM exits non-zero, with no output file and no temporary file left."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("text\n" + "".join(f"text {i} " + "word " * (i % 50) + "\n" for i in range(20000)))
    target = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), "--predict", str(corpus), "--checkpoint",
               str(trained_folder), "--predict-output", str(target), "--predict-chunk", "500"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    signal_when(process, lambda: (tmp_path / ".out.jsonl.tmp").exists(), signal.SIGTERM)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 1 and "stopped by SIGTERM" in errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tsv"]
