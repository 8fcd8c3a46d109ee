"""train.py end to end: resume, custom task sets, probes, one pass for tasks on shared texts, torchrun."""

import json
import os
import re
import subprocess
import sys
import unittest.mock as unittest_mock
import zipfile

import pytest
import torch

import glue_data
import train
from conftest import ROOT, SMALL_GLUE, count_encoder_passes, many_label_set, run_args
from support import labelling, run_state
from support import submission as support_submission

# -- train.py: end to end, resume, prediction, torchrun -------------------------

def test_resume_is_bitwise_identical(tiny_model, token_cache, tmp_path):
    """A run stopped at step 10 and resumed gives the same losses and weights as an uninterrupted run."""
    common = ["--tasks", "RTE,STS-B", "--max-steps", "20", "--interval", "5", "--eval-every", "10",
              "--no-test"]
    whole = train.main(run_args(tiny_model, token_cache, tmp_path / "a", *common))
    first = train.main(run_args(tiny_model, token_cache, tmp_path / "b", *common, "--stop-after", "10"))
    second = train.main(run_args(tiny_model, token_cache, tmp_path / "b", *common, "--resume"))
    assert first["losses"] + second["losses"] == whole["losses"]
    assert second["history"] == whole["history"]
    a = run_state.load_checkpoint(tmp_path / "a" / run_state.CHECKPOINT)
    b = run_state.load_checkpoint(tmp_path / "b" / run_state.CHECKPOINT)
    assert a["step"] == b["step"] == 20
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_resume_with_other_settings_is_refused(tiny_model, token_cache, tmp_path):
    """--resume with a flag that shapes the run changed names the flag instead of mixing two runs; a new
    run into the folder of another one is refused too."""
    common = ["--tasks", "RTE", "--max-steps", "4", "--sampler", "uniform", "--no-test"]
    train.main(run_args(tiny_model, token_cache, tmp_path, *common, "--stop-after", "2"))
    with pytest.raises(SystemExit, match="exists: continue that run with --resume"):
        train.main(run_args(tiny_model, token_cache, tmp_path, *common))
    with pytest.raises(SystemExit, match=r"--max-steps 4 -> 6"):
        train.main(run_args(tiny_model, token_cache, tmp_path, *common[:3], "6", *common[4:], "--resume"))


@pytest.mark.parametrize("mode", ["mtop", "none"])
def test_evaluation_probes_and_test_files_of_tasks_on_one_file_take_one_pass(tiny_model, token_cache,
                                                                             tmp_path, monkeypatch, mode):
    """Six tasks on one set of files (a missing label on some rows of one): the dev evaluation and the
    probes encode each dev text once (one pass per batch for all six), and give the scores that each
    task's own passes give (predict_encoded per task); and the test predictions of the six tasks come
    from one pass per batch too."""
    task_set = many_label_set(tmp_path)
    args = train.parse_args(run_args(tiny_model, token_cache, tmp_path / "run", "--task-set", str(task_set),
                                     "--mode", mode, "--no-test", "--probe-size", "10"))
    train.start_process(args)
    tasks, data, model, _ = train.set_up(args, 0, 1, "cpu")
    passes = count_encoder_passes(model)
    grouped, probed = train.evaluate(model, tasks, data, args), train.probe(model, tasks, data, args)
    assert len(passes) == 1 + 1  # 24 dev rows: one batch of 64 each time, for all six tasks

    def each_own(model, requests, device, dtype, scales, **kwargs):
        return [labelling.predict_encoded(model, task, encoded, rows, device, dtype, scales[task])
                for task, encoded, rows in requests]
    monkeypatch.setattr(train, "predict_tasks", each_own)
    passes.clear()
    alone, probed_alone = train.evaluate(model, tasks, data, args), train.probe(model, tasks, data, args)
    assert len(passes) == 2 * len(tasks)
    assert grouped == alone and probed == probed_alone  # bitwise: see predict_tasks
    assert len(data["lang"]["dev"]["dev"].labelled) < len(data["sport"]["dev"]["dev"].labelled)
    monkeypatch.undo()
    recorded, real_predict_tasks = [], support_submission.predict_tasks

    def counting(model, requests, *args, **kwargs):
        recorded.append(count_encoder_passes(model))  # this list fills as the passes run
        return real_predict_tasks(model, requests, *args, **kwargs)
    monkeypatch.setattr(support_submission, "predict_tasks", counting)
    train.main(run_args(tiny_model, token_cache, tmp_path / "run", "--task-set", str(task_set), "--mode",
                        mode, "--max-steps", "2", "--sampler", "uniform"))
    assert len(recorded) == 1 and len(recorded[0]) == 1  # 16 test texts, one batch: one pass for six tasks
    with zipfile.ZipFile(tmp_path / "run" / "submission" / "test_predictions.zip") as z:
        assert sorted(z.namelist()) == sorted(f"{t.name}.tsv" for t in tasks)
        assert all(len(z.read(name).decode().splitlines()) == 1 + 16 for name in z.namelist())


