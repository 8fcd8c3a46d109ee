"""Train MTOP on GLUE (or your own task set): the paper's section 4, top to bottom.

    python train.py --task-set glue                               # the paper's setting (section 4.1)
    python train.py --task-set glue --tasks RTE,MRPC --max-steps 200 --model path/to/model
    python train.py --predict corpus.tsv --checkpoint runs/mtop/best   # all tasks, one pass per batch
    torchrun --nproc_per_node=2 train.py --task-set glue           # data parallel (NCCL or gloo)

Read it top to bottom: the arguments; the data (one seeded, resumable batch stream per task); evaluation
and the scheduler's probes; set-up (model, AdamW, sampler); one training step; the loop (train); main.
Paper map:
    Algorithm 1 (probe every I steps, then choose a task per step) -> train()
    Algorithm 1, lines 7-9 (probe the metrics, update Q: Eq. 4)    -> probe_and_update()
    Algorithm 1, line 14 (train on task A_t for one step)          -> train_step()
    Eq. (5)-(6) choose a task; Eq. (7) epoch-dependent alpha       -> sampler.choose / sampler.set_epoch
    Table 1's average; its leaderboard files                       -> evaluate(); support.submission
The plumbing lives in support/ (README's map): the run's folder and checkpoints (support.run_state), the
checks before any work and the downloads (support.checks), torchrun and memory (support.system),
labelling (support.labelling, support.corpus), the leaderboard files (support.submission), the plot.
References: MTOP (section 4.1 hyperparameters); google-research/electra (fine-tuning recipe).
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import glue_data
import scheduler
from electra import DEFAULT_CACHE, Electra
from mtop import MODES, MTOP, POOLINGS, PROMPT_ENTRIES, PROMPT_INITS
from support.checks import (check_device, check_metadata_size, output_dir_held, prepare_inputs,
                            prompt_config, user_errors)
# Labeller is re-exported: README's `from train import Labeller`
from support.corpus import predict_corpus
from support.labelling import Labeller, predict_tasks  # noqa: F401
from support.plot import finish_message
from support.run_state import NonFiniteError, Run, data_fingerprint
from support.submission import write_test_predictions
from support.system import (StopSignals, autocast, broadcast, limit_heap_growth, log, pad_multiple,
                            release_memory, setup_distributed)

# -- arguments -------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


def add_data_and_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task-set", default="glue", help="'glue' or a JSON file defining tasks (see README)")
    g.add_argument("--tasks", default="", help="comma-separated subset of the task set, e.g. RTE,MRPC")
    g.add_argument("--data-dir", default="glue_data",
                   help="GLUE folder; downloaded when it holds no GLUE file")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="tokenized splits, and hub models converted from pytorch_model.bin")
    g.add_argument("--max-length", type=int, default=128,
                   help="tokens per text (pair), truncated longest-first")
    g.add_argument("--max-train-examples", type=int, default=0,
                   help="train on a fixed, seeded sample of at most this many rows per task (0: all)")
    g.add_argument("--probe-on", choices=("dev", "heldout"), default="dev",
                   help="data for the scheduler's probes: dev (the paper) or a held-out slice of train (4.6)")
    g.add_argument("--probe-size", type=int, default=2000,
                   help="examples per task in each probe, a fixed subset (dev: 0 = all of it; heldout: "
                        "10%% of train at most)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="google/electra-base-discriminator",
                   help="hub name (fetched through huggingface_hub and its cache) or local folder")
    g.add_argument("--revision", default="", help="the hub model's branch, tag or commit; empty: main")
    g.add_argument("--mode", choices=MODES, default="mtop", help="prompt setting of Fig. 1 (none = MT-DNN)")
    g.add_argument("--task-prompt-len", type=int, default=4, help="L: prompt tokens per task")
    g.add_argument("--shared-prompt-len", type=int, default=32, help="L': shared prompt tokens (mode mtop)")
    g.add_argument("--prompt-entry", choices=PROMPT_ENTRIES, default="after-norm",
                   help="where prompts join the embedded text (mtop.py; RESULTS.md compares them)")
    g.add_argument("--prompt-init", choices=PROMPT_INITS, default="random",
                   help="initial prompt vectors (mtop.py)")
    g.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="what a task head reads: mean = Eq. (1); mean+cls adds [CLS] (ours, mtop.py)")
    g.add_argument("--freeze-encoder", action="store_true", help="train prompts and heads only")
    g = p.add_argument_group("task scheduling")
    g.add_argument("--sampler", choices=scheduler.SAMPLERS, default="dts", help="dts = the paper's bandit")
    g.add_argument("--interval", type=int, default=1000, help="I: steps between metric probes")
    g.add_argument("--gamma", type=float, default=0.99, help="discount factor of Eq. (4)-(5)")
    g.add_argument("--c", type=float, default=2e-5, help="exploration weight of Eq. (6)")
    g.add_argument("--reward", choices=scheduler.REWARDS, default="diff",
                   help="diff = Metric Diff, gap = 1-Metric")
    g.add_argument("--share", choices=scheduler.SHARES, default="independent",
                   help="reward sharing (Fig. 3a)")
    g.add_argument("--fixed-alpha", action="store_true", help="dts: alpha = 1 throughout instead of Eq. (7)")
    g.add_argument("--temperature", type=float, default=2.0, help="T of the temperature sampler")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the summed training sets")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: from --epochs)")
    g.add_argument("--batch-size", type=int, default=16, help="examples per step (per process), one task")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of AdamW")
    g.add_argument("--prompt-lr", type=float, default=0.0,
                   help="peak learning rate of the prompts (0: --lr, as in the paper)")
    g.add_argument("--head-lr", type=float, default=0.0,
                   help="peak learning rate of the task heads (0: --lr, as in the paper)")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (not on biases, LayerNorms)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, dropout, prompts and sampler")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/mtop", help="checkpoints, logs, predictions")
    g.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: each epoch)")
    g.add_argument("--save-every", type=int, default=1000,
                   help="steps between checkpoints (also at each eval)")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between progress lines (and one at least every 30 s)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (CPU and CUDA)")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.safetensors")
    g.add_argument("--stop-after", type=int, default=0,
                   help="leave after this many steps of this invocation (checkpoint kept; use --resume)")
    g.add_argument("--no-test", action="store_true", help="skip the test-set predictions at the end")
    g = p.add_argument_group("prediction on a corpus")
    g.add_argument("--predict", default="", help="TSV (header; text columns) or JSONL file of texts")
    g.add_argument("--checkpoint", default="", help="trained model folder (default: <output-dir>/best)")
    g.add_argument("--text-columns", default="",
                   help="column(s) / JSON key(s) holding the text, e.g. text or a,b")
    g.add_argument("--id-column", default="", help="column / JSON key copied to each output line as \"id\"")
    g.add_argument("--predict-tasks", default="",
                   help="comma-separated tasks to label (default: every task that reads the corpus's texts)")
    g.add_argument("--probabilities", action="store_true", help="also write each class's probability")
    g.add_argument("--predict-format", choices=("", "tsv", "csv", "jsonl"), default="",
                   help="the corpus's format (default: by its suffix; a pipe has none: tsv)")
    g.add_argument("--predict-output", default="", help="output JSONL (default: <input>.predictions.jsonl)")
    g.add_argument("--predict-chunk", type=int, default=4096,
                   help="rows read, labelled and written at a time (under torchrun: their batches are "
                        "shared out)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked: a value out of range ends the run here, before anything is read."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_and_model_flags(p)
    add_training_flags(p)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for args.json's command (not a flag)
    for flag in ("batch_size", "interval", "epochs", "max_length", "log_every", "save_every",
                 "task_prompt_len", "predict_chunk"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("max_steps", "eval_every", "probe_size", "stop_after", "shared_prompt_len", "weight_decay",
                 "max_grad_norm", "prompt_lr", "head_lr", "max_train_examples"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    for flag in ("lr", "prompt_lr", "head_lr", "warmup", "weight_decay", "max_grad_norm", "gamma", "c",
                 "temperature"):
        if not math.isfinite(getattr(args, flag)):  # nan passes every comparison: refuse it here
            p.error(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    if not args.lr > 0 or not 0 <= args.warmup < 1:
        p.error(f"--lr must be > 0 and --warmup in [0, 1), got {args.lr} and {args.warmup}")
    for flag, most in (("seed", 2**31 - 1), ("predict_chunk", 10**7), ("batch_size", 10**6),
                       ("max_steps", 10**9), ("epochs", 10**6), ("max_train_examples", 10**9)):
        if getattr(args, flag) > most:  # far beyond any run; past it, numpy and C sizes overflow
            p.error(f"--{flag.replace('_', '-')} must be at most {most}, got {getattr(args, flag)}")
    if args.seed < 0:
        p.error(f"--seed must not be negative, got {args.seed}")
    return args


# -- data: one endless, seeded, resumable stream of batches per task ------------------------------

class TaskStream:
    """Batches of one task; epoch e's order is glue_data.batch_order(seed, e), so (epoch, position)
    is the whole state: a resumed run regenerates exactly the batches it would have seen."""

    def __init__(self, encoded: glue_data.Encoded, indices: np.ndarray, batch_size: int, seed: int,
                 multiple: int = 1, limit: int | None = None):
        self.encoded, self.indices, self.batch_size, self.seed = encoded, indices, batch_size, seed
        self.multiple, self.limit = multiple, limit  # padded lengths: glue_data.collate
        self.epoch, self.position, self._order = 0, 0, None

    def order(self) -> list[np.ndarray]:
        if self._order is None or self._order[0] != self.epoch:
            lengths = self.encoded.lengths[self.indices]
            self._order = (self.epoch, glue_data.batch_order(lengths, self.batch_size, self.seed, self.epoch))
        return self._order[1]

    def next(self, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """The next batch; with K data-parallel processes, rank r takes the r-th of K consecutive ones."""
        for turn in range(world):
            if self.position >= len(self.order()):
                self.epoch, self.position = self.epoch + 1, 0
            if turn == rank:
                batch = self.order()[self.position]
            self.position += 1
        return glue_data.collate(self.encoded, self.indices[batch], multiple=self.multiple, limit=self.limit)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def load_data(args, tasks: list[glue_data.Task], tokenizer, rank: int):
    """Per task: tokenized train and dev splits (cached on disk; tasks that read the same texts share one
    tokenized copy), the train rows, the probe rows and the regression target scale."""
    cache = Path(args.cache_dir).expanduser() / "tokens"  # a second run reads these, no tokenizing
    shared = {}  # texts -> tokens, for tasks that read one file (glue_data.load_encoded)
    enc = lambda task, split: glue_data.load_encoded(task, split, args.data_dir, tokenizer, args.max_length,
                                                     cache, shared)
    data = {}
    for task in tasks:
        for line in glue_data.describe_labels(task):  # what each head's outputs will mean
            log(line, rank)
        start = time.perf_counter()
        train = enc(task, "train")
        dev = {split: enc(task, split) for split in task.dev_splits}
        for note in [train.note] + [e.note for e in dev.values()]:  # known defects of the official files
            if note:
                log(note, rank)
        # The scheduler's probe rows: a fixed, seeded sample of the first dev split (the paper), or a
        # slice of train that training never sees (section 4.6's fix).
        # Rows are drawn from those with a label (Encoded.labelled: every row unless `missing` says so).
        rng = np.random.default_rng(args.seed)
        if args.probe_on == "heldout":
            rows = train.labelled
            held = min(len(rows) // 10, args.probe_size or len(rows) // 10)
            if held == 0:
                raise ValueError(f"{task.name}: --probe-on heldout holds out 10% of the training rows, and "
                                 f"{len(rows)} rows leave none; use --probe-on dev")
            order = rng.permutation(len(rows))
            train_idx, probe = np.sort(rows[order[held:]]), (train, np.sort(rows[order[:held]]))
        else:
            first = dev[task.dev_splits[0]]
            rows = first.labelled
            train_idx = train.labelled
            probe = (first, np.sort(rows[rng.permutation(len(rows))[:args.probe_size or len(rows)]]))
        if args.max_train_examples and len(train_idx) > args.max_train_examples:  # e.g. SST-2 in short runs
            keep = np.random.default_rng([args.seed, 1]).permutation(len(train_idx))[:args.max_train_examples]
            train_idx = np.sort(train_idx[keep])
        # Regression targets are standardised for training (ELECTRA divides STS-B by 5 for the same
        # reason): a head that starts near 0 would otherwise spend thousands of lr-1e-5 steps on the offset.
        scale = (0.0, 1.0)
        if task.kind == "regression":
            targets = train.labels[train_idx].astype(np.float64)
            scale = (float(targets.mean()), float(targets.std()) or 1.0)
        data[task.name] = {"train": train, "train_idx": train_idx, "dev": dev, "probe": probe, "scale": scale}
        log(f"{task.name}: {len(train_idx)} train, "
            + ", ".join(f"{len(e.labelled)} {s}" for s, e in dev.items())
            + f", probe {len(probe[1])} ({args.probe_on}) [{time.perf_counter() - start:.1f}s]", rank)
    return data


# -- evaluation and the scheduler's probes ---------------------------------------------------------

def evaluate(model, tasks, data, args) -> dict:
    """Every dev split: all metrics per task, the task scores and the averages (0..1), and the tasks whose
    head predicted one class for every dev row ("one_class": {task: label}), whatever their scores.
    Tasks that read the same dev texts are predicted from one encoder pass (predict_tasks)."""
    splits = [(task, split, encoded) for task in tasks for split, encoded in data[task.name]["dev"].items()]
    scales = {task.name: data[task.name]["scale"] for task in tasks}
    predicted = predict_tasks(model, [(task.name, encoded, encoded.labelled) for task, _, encoded in splits],
                              args.device, args.dtype, scales, label="dev")
    results, scores, primary, one_class = {task.name: {} for task in tasks}, {}, {}, {}
    for (task, split, encoded), predictions in zip(splits, predicted):
        if task.kind == "classification" and len(set(predictions.tolist())) == 1:
            one_class[task.name] = task.labels[int(predictions[0])]  # the head has not learned yet
        found = glue_data.compute_metrics(task, predictions, encoded.labels[encoded.labelled])
        suffix = "" if len(task.dev_splits) == 1 else f"_{split.split('_')[-1]}"
        results[task.name] |= {f"{k}{suffix}": v for k, v in found.items()}
    for task in tasks:
        scores[task.name] = glue_data.task_score(task, results[task.name])
        primary[task.name] = glue_data.primary_score(task, results[task.name])
    # Two averages: GLUE's (each task's metrics averaged first: train.py keeps the best model by it) and
    # Table 1's (one metric per task: F1 for MRPC and QQP, Spearman for STS-B).
    return {"metrics": results, "scores": scores, "average": glue_data.glue_average(scores),
            "primary": primary, "paper_average": glue_data.glue_average(primary), "one_class": one_class}


def probe(model: MTOP, tasks, data, args) -> dict[str, float]:
    """m_t(a) of Eq. (4): each task's score on its probe rows (tasks on the same texts: one pass)."""
    scales = {task.name: data[task.name]["scale"] for task in tasks}
    predicted = predict_tasks(model, [(task.name, *data[task.name]["probe"]) for task in tasks], args.device,
                              args.dtype, scales)
    scores = {}
    for task, predictions in zip(tasks, predicted):
        encoded, rows = data[task.name]["probe"]
        scores[task.name] = glue_data.task_score(task, glue_data.compute_metrics(task, predictions,
                                                                                 encoded.labels[rows]))
    return scores