@pytest.mark.parametrize("extra, expected", [
    ([], [{"lr": r} for r in (5e-4, 1e-3, 1e-3, 5e-4)]),
    (["--prompt-lr", "1e-2", "--head-lr", "3e-3"],
     [{"lr": r, "prompt_lr": 10 * r, "head_lr": 3 * r} for r in (5e-4, 1e-3, 1e-3, 5e-4)]),
    (["--freeze-encoder", "--prompt-lr", "1e-3"], [{"lr": r} for r in (5e-4, 1e-3, 1e-3, 5e-4)]),
])
def test_each_step_logs_the_learning_rates_it_used(tiny_model, token_cache, tmp_path, extra, expected):
    """log.jsonl's step k holds the rates step k trained with, worked by hand from the schedule (4 steps,
    warm-up int(0.5 * 4) = 2: k/2 up to 1, then (4 - k + 1)/2): the backbone's, and the prompts' and
    heads' where they differ; they match the optimizer's own rate at each step."""
    out = tmp_path / "run"
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(sorted({g["lr"] for g in self.param_groups}))
        return real_step(self, *args, **kwargs)
    with unittest_mock.patch.object(torch.optim.AdamW, "step", recording_step):
        train.main(run_args(tiny_model, token_cache, out, "--tasks", "RTE,STS-B", "--lr", "1e-3", "--warmup",
                            "0.5", "--max-steps", "4", "--no-test", "--sampler", "uniform", *extra))
    steps = [json.loads(line) for line in open(out / "log.jsonl") if '"step"' in line and '"loss"' in line]
    logged = [{k: v for k, v in r.items() if k.endswith("lr")} for r in steps]
    assert len(logged) == len(expected) == len(seen) == 4
    for record, by_hand, used in zip(logged, expected, seen):
        assert record == pytest.approx(by_hand, rel=1e-9)
        assert sorted(set(record.values())) == pytest.approx(used, rel=1e-9)


def test_heldout_probe_rows_are_left_out_of_training(tiny_model, token_cache):
    """--probe-on heldout probes on a seeded slice of train that training never sees (section 4.6)."""
    args = train.parse_args(run_args(tiny_model, token_cache, "unused", "--probe-on", "heldout",
                                     "--probe-size", "100"))
    tasks = glue_data.load_task_set("glue", SMALL_GLUE, ["RTE", "STS-B"])
    data = train.load_data(args, tasks, glue_data.load_tokenizer(tiny_model), rank=1)
    for task in tasks:
        name, rows = task.name, len(glue_data.load_split(task, "train", SMALL_GLUE))
        encoded, probe = data[name]["probe"]
        assert encoded is data[name]["train"] and len(probe) == min(rows // 10, 100) > 0
        assert not set(probe) & set(data[name]["train_idx"])
        assert len(probe) + len(data[name]["train_idx"]) == rows


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--save-every", "0"], ["--warmup", "1"],
                                   ["--probe-size", "-1"], ["--epochs", "0"], ["--max-grad-norm", "nan"],
                                   ["--lr", "inf"], ["--weight-decay", "inf"], ["--gamma", "nan"]])
def test_bad_numeric_flags_are_refused_before_any_work(flags, capsys):
    """A flag out of range stops argument parsing with a message that names it."""
    with pytest.raises(SystemExit) as stop:
        train.parse_args(flags)
    assert stop.value.code == 2 and flags[0] in capsys.readouterr().err


def test_missing_glue_files_stop_before_training(tiny_model, token_cache, tmp_path):
    """--task-set glue without MNLI/QQP/QNLI train stops with the missing paths and the options."""
    with pytest.raises(SystemExit) as stop:
        train.main(run_args(tiny_model, token_cache, tmp_path / "run"))
    message = str(stop.value)
    assert "MNLI" in message and "QQP" in message and str(SMALL_GLUE / "QNLI" / "train.tsv") in message
    assert "--tasks" in message and "download" in message
    assert not (tmp_path / "run").exists()


def test_torchrun_ranks_agree(tiny_model, token_cache, tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks choose the same tasks, take different batches and
    end with equal weights."""
    args = run_args(tiny_model, token_cache, tmp_path / "run", "--tasks", "RTE,STS-B", "--max-steps", "8",
                    "--interval", "4", "--no-test")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2",
                           str(ROOT / "train.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each rank prints "rank R: S steps, tasks <hash>, weights <hash>" (lines of the ranks may interleave).
    found = re.findall(r"rank (\d): 8 steps, tasks ([0-9a-f]{16}), weights ([0-9a-f]{16}), batches "
                       r"([0-9a-f]{16})",
                       done.stdout)
    ranks = {rank: fingerprint for rank, *fingerprint in found}
    assert sorted(ranks) == ["0", "1"], done.stdout
    assert ranks["0"][:2] == ranks["1"][:2]  # the same task at every step, the same weights at the end
    assert ranks["0"][2] != ranks["1"][2]  # but each rank trained on its own batches


def test_a_short_run_says_what_dts_will_do_and_only_glue_gets_table_1s_average(tiny_model, token_cache,
                                                                               tmp_path, capsys):
    """With --interval longer than the run, DTS would probe once and rotate the tasks: the start of the run
    says so and what to give instead; a custom task set's evaluation line has no "Table 1's" average,
    GLUE's has; the last lines name best/ and the command that labels a corpus with it."""
    train.main(run_args(tiny_model, token_cache, tmp_path / "glue", "--tasks", "RTE,STS-B", "--max-steps",
                        "4", "--no-test"))
    out = capsys.readouterr().out
    assert "warning: DTS probes every --interval 1000 steps, so in 4 steps it probes once" in out
    assert "give --interval 1 for about five probes, or --sampler proportional" in out
    assert re.search(r"dev at step 4: average [\d.-]+ \(Table 1's: [\d.-]+\)", out)
    assert f"best model: {tmp_path / 'glue' / 'best'}" in out
    assert "label a corpus with it: python train.py --predict corpus.tsv" in out
    task_set = many_label_set(tmp_path / "custom")
    train.main(run_args(tiny_model, token_cache, tmp_path / "custom-run", "--task-set", str(task_set),
                        "--max-steps", "4", "--interval", "2", "--no-test"))
    out = capsys.readouterr().out
    assert "warning: DTS" not in out and "Table 1's" not in out and "dev at step 4: average" in out