def probe_and_update(model: MTOP, sampler, tasks, data, args, run: Run) -> None:
    """Algorithm 1, lines 7-9: every I steps (and before the first) each task's metric on its probe rows,
    m_t(a), updates Q by Eq. (4). Rank 0 probes; every rank's sampler gets the same metrics."""
    started = time.perf_counter()
    if run.invocation_steps == 0:
        log(f"probing {sum(len(data[t.name]['probe'][1]) for t in tasks)} rows for the scheduler's "
            "metrics (every --interval steps)", run.rank)
    metrics = broadcast(probe(model, tasks, data, args) if run.rank == 0 else None, run.world)
    sampler.update(metrics)
    state = {k: v for k, v in sampler.state_dict().items() if k != "rng"}  # the rng: in the checkpoint
    run.log.write(event="probe", step=run.step, metrics=metrics, scheduler=state)
    run.timed["probe"] = time.perf_counter() - started
    log(f"probe at step {run.step}: " + " | ".join(f"{n} {100 * m:.1f}" for n, m in metrics.items())
        + f" [{run.timed['probe']:.0f}s]", run.rank)


def dev_evaluation(model: MTOP, tasks, data, args, run: Run) -> dict:
    """Rank 0: evaluate on every dev split, log the result (log.jsonl and a line) and return it."""
    splits = [e for t in tasks for e in data[t.name]["dev"].values()]
    texts = sum({e.texts or id(e): len(e) for e in splits}.values())  # tasks on one text share it
    log(f"evaluating at step {run.step} on {texts} dev texts ({sum(len(e.labelled) for e in splits)} "
        "labels)")
    started = time.perf_counter()
    release_memory()  # the training steps' freed blocks, before the evaluation's
    result = evaluate(model, tasks, data, args)
    run.log.write(event="eval", step=run.step, **result)
    run.timed["eval"] = time.perf_counter() - started
    table1 = f" (Table 1's: {100 * result['paper_average']:.2f})" if args.task_set == "glue" else ""
    log(f"dev at step {run.step}: average {100 * result['average']:.2f}{table1} | " + " | ".join(
            f"{n} {100 * s:.2f}" for n, s in result["scores"].items()) + f" [{run.timed['eval']:.0f}s]")
    if result["one_class"]:
        log("warning: one class for every dev row: " + ", ".join(
            f"{n} ({label!r})" for n, label in result["one_class"].items()) + "; their scores are no skill")
    return result


# -- set-up: model, optimizer, sampler ------------------------------------------------------------

def set_up(args, rank: int, world: int, device: str):
    """Every input checked (support.checks), then the tokenized data and the model: (tasks, data, model,
    model_folder). Bad input ends the run with one message before any work."""
    tasks, model_dir, model_folder, tokenizer = prepare_inputs(args, rank, world, device)
    with user_errors():
        data = load_data(args, tasks, tokenizer, rank)
        model = MTOP(Electra.from_pretrained(model_dir), [(t.name, t.num_labels) for t in tasks],
                     prompt_config(args), args.freeze_encoder).to(device)
        check_metadata_size(model, model_metadata(tasks, data, args), tasks)
    return tasks, data, model, model_folder


def make_optimizer(model: MTOP, args, total_steps: int):
    """AdamW with linear warm-up (section 4.1), then linear decay to 0 (ours). Groups: prompts (their
    own learning rate, no decay: they are inputs, and shrinking them would move them off the scale of
    embedded tokens), weight matrices (decay), biases and LayerNorms (no decay, ELECTRA's recipe); with
    --head-lr, the heads' matrices and biases in two more groups at that rate."""
    is_prompt = {id(p) for p in model.prompt_parameters()}
    is_head = {id(p) for p in model.heads.parameters()} if args.head_lr else set()
    trained = [p for p in model.parameters() if p.requires_grad]
    prompts = [p for p in trained if id(p) in is_prompt]
    others = [p for p in trained if id(p) not in is_prompt and id(p) not in is_head]
    heads = [p for p in trained if id(p) in is_head]
    groups = [{"params": prompts, "weight_decay": 0.0, "lr": args.prompt_lr or args.lr},
              {"params": [p for p in others if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0},
              {"params": [p for p in heads if p.dim() >= 2], "weight_decay": args.weight_decay,
               "lr": args.head_lr},
              {"params": [p for p in heads if p.dim() < 2], "weight_decay": 0.0, "lr": args.head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr,
                                  fused=True)  # one kernel for all tensors: ~5x faster on a CPU
    warmup = int(args.warmup * total_steps)
    lr_at = lambda step: min((step + 1) / max(1, warmup),  # linear warm-up, then linear decay to 0
                             max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def step_rates(model: MTOP, optimizer) -> dict[str, float]:
    """The learning rates of the coming step, for its log record: the backbone's ("lr"), and the prompts'
    ("prompt_lr") and heads' ("head_lr") where they differ from it (--prompt-lr, --head-lr)."""
    prompts, heads = {id(p) for p in model.prompt_parameters()}, {id(p) for p in model.heads.parameters()}
    found = {"lr": [], "prompt_lr": [], "head_lr": []}
    for group in optimizer.param_groups:  # told apart by their parameters (make_optimizer's groups)
        first = id(group["params"][0])
        found["prompt_lr" if first in prompts else "head_lr" if first in heads else "lr"].append(group["lr"])
    backbone = (found["lr"] or found["head_lr"] or found["prompt_lr"])[0]  # --freeze-encoder: the heads'
    return {"lr": backbone} | {k: v[0] for k, v in found.items() if k != "lr" and v and v[0] != backbone}


def make_sampler(args, tasks: list[glue_data.Task], data: dict):
    """The task sampler of --sampler, sized by each task's training rows (w(a) of Eq. 6)."""
    sizes = {t.name: len(data[t.name]["train_idx"]) for t in tasks}
    options = {"seed": args.seed} | ({"interval": args.interval, "gamma": args.gamma, "c": args.c,
                                      "reward": args.reward, "share": args.share,
                                      "alpha": 1.0 if args.fixed_alpha else None} if args.sampler == "dts"
                                     else {})
    if args.sampler == "temperature":
        options["temperature"] = args.temperature
    with user_errors():  # e.g. --gamma 1.5: the scheduler names what is wrong
        return scheduler.make_sampler(args.sampler, sizes, **options)


def model_metadata(tasks: list[glue_data.Task], data: dict, args) -> dict:
    """What best/mtop.json carries besides the model: each task's labels, target scale and text count."""
    return {"tasks": [{"name": t.name, "kind": t.kind, "labels": list(t.labels or []),
                       "scale": data[t.name]["scale"], "pair": len(t.text) == 2} for t in tasks],
            "max_length": args.max_length, "model": str(args.model)}


def start_process(args) -> tuple[int, int, str]:
    """(rank, world, device) of this process, its seeds set; CPU training keeps large tensors out of the
    heap (support.system.limit_heap_growth)."""
    check_device(args.device)
    rank, world, device = setup_distributed(args.device)
    args.device = device
    if device == "cpu":
        limit_heap_growth()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return rank, world, device


def describe_run(args, tasks, model: MTOP, total_steps: int, steps_per_epoch: int, world: int, rank: int):
    """The run's first line after set-up, and a warning when DTS would probe only once (short runs)."""
    log(f"training {len(tasks)} tasks for {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs of "
        f"{steps_per_epoch} steps), mode {args.mode}, sampler {args.sampler}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable parameters, "
        f"{args.device} {args.dtype}, {world} process(es)", rank)
    if args.sampler == "dts" and total_steps <= args.interval:  # one probe: Q never moves off 0
        log(f"warning: DTS probes every --interval {args.interval} steps, so in {total_steps} steps it "
            "probes once, at step 0, never updates its task values (Eq. 4) and hands out tasks in a fixed "
            f"rotation: give --interval {max(1, total_steps // 5)} for about five probes, or --sampler "
            "proportional", rank)


# -- one training step ------------------------------------------------------------------------------

def train_step(model: MTOP, ddp, optimizer, batch: dict[str, torch.Tensor], task: str,
               scale: tuple[float, float], device: str, dtype: str, max_grad_norm: float) -> float:
    """Algorithm 1, line 14: one step on one task. Forward with only `task`'s prompts in the graph
    (the stop-gradient of mtop.py), loss, backward, clipping, AdamW. Returns the loss; raises
    NonFiniteError, before the weights change, if the loss or the gradient is not finite. `ddp` runs the
    forward pass (under torchrun it averages the gradients across processes); `model` gives the loss and
    the parameters. With one process they are the same object."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(device, dtype):
        logits = ddp(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], active_task=task)
        mean, std = scale  # regression targets are trained standardised (load_data)
        labels = (batch["labels"] - mean) / std if model.num_labels[task] == 1 else batch["labels"]
        loss = model.loss(logits, labels, task)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    value = loss.item()  # waits for the GPU: step times are real
    if not (math.isfinite(value) and math.isfinite(norm.item())):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"task {task}: loss {value}, gradient norm {norm.item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


# -- the loop: Algorithm 1 --------------------------------------------------------------------------

def train(args: argparse.Namespace) -> dict:
    """Algorithm 1: one task per step, chosen by the sampler, with probes every I steps, dev evaluations
    that keep the best model, and checkpoints. Returns the run's step, this invocation's losses, the best
    evaluation, the tasks trained step by step and whether the run finished on this process (rank 0)."""
    rank, world, device = start_process(args)
    tasks, data, model, model_folder = set_up(args, rank, world, device)
    # DDP: heads and prompts of the other tasks get no gradient in a step, hence find_unused_parameters.
    ddp = torch.nn.parallel.DistributedDataParallel(model,
                                                    find_unused_parameters=True) if world > 1 else model
    steps_per_epoch = max(1, sum(len(d["train_idx"]) for d in data.values()) // (args.batch_size * world))
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)  # E of Eq. (7): the epochs this run starts
    optimizer, lr_schedule = make_optimizer(model, args, total_steps)
    sampler = make_sampler(args, tasks, data)
    streams = {t.name: TaskStream(data[t.name]["train"], data[t.name]["train_idx"], args.batch_size,
                                  args.seed + i, pad_multiple(device), model.max_text_length)
               for i, t in enumerate(tasks)}
    parts = {"model": model, "optimizer": optimizer, "lr_schedule": lr_schedule, "sampler": sampler,
             "streams": streams}
    run = Run(args, parts, data_fingerprint(tasks, data), rank, world, device)  # new, or resumed
    metadata, eval_every = model_metadata(tasks, data, args), args.eval_every or steps_per_epoch
    describe_run(args, tasks, model, total_steps, steps_per_epoch, world, rank)
    signalled = 0
    with StopSignals() as signals:  # SIGTERM or Ctrl-C: finish the step, write a checkpoint, leave
        while run.step < total_steps:
            if args.sampler == "dts" and run.step % args.interval == 0:
                probe_and_update(model, sampler, tasks, data, args, run)  # lines 7-9: Eq. (4)
            epoch = 1 + run.step // steps_per_epoch
            sampler.set_epoch(epoch, epochs)  # alpha of Eq. (7)
            task = sampler.choose()  # Eq. (6), and n of Eq. (5)
            started = time.perf_counter()
            model.train()
            batch = streams[task].next(rank, world)
            rates = step_rates(model, optimizer)  # what this step uses, before the schedule moves on
            with run.stop_if_diverged():  # line 14: one step on task A_t
                loss = train_step(model, ddp, optimizer, batch, task, data[task]["scale"], device, args.dtype,
                                  args.max_grad_norm)
            lr_schedule.step()
            run.step_done(task, loss, batch, time.perf_counter() - started, rates)
            run.progress(total_steps, epoch, epochs, eval_every)
            if rank == 0 and (run.step % eval_every == 0 or run.step == total_steps):
                run.keep_if_best(dev_evaluation(model, tasks, data, args, run), metadata, model_folder)
            left = run.step < total_steps
            stop = bool(args.stop_after) and run.invocation_steps >= args.stop_after and left
            signalled = signals.requested(world, device)
            if run.step % eval_every == 0 or run.step % args.save_every == 0 or not left or stop or signalled:
                run.save()
            if stop or signalled:
                why = f"stopped by {signal.Signals(signalled).name}" if signalled else "stopping"
                log(f"{why} after step {run.step}, checkpoint written; " + (
                    "continue with --resume" if left else "the run is complete; no test predictions"), rank)
                break
    run.finish()  # under torchrun: every rank's fingerprint; then rank 0 alone goes on
    if signalled:
        raise SystemExit(128 + signalled)  # the shell's code for a process ended by that signal
    finished = rank == 0 and run.step == total_steps
    if finished:
        log(f"best dev average {100 * run.best['average']:.2f} at step {run.best['step']}", rank)
    return {"step": run.step, "losses": run.losses, "best": run.best, "history": run.history,
            "tasks": tasks, "finished": finished}


# -- main -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.predict:
        return predict_corpus(args)
    with output_dir_held(args):  # one process per run folder: a second one stops with a message
        result = train(args)
        if result["finished"]:  # rank 0, at the last step: the best model's test predictions and the plot
            release_memory()  # the training's model and optimizer are gone: the best model is read from disk
            if not args.no_test:
                write_test_predictions(Path(args.output_dir), result["tasks"], args)
            finish_message(Path(args.output_dir), result["tasks"])
    return result


if __name__ == "__main__":
    main()
