"""Train MTOP on GLUE (or your own task set), evaluate, resume, predict: the paper's section 4 in one script.

    python train.py --task-set glue                               # the paper's setting (section 4.1)
    python train.py --task-set glue --tasks RTE,MRPC --max-steps 200 --model path/to/model
    python train.py --predict corpus.tsv --checkpoint runs/mtop/best   # all tasks, one pass per batch
    torchrun --nproc_per_node=2 train.py --task-set glue           # data parallel (NCCL or gloo)

Read it top to bottom: arguments; data; evaluation; checkpoints (safetensors, no pickle); the checks
every input passes before any work; set-up, optimizer and sampler; one training step (train_step);
the training loop (train: Algorithm 1, one task per step chosen by the sampler, probes every I steps);
test predictions; labelling a corpus (Labeller, from Python, and --predict). Paper map:
    Algorithm 1 (probe every I steps, then choose a task per step) -> train()
    Algorithm 1, line 14 (train on task A_t for one step)          -> train_step()
    Eq. (7) epoch-dependent alpha                                  -> sampler.set_epoch in train()
    Table 1 leaderboard files and average                          -> write_test_predictions(), evaluate()
References: MTOP (section 4.1 hyperparameters); google-research/electra (fine-tuning recipe).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import glue_data
import scheduler
from electra import DEFAULT_CACHE, Electra, ElectraConfig, atomic_write, resolve_pretrained
from mtop import MODES, MTOP, PROMPT_ENTRIES, PROMPT_INITS


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--task-set", default="glue", help="'glue' or a JSON file defining tasks (see README)")
    g.add_argument("--tasks", default="", help="comma-separated subset of the task set, e.g. RTE,MRPC")
    g.add_argument("--data-dir", default="glue_data", help="GLUE folder; downloaded when it holds no GLUE file")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="tokenized splits and downloaded models")
    g.add_argument("--max-length", type=int, default=128, help="tokens per text (pair), truncated longest-first")
    g.add_argument("--max-train-examples", type=int, default=0,
                   help="train on a fixed, seeded sample of at most this many rows per task (0: all)")
    g.add_argument("--probe-on", choices=("dev", "heldout"), default="dev",
                   help="data for the scheduler's probes: dev (the paper) or a held-out slice of train (4.6)")
    g.add_argument("--probe-size", type=int, default=2000,
                   help="examples per task in each probe, a fixed subset (dev: 0 = all of it; heldout: "
                        "10%% of train at most)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="google/electra-base-discriminator", help="hub name or local folder")
    g.add_argument("--mode", choices=MODES, default="mtop", help="prompt setting of Fig. 1 (none = MT-DNN)")
    g.add_argument("--task-prompt-len", type=int, default=4, help="L: prompt tokens per task")
    g.add_argument("--shared-prompt-len", type=int, default=32, help="L': shared prompt tokens (mode mtop)")
    g.add_argument("--prompt-entry", choices=PROMPT_ENTRIES, default="after-norm",
                   help="where prompts join the embedded text (mtop.py; RESULTS.md compares them)")
    g.add_argument("--prompt-init", choices=PROMPT_INITS, default="random", help="initial prompt vectors (mtop.py)")
    g.add_argument("--freeze-encoder", action="store_true", help="train prompts and heads only")
    g = p.add_argument_group("task scheduling")
    g.add_argument("--sampler", choices=scheduler.SAMPLERS, default="dts", help="dts = the paper's bandit")
    g.add_argument("--interval", type=int, default=1000, help="I: steps between metric probes")
    g.add_argument("--gamma", type=float, default=0.99, help="discount factor of Eq. (4)-(5)")
    g.add_argument("--c", type=float, default=2e-5, help="exploration weight of Eq. (6)")
    g.add_argument("--reward", choices=scheduler.REWARDS, default="diff", help="diff = Metric Diff, gap = 1-Metric")
    g.add_argument("--share", choices=scheduler.SHARES, default="independent", help="reward sharing (Fig. 3a)")
    g.add_argument("--fixed-alpha", action="store_true", help="dts: alpha = 1 throughout instead of Eq. (7)")
    g.add_argument("--temperature", type=float, default=2.0, help="T of the temperature sampler")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the summed training sets")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: from --epochs)")
    g.add_argument("--batch-size", type=int, default=16, help="examples per step (per process), one task")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of AdamW")
    g.add_argument("--prompt-lr", type=float, default=0.0,
                   help="peak learning rate of the prompts (0: --lr, as in the paper)")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (not on biases, LayerNorms)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, dropout, prompts and sampler")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/mtop", help="checkpoints, logs, predictions")
    g.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: each epoch)")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (also at each eval)")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (CPU and CUDA)")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.safetensors")
    g.add_argument("--stop-after", type=int, default=0,
                   help="leave after this many steps of this invocation (checkpoint kept; use --resume)")
    g.add_argument("--no-test", action="store_true", help="skip the test-set predictions at the end")
    g = p.add_argument_group("prediction on a corpus")
    g.add_argument("--predict", default="", help="TSV (header; text columns) or JSONL file of texts")
    g.add_argument("--checkpoint", default="", help="trained model folder (default: <output-dir>/best)")
    g.add_argument("--text-columns", default="", help="column(s) / JSON key(s) holding the text, e.g. text or a,b")
    g.add_argument("--predict-output", default="", help="output JSONL (default: <input>.predictions.jsonl)")
    g.add_argument("--predict-chunk", type=int, default=4096,
                   help="rows read, labelled and written at a time (under torchrun: the unit shared out)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "interval", "epochs", "max_length", "log_every", "save_every",
                 "task_prompt_len", "predict_chunk"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("max_steps", "eval_every", "probe_size", "stop_after", "shared_prompt_len", "weight_decay",
                 "max_grad_norm", "prompt_lr", "max_train_examples"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    for flag in ("lr", "prompt_lr", "warmup", "weight_decay", "max_grad_norm", "gamma", "c", "temperature"):
        if not math.isfinite(getattr(args, flag)):  # nan passes every comparison: refuse it here
            p.error(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    if not args.lr > 0 or not 0 <= args.warmup < 1:
        p.error(f"--lr must be > 0 and --warmup in [0, 1), got {args.lr} and {args.warmup}")
    return args


# -- distributed helpers: rank 0 writes, all ranks take the same task at every step --------------

def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device) under torchrun; (0, 1, device) otherwise."""
    if "RANK" not in os.environ:
        return 0, 1, device
    # Rank 0 evaluates and writes alone while the others wait in the next collective: allow it an hour.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=1))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # the GPU of this process on its own node
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def broadcast(obj, world: int):
    """Rank 0's value on every rank (probe metrics, so every rank's scheduler agrees)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def log(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, flush=True)


# -- data: one endless, seeded, resumable stream of batches per task ------------------------------

class TaskStream:
    """Batches of one task; epoch e's order is glue_data.batch_order(seed, e), so (epoch, position)
    is the whole state: a resumed run regenerates exactly the batches it would have seen."""

    def __init__(self, encoded: glue_data.Encoded, indices: np.ndarray, batch_size: int, seed: int,
                 multiple: int = 1):
        self.encoded, self.indices, self.batch_size, self.seed = encoded, indices, batch_size, seed
        self.multiple = multiple  # pad lengths to a multiple of this (see pad_multiple)
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
        return glue_data.collate(self.encoded, self.indices[batch], multiple=self.multiple)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def pad_multiple(device: str) -> int:
    """Batches are padded to their longest text; on a GPU that length is rounded up to a multiple of 8.
    Every new (B, T) shape can cost a kernel plan there (cuDNN attention builds one per shape: bf16
    training ran 3.9x slower with exact lengths on an H200), and tensor cores prefer multiples of 8."""
    return 8 if device.startswith("cuda") else 1


def load_data(args, tasks: list[glue_data.Task], tokenizer, rank: int):
    """Per task: tokenized train and dev splits (cached on disk), the train rows, the probe rows and
    the regression target scale."""
    cache = Path(args.cache_dir).expanduser() / "tokens"  # a second run reads these, no tokenizing
    enc = lambda task, split: glue_data.load_encoded(task, split, args.data_dir, tokenizer, args.max_length, cache)
    data = {}
    for task in tasks:
        start = time.perf_counter()
        train = enc(task, "train")
        dev = {split: enc(task, split) for split in task.dev_splits}
        for note in [train.note] + [e.note for e in dev.values()]:  # known defects of the official files
            if note:
                log(note, rank)
        # The scheduler's probe rows: a fixed, seeded sample of the first dev split (the paper), or a
        # slice of train that training never sees (section 4.6's fix).
        rng = np.random.default_rng(args.seed)
        if args.probe_on == "heldout":
            held = min(len(train) // 10, args.probe_size or len(train) // 10)
            order = rng.permutation(len(train))
            train_idx, probe = np.sort(order[held:]), (train, np.sort(order[:held]))
        else:
            first = dev[task.dev_splits[0]]
            train_idx = np.arange(len(train))
            probe = (first, np.sort(rng.permutation(len(first))[:args.probe_size or len(first)]))
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
            + ", ".join(f"{len(e)} {s}" for s, e in dev.items())
            + f", probe {len(probe[1])} ({args.probe_on}) [{time.perf_counter() - start:.1f}s]", rank)
    return data


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def predict_encoded(model: MTOP, task: str, encoded: glue_data.Encoded, indices: np.ndarray | None,
                    device: str, dtype: str, scale: tuple[float, float] = (0.0, 1.0),
                    batch_size: int = 64, label: str = "") -> np.ndarray:
    """Predictions of one task's head for the given rows, in their order: class ids, or floats
    mapped back from standardised targets with scale = (train mean, train std). With a label, a
    progress line every 30 seconds (QQP's test set takes a while)."""
    model.eval()
    indices = np.arange(len(encoded)) if indices is None else indices
    out = np.zeros(len(indices), dtype=np.float32 if model.num_labels[task] == 1 else np.int64)
    started = last = time.perf_counter()
    done = 0
    for batch in glue_data.batch_order(encoded.lengths[indices], batch_size, 0, 0, shuffle=False):
        done += len(batch)
        if label and time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"{label}: {done}/{len(indices)} rows ({done / (last - started):.0f} rows/s)")
        inputs = glue_data.collate(encoded, indices[batch], multiple=pad_multiple(device))
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                           inputs["token_type_ids"].to(device), active_task=task)[task].float()
        if model.num_labels[task] == 1:
            out[batch] = (logits.squeeze(-1) * scale[1] + scale[0]).cpu().numpy()
        else:
            out[batch] = logits.argmax(-1).cpu().numpy()
    return out


def evaluate(model, tasks, data, args) -> dict:
    """Every dev split: all metrics per task, the task scores and the averages (0..1)."""
    results, scores, primary = {}, {}, {}
    for task in tasks:
        metrics = {}
        for split, encoded in data[task.name]["dev"].items():
            predictions = predict_encoded(model, task.name, encoded, None, args.device, args.dtype,
                                          data[task.name]["scale"], label=f"dev {task.name} {split}")
            found = glue_data.compute_metrics(task, predictions, encoded.labels)
            suffix = "" if len(task.dev_splits) == 1 else f"_{split.split('_')[-1]}"
            metrics |= {f"{k}{suffix}": v for k, v in found.items()}
        scores[task.name] = glue_data.task_score(task, metrics)
        primary[task.name] = glue_data.primary_score(task, metrics)
        results[task.name] = metrics
    # Two averages: GLUE's (each task's metrics averaged first: train.py keeps the best model by it) and
    # Table 1's (one metric per task: F1 for MRPC and QQP, Spearman for STS-B).
    return {"metrics": results, "scores": scores, "average": glue_data.glue_average(scores),
            "primary": primary, "paper_average": glue_data.glue_average(primary)}


def probe(model, tasks, data, args) -> dict[str, float]:
    """m_t(a) of Eq. (4): each task's score on its probe rows."""
    scores = {}
    for task in tasks:
        encoded, rows = data[task.name]["probe"]
        predictions = predict_encoded(model, task.name, encoded, rows, args.device, args.dtype,
                                      data[task.name]["scale"])
        scores[task.name] = glue_data.task_score(task, glue_data.compute_metrics(task, predictions,
                                                                                 encoded.labels[rows]))
    return scores


@contextlib.contextmanager
def user_errors():
    """Turn the clear errors of bad input (a missing file, an unknown task, a malformed row, a
    checkpoint that does not match) into one message and exit status 1, without a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


# -- checkpoints: one safetensors file, no pickle, written atomically ------------------------------

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # earlier versions pickled the state: never loaded (it could run code)


def split_tensors(obj, tensors: dict[str, torch.Tensor], key: str = "t"):
    """obj with every tensor (and numpy array) replaced by {"tensor": name}, the tensor stored in `tensors`:
    the rest is plain JSON. Tuples become lists; join_tensors undoes the rest."""
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj)
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().contiguous().cpu()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{key}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {"tensor"}:
            return tensors[obj["tensor"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: Path, state: dict) -> None:
    """The whole training state in one safetensors file: tensors as tensors, everything else as JSON
    in the file's metadata. Loading it runs no code (no pickle); the rename makes it atomic."""
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(split_tensors(state, tensors))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"mtop_checkpoint": text}))


def load_checkpoint(path: Path) -> dict:
    """Read a file written by save_checkpoint; a damaged or foreign file gets one message."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("mtop_checkpoint")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if text is None:
            raise ValueError("no training state in its metadata")
        return join_tensors(json.loads(text), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is damaged or not a checkpoint of train.py ({err}). Delete it to start "
                         "this run again, or give another --output-dir") from None


def rng_state(device: str) -> dict:
    """This process's random generators (dropout draws differ per rank: each rank saves its own)."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "key": key, "pos": position, "has_gauss": has_gauss, "gauss": gauss},
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"].cpu())  # generator states must be CPU byte tensors
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class JsonlLog:
    """log.jsonl: one JSON record per step, probe and evaluation (only rank 0 writes)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate(self, step: int) -> None:
        """Drop what was logged after the checkpoint of `step` (a resumed run logs it again), and a
        last line cut off by a crash."""
        if not self.path.exists():
            return
        records = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                print(f"{self.path}:{number}: an unreadable record (cut off by a crash?) is dropped", flush=True)
                continue
            if r["step"] < step or r["step"] == step and r["event"] != "probe":
                records.append(line)
        atomic_write(self.path, lambda p: p.write_text("".join(line + "\n" for line in records), encoding="utf-8"))

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# -- training --------------------------------------------------------------------------------------

# Flags that may differ between a run and its resumption; every other flag shapes the trajectory.
RUN_ONLY = {"resume", "stop_after", "log_every", "save_every", "output_dir", "no_test", "device", "cache_dir"}


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight that is NaN or infinite: the run stops instead of training on it."""


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them bf16 matrix products
    are emulated: tens of times slower than fp32. Unknown (no /proc/cpuinfo): assume it has."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def train_step(model: MTOP, ddp, optimizer, batch: dict[str, torch.Tensor], task: str,
               scale: tuple[float, float], device: str, dtype: str, max_grad_norm: float) -> float:
    """Algorithm 1, line 14: one step on one task. Forward with only `task`'s prompts in the graph
    (the stop-gradient of mtop.py), loss, backward, clipping, AdamW. Returns the loss; raises
    NonFiniteError, before the weights change, if the loss or the gradient is not finite."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16"):
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


def check_finite(model: MTOP) -> None:
    """Before anything is written: refuse weights that hold a NaN or an infinity."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"non-finite weights in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}, but torch sees no CUDA device here (a CPU-only build of "
                         "torch, or no GPU): use --device cpu")


def check_flags(args, device: str) -> None:
    """The flags that name things on this machine, before anything is read or downloaded."""
    check_device(device)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output-dir {out} is a file, not a folder; give a folder")


def check_data(tasks: list[glue_data.Task], args) -> None:
    """Every split of every task, test files included, is read once before the first step: a broken file
    is found now, not after hours of training."""
    for task in tasks:
        for split in task.splits:
            if split.startswith("test") and not task.path(split, args.data_dir).is_file():
                continue  # left out of the test predictions, with a note at the end
            examples = glue_data.load_split(task, split, args.data_dir)
            if not examples.text_a:
                raise ValueError(f"{examples.path}: no examples (only a header?); task {task.name} needs "
                                 f"rows in its {split} file")
        if args.max_length < 3 + 2 * (len(task.text) - 1):
            raise ValueError(f"--max-length {args.max_length} leaves no room for the text of {task.name}: "
                             f"[CLS] and [SEP] take {1 + len(task.text)} of them")


def check_model(model_folder: Path, tokenizer, config, args) -> None:
    """The vocabulary must be the model's own: ids beyond the embedding table would fail deep inside
    torch, and a much smaller vocabulary is a sign of the wrong tokenizer files."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size or size < 0.95 * config.vocab_size:
        raise ValueError(f"{model_folder}: the vocabulary has {size} tokens but the model's embedding table "
                         f"has {config.vocab_size} rows (config.json); give the model folder with its own "
                         "vocab.txt or tokenizer.json")
    if args.max_length > config.max_position_embeddings:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")


def set_up(args, rank: int, world: int, device: str):
    """Tasks, data files (downloaded into a fresh --data-dir), the model folder, the tokenized data and the
    model: (tasks, data, model, model_folder). Every input is checked before the work starts; bad input
    ends the run with one message."""
    check_flags(args, device)
    with user_errors():
        names = [n for n in args.tasks.split(",") if n] or None
        tasks = glue_data.load_task_set(args.task_set, args.data_dir, names)
        cache_dir = Path(args.cache_dir).expanduser()
        glue_files = [t.path(split, args.data_dir) for t in glue_data.GLUE_TASKS.values() for split in t.splits]
        if rank == 0 and args.task_set == "glue" and not any(p.is_file() for p in glue_files):
            names = [t.name for t in tasks] + (["AX"] if any(t.name == "MNLI" for t in tasks) else [])
            try:
                glue_data.download_glue(args.data_dir, names)  # no GLUE file there: fetch it
            except OSError as err:
                raise SystemExit(f"error: {err}\nFix: without network, put the GLUE task folders (CoLA/, SST-2/, "
                                 "...) in a folder and pass it with --data-dir") from None
        if world > 1:
            dist.barrier()  # the other ranks read what rank 0 downloaded
        missing = glue_data.missing_files(tasks, args.data_dir, splits=("train", "dev"))
        if missing:
            have = [t.name for t in tasks if not glue_data.missing_files([t], args.data_dir, ("train", "dev"))]
            raise SystemExit("error: missing data files:\n  " + "\n  ".join(map(str, missing)) +
                             "\nFix: a --data-dir without GLUE files (e.g. a new folder) gets GLUE downloaded, "
                             "or train on the tasks you have"
                             + (f" with --tasks {','.join(have)}" if have else " (--tasks)") + ".")
        check_data(tasks, args)
        if rank == 0:
            try:
                resolve_pretrained(args.model, cache_dir=cache_dir)  # downloads once; the other ranks wait
            except OSError as err:
                raise SystemExit(f"error: {err}\nFix: pass a local model folder (config.json, model.safetensors, "
                                 "vocab.txt or tokenizer.json) with --model") from None
        if world > 1:
            dist.barrier()
        model_dir = resolve_pretrained(args.model, cache_dir=cache_dir)  # a folder, or a .safetensors file in one
        model_folder = model_dir if model_dir.is_dir() else model_dir.parent
        tokenizer = glue_data.load_tokenizer(model_folder)
        check_model(model_folder, tokenizer, ElectraConfig.from_json(model_folder / "config.json"), args)
        data = load_data(args, tasks, tokenizer, rank)
        encoder = Electra.from_pretrained(model_dir)
        model = MTOP(encoder, [(t.name, t.num_labels) for t in tasks], args.task_prompt_len,
                     args.shared_prompt_len, args.mode, args.freeze_encoder, args.prompt_entry,
                     args.prompt_init).to(device)
    if device == "cpu" and args.dtype == "bf16" and not cpu_has_bf16():
        log("warning: --dtype bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) emulates them, "
            "tens of times slower than fp32: use --dtype fp32 on this machine", rank)
    return tasks, data, model, model_folder


def make_optimizer(model: MTOP, args, total_steps: int):
    """AdamW with linear warm-up (section 4.1), then linear decay to 0 (ours). Three groups: prompts (their
    own learning rate, no decay: they are inputs, and shrinking them would move them off the scale of
    embedded tokens), weight matrices (decay), biases and LayerNorms (no decay, ELECTRA's recipe)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    prompts = [p for n, p in named if n.startswith(("task_prompts", "shared_prompts"))]
    others = [p for n, p in named if not n.startswith(("task_prompts", "shared_prompts"))]
    groups = [{"params": prompts, "weight_decay": 0.0, "lr": args.prompt_lr or args.lr},
              {"params": [p for p in others if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr,
                                  fused=True)  # one kernel for all tensors: ~5x faster on a CPU
    warmup = int(args.warmup * total_steps)
    lr_at = lambda step: min((step + 1) / max(1, warmup),  # linear warm-up, then linear decay to 0
                             max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def make_sampler(args, tasks: list[glue_data.Task], data: dict):
    """The task sampler of --sampler, sized by each task's training rows (w(a) of Eq. 6)."""
    sizes = {t.name: len(data[t.name]["train_idx"]) for t in tasks}
    options = {"seed": args.seed} | ({"interval": args.interval, "gamma": args.gamma, "c": args.c,
                                      "reward": args.reward, "share": args.share,
                                      "alpha": 1.0 if args.fixed_alpha else None} if args.sampler == "dts" else {})
    if args.sampler == "temperature":
        options["temperature"] = args.temperature
    with user_errors():  # e.g. --gamma 1.5: the scheduler names what is wrong
        return scheduler.make_sampler(args.sampler, sizes, **options)


def data_fingerprint(tasks: list[glue_data.Task], data: dict) -> dict[str, str]:
    """A digest of each task's training rows as trained on: a resumed run must see the same data."""
    out = {}
    for task in tasks:
        encoded, rows = data[task.name]["train"], data[task.name]["train_idx"]
        digest = hashlib.sha256(encoded.ids.tobytes() + encoded.offsets.tobytes() + rows.tobytes())
        if encoded.labels is not None:
            digest.update(encoded.labels.tobytes())
        out[task.name] = digest.hexdigest()[:16]
    return out


def restore(path: Path, args, world: int, rank: int, device: str, parts: dict, fingerprint: dict) -> dict:
    """Load checkpoint.safetensors into the model, optimizer, schedule, sampler and data streams; refuse one
    written with other settings or other data. Returns the run state (step, best, history)."""
    with user_errors():
        state = load_checkpoint(path)
    changed = [f"--{k.replace('_', '-')} {state['args'].get(k)!r} -> {v!r}" for k, v in vars(args).items()
               if k not in RUN_ONLY and state["args"].get(k) != v]
    if state["world"] != world:  # the batch per step, the schedule and the data order depend on it
        changed.append(f"{state['world']} -> {world} processes")
    changed += [f"the training data of {name} changed" for name, digest in fingerprint.items()
                if state.get("data", {}).get(name) != digest]
    if changed:
        raise SystemExit(f"error: --resume: {path} was written with other settings: {'; '.join(changed)}. "
                         "Resume with the same ones, or start a new run in another --output-dir.")
    parts["model"].load_state_dict(state["model"])
    optimizer_state = state["optimizer"]
    optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}  # JSON keys are strings
    parts["optimizer"].load_state_dict(optimizer_state)
    parts["lr_schedule"].load_state_dict(state["lr_schedule"])
    parts["sampler"].load_state_dict(state["sampler"])
    for name, s in state["streams"].items():
        parts["streams"][name].load_state_dict(s)
    set_rng_state(state["rng"][rank], device)
    return {"step": state["step"], "best": state["best"], "history": state["history"]}


def open_run(args, out: Path, world: int, rank: int, device: str, parts: dict, fingerprint: dict) -> dict:
    """A new run in `out`, or with --resume the one whose checkpoint is there: its state (step, best,
    history). Another run's checkpoint is never overwritten, and an old pickle one never loaded."""
    checkpoint_path = out / CHECKPOINT
    if (out / LEGACY_CHECKPOINT).exists():
        raise SystemExit(f"error: {out / LEGACY_CHECKPOINT} is a checkpoint of an earlier train.py, a pickle file. "
                         "It is not loaded: unpickling a file can run any code in it. Start a new run in another "
                         "--output-dir.")
    run = {"step": 0, "best": {"average": -math.inf, "step": 0}, "history": []}
    if args.resume:
        if not checkpoint_path.exists():
            raise SystemExit(f"error: --resume: no checkpoint at {checkpoint_path} (start without --resume)")
        run = restore(checkpoint_path, args, world, rank, device, parts, fingerprint)
        if rank == 0:
            JsonlLog(out / "log.jsonl", True).truncate(run["step"])
        log(f"resumed from {checkpoint_path} at step {run['step']}", rank)
    elif checkpoint_path.exists():
        raise SystemExit(f"error: {checkpoint_path} exists: continue that run with --resume, or give another "
                         "--output-dir")
    elif rank == 0:
        (out / "log.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "args.json", lambda p: p.write_text(json.dumps(vars(args), indent=2)))
    return run


def train(args: argparse.Namespace) -> dict:
    """Algorithm 1: set-up, then one task per step, chosen by the sampler, with probes every I steps,
    evaluations, checkpoints and the best model kept; the test predictions at the end."""
    check_device(args.device)
    rank, world, device = setup_distributed(args.device)
    args.device = device
    if device == "cpu":
        limit_heap_growth()
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    tasks, data, model, model_folder = set_up(args, rank, world, device)
    # DDP: heads and prompts of the other tasks get no gradient in a step, hence find_unused_parameters.
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model

    steps_per_epoch = max(1, sum(len(d["train_idx"]) for d in data.values()) // (args.batch_size * world))
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)  # E of Eq. (7): the epochs this run starts
    optimizer, lr_schedule = make_optimizer(model, args, total_steps)
    sampler = make_sampler(args, tasks, data)
    streams = {t.name: TaskStream(data[t.name]["train"], data[t.name]["train_idx"], args.batch_size,
                                  args.seed + i, pad_multiple(device)) for i, t in enumerate(tasks)}
    fingerprint = data_fingerprint(tasks, data)

    checkpoint_path = out / CHECKPOINT
    parts = {"model": model, "optimizer": optimizer, "lr_schedule": lr_schedule, "sampler": sampler,
             "streams": streams}
    run = open_run(args, out, world, rank, device, parts, fingerprint)  # new, or resumed from its checkpoint
    records = JsonlLog(out / "log.jsonl", rank == 0)
    eval_every = args.eval_every or steps_per_epoch
    metadata = {"tasks": [{"name": t.name, "kind": t.kind, "labels": list(t.labels or []),
                           "scale": data[t.name]["scale"], "pair": len(t.text) == 2} for t in tasks],
                "max_length": args.max_length, "model": str(args.model)}
    step, best, history = run["step"], run["best"], run["history"]

    def checkpoint() -> None:  # called on every rank: each one's random generators are gathered
        rngs = [rng_state(device)]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
        if rank == 0:
            check_finite(model)
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "sampler": sampler.state_dict(),
                "streams": {n: s.state_dict() for n, s in streams.items()}, "rng": rngs, "step": step,
                "best": best, "history": history, "args": vars(args), "world": world, "data": fingerprint})

    log(f"training {len(tasks)} tasks for {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs of "
        f"{steps_per_epoch} steps), mode {args.mode}, sampler {args.sampler}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable parameters, "
        f"{device} {args.dtype}, {world} process(es)", rank)
    started, train_seconds, seen, losses, invocation_steps = time.perf_counter(), 0.0, 0, [], 0
    last_line = started
    drawn = hashlib.sha256()
    while step < total_steps:
        # Algorithm 1, lines 7-9: probe the metrics every I steps (and once before training) and
        # update Q by Eq. (4).
        if args.sampler == "dts" and step % args.interval == 0:
            probe_start = time.perf_counter()
            if invocation_steps == 0:
                log(f"probing {sum(len(data[t.name]['probe'][1]) for t in tasks)} rows for the scheduler's "
                    "metrics (every --interval steps)", rank)
            metrics = broadcast(probe(model, tasks, data, args) if rank == 0 else None, world)
            sampler.update(metrics)
            records.write(event="probe", step=step, metrics=metrics, scheduler=sampler.state_dict())
            log(f"probe at step {step}: " + " | ".join(f"{n} {100 * m:.1f}" for n, m in metrics.items())
                + f" [{time.perf_counter() - probe_start:.0f}s]", rank)
        epoch = 1 + step // steps_per_epoch
        sampler.set_epoch(epoch, epochs)  # alpha of Eq. (7)
        task = sampler.choose()  # Eq. (6), and n of Eq. (5)

        step_start = time.perf_counter()
        model.train()
        batch = streams[task].next(rank, world)
        if world > 1:
            drawn.update(batch["input_ids"].numpy().tobytes())  # for the fingerprint at the end
        try:
            loss = train_step(model, ddp, optimizer, batch, task, data[task]["scale"], device, args.dtype,
                              args.max_grad_norm)
        except NonFiniteError as err:
            raise SystemExit(f"error: training diverged at step {step + 1} ({err}). Nothing of this step was "
                             f"kept: {checkpoint_path} and {out / 'best'} hold the last good state, if any. "
                             "Lower --lr, or check the data of this task.") from None
        lr_schedule.step()
        step, invocation_steps, seen = step + 1, invocation_steps + 1, seen + len(batch["labels"]) * world
        losses.append(loss)
        train_seconds += time.perf_counter() - step_start
        history.append(task)
        records.write(event="step", step=step, task=task, loss=loss, lr=lr_schedule.get_last_lr()[-1])

        now = time.perf_counter()
        if step % args.log_every == 0 or step == total_steps or now - last_line > 30 or invocation_steps == 1:
            last_line = now  # a line every --log-every steps, and at least every 30 seconds
            eta = (now - started) / invocation_steps * (total_steps - step)
            log(f"step {step}/{total_steps} | epoch {epoch}/{epochs} | {task} | loss {np.mean(losses[-args.log_every:]):.4f} | "
                f"{seen / train_seconds:.1f} train ex/s | ETA {eta / 60:.1f} min", rank)
        if step % eval_every == 0 or step == total_steps:
            if rank == 0:
                log(f"evaluating at step {step} on {sum(len(e) for t in tasks for e in data[t.name]['dev'].values())} "
                    "dev rows", rank)
                release_memory()  # the training steps' freed blocks, before the evaluation's
                result = evaluate(model, tasks, data, args)
                records.write(event="eval", step=step, **result)
                log(f"dev at step {step}: average {100 * result['average']:.2f} (Table 1's: "
                    f"{100 * result['paper_average']:.2f}) | " + " | ".join(
                        f"{n} {100 * s:.2f}" for n, s in result["scores"].items()), rank)
                if result["average"] > best["average"]:
                    best = {"average": result["average"], "step": step, "scores": result["scores"]}
                    with guard_nonfinite(step, checkpoint_path, out):
                        check_finite(model)
                        save_best(model, metadata | {"step": step, "dev": result}, model_folder, out / "best")
        stop = args.stop_after and invocation_steps >= args.stop_after and step < total_steps
        if step % eval_every == 0 or step % args.save_every == 0 or step == total_steps or stop:
            with guard_nonfinite(step, checkpoint_path, out):
                checkpoint()
        if stop:
            log(f"stopping after {invocation_steps} steps; continue with --resume", rank)
            break

    if world > 1:  # a fingerprint per rank: the same tasks and weights on every rank, their own batches
        weights = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in model.state_dict().values()))
        tasks_seen = hashlib.sha256(" ".join(history).encode())
        print(f"rank {rank}: {step} steps, tasks {tasks_seen.hexdigest()[:16]}, weights "
              f"{weights.hexdigest()[:16]}, batches {drawn.hexdigest()[:16]}", flush=True)
        dist.barrier()
        dist.destroy_process_group()  # the other ranks are done; rank 0 alone writes what follows
    if rank == 0 and step == total_steps:
        log(f"best dev average {100 * best['average']:.2f} at step {best['step']}", rank)
        if not args.no_test:
            parts.clear()
            del ddp, model, optimizer, lr_schedule  # the test predictions load the best model from disk
            release_memory()
            write_test_predictions(out, tasks, args)
        plot(out)
    return {"step": step, "losses": losses, "best": best, "history": history}


MMAP_THRESHOLD = 4 << 20  # bytes; see limit_heap_growth


def limit_heap_growth() -> None:
    """CPU training: a fixed glibc mmap threshold of 4 MiB. By default glibc raises that threshold to the
    size of each large block freed (up to 32 MiB), so the activations of later steps, whose shapes change
    with every bucketed batch, land in a heap that fragments and is mostly not given back. With a fixed
    threshold a tensor above 4 MiB normally gets its own mapping, returned to the system when freed.
    The setting is the whole process's, for the rest of its life. benchmarks/bench_allocator.py
    measures the trade (peak memory against step time); BENCHMARKS.md section 9 has the figures.
    No-op off glibc."""
    if libc := glibc():
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


def glibc():
    """The C library when it is glibc (mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_memory() -> None:
    """Give freed memory back to the operating system. glibc's malloc keeps the memory of freed tensors
    for reuse; with a new batch shape at every step its heap fragments, and the process holds far more
    than its tensors need (benchmarks/peak_memory.py, BENCHMARKS.md section 9). No-op off glibc."""
    gc.collect()
    if libc := glibc():
        libc.malloc_trim(0)


@contextlib.contextmanager
def guard_nonfinite(step: int, checkpoint_path: Path, out: Path):
    """Weights that went non-finite stop the run before they are written anywhere; a write that fails
    (a full disk) stops it with one message."""
    try:
        yield
    except NonFiniteError as err:
        raise SystemExit(f"error: at step {step}: {err}. Nothing was written: {checkpoint_path} and "
                         f"{out / 'best'} hold the last good state, if any. Lower --lr.") from None
    except OSError as err:
        raise SystemExit(f"error: at step {step}: {err}") from None


def save_best(model: MTOP, metadata: dict, model_folder: Path, folder: Path) -> None:
    """The model, its settings and the vocabulary (so --predict needs nothing else), written to a new
    folder that then replaces `folder`: a crash leaves the previous best model whole."""
    fresh, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    model.save(fresh, metadata)
    for name in ("vocab.txt", "tokenizer.json"):
        if (model_folder / name).exists():
            shutil.copyfile(model_folder / name, fresh / name)
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def write_test_predictions(out: Path, tasks: list[glue_data.Task], args) -> None:
    """The best checkpoint's test predictions as leaderboard files (AX through the MNLI head, WNLI
    as its train majority class when it was not trained)."""
    model, metadata = MTOP.load(out / "best", map_location=args.device)
    scales = {t["name"]: t["scale"] for t in metadata["tasks"]}
    tokenizer = glue_data.load_tokenizer(out / "best")
    cache = Path(args.cache_dir).expanduser() / "tokens"
    jobs = [(t, t, split) for t in tasks for split in t.test_splits]
    if "MNLI" in model.num_labels and "AX" in glue_data.GLUE_TASKS and args.task_set == "glue":
        jobs.append((glue_data.GLUE_TASKS["AX"], next(t for t in tasks if t.name == "MNLI"), "test"))
    predictions = {}
    for source, head, split in jobs:
        if glue_data.missing_files([source], args.data_dir, splits=(split,)):
            log(f"no {source.name} {split} file: left out of the submission")
            continue
        encoded = glue_data.load_encoded(source, split, args.data_dir, tokenizer, args.max_length, cache)
        log(f"test predictions: {source.name} {split}, {len(encoded)} rows")
        predictions[f"{source.name}/{split}"] = predict_encoded(model, head.name, encoded, None, args.device,
                                                                args.dtype, scales[head.name],
                                                                label=f"test {source.name} {split}")
    wnli = glue_data.GLUE_TASKS["WNLI"]
    if args.task_set == "glue" and wnli not in tasks and not glue_data.missing_files([wnli], args.data_dir):
        # The paper leaves WNLI out; the leaderboard still wants its file: the train majority class.
        majority = np.bincount(glue_data.load_split(wnli, "train", args.data_dir).labels).argmax()
        rows = len(glue_data.load_split(wnli, "test", args.data_dir))
        predictions["WNLI/test"] = np.full(rows, majority)
        tasks = tasks + [wnli]
    if predictions:
        path = glue_data.write_submission(tasks, predictions, out / "submission")
        log(f"test predictions: {path}")


def plot(out: Path) -> None:
    """Dev scores over steps and how often each task was chosen (needs matplotlib; skipped without)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    evals = [r for r in records if r["event"] == "eval"]
    steps = [r for r in records if r["event"] == "step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name in evals[0]["scores"] if evals else []:
        left.plot([r["step"] for r in evals], [100 * r["scores"][name] for r in evals], label=name, marker="o")
    left.set(title="dev score", xlabel="step")
    left.legend()
    counts: dict[str, int] = {}
    for i, r in enumerate(steps, 1):
        counts[r["task"]] = counts.get(r["task"], 0) + 1
        r["share"] = dict(counts)
    for name in counts:
        right.plot([r["step"] for r in steps], [r["share"].get(name, 0) / i for i, r in enumerate(steps, 1)],
                   label=name)
    right.set(title="fraction of steps per task (cumulative)", xlabel="step")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.close(fig)


# -- prediction on a corpus: every task from one encoder pass per batch, streaming ----------------

def read_corpus(path: Path, columns: list[str]):
    """Yield (line number, text_a, text_b or None) from a TSV with a header or a JSONL file."""
    try:
        yield from _read_corpus(path, columns)
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: {path}: not UTF-8 text ({err.reason} at byte {err.start} of a block); "
                         "save the corpus as UTF-8") from None


def _read_corpus(path: Path, columns: list[str]):
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SystemExit(f"error: {path}:{number}: not a JSON object ({err})") from None
                    keys = columns or ["text"]
                    missing = [k for k in keys if not isinstance(row, dict) or k not in row]
                    if missing:
                        raise SystemExit(f"error: {path}:{number}: no key {missing[0]!r} (use --text-columns)")
                    texts = [row[k] for k in keys]
                    if not all(isinstance(t, str) for t in texts):
                        raise SystemExit(f"error: {path}:{number}: the value of {keys} must be a string")
                    yield number, texts[0], texts[1] if len(texts) > 1 else None
            return
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or not any(header):
            raise SystemExit(f"error: {path}: empty; expected a header row naming the text column(s)")
        keys = columns or [header[0]]
        missing = [k for k in keys if k not in header]
        if missing:
            raise SystemExit(f"error: {path}:1: no column {missing[0]!r} in header {header} (use --text-columns)")
        where = [header.index(k) for k in keys]
        for number, row in enumerate(reader, 2):
            if len(row) != len(header):
                raise SystemExit(f"error: {path}:{number}: {len(row)} columns, the header has {len(header)}")
            yield number, row[where[0]], row[where[1]] if len(where) > 1 else None


class Labeller:
    """A trained model folder (runs/.../best) that labels texts with every task from one encoder pass
    per batch. From Python:

        labeller = Labeller("runs/mtop/best")
        labeller(["a gripping film", "the plot goes nowhere"])     # [{"SST-2": "1", "CoLA": "1", ...}, ...]
        labeller(questions, answers)                               # pairs: two lists of one length
    """

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: str = "fp32", batch_size: int = 64):
        self.model, self.metadata = MTOP.load(folder, map_location=device)
        self.tokenizer = glue_data.load_tokenizer(folder)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        tasks = self.metadata.get("tasks")
        if not isinstance(tasks, list) or any(not isinstance(t, dict) or "name" not in t for t in tasks):
            raise ValueError(f"{Path(folder) / 'mtop.json'}: its metadata has no task list (written by train.py)")
        self.labels = {t["name"]: t.get("labels") for t in tasks}
        self.scales = {t["name"]: t.get("scale", (0.0, 1.0)) for t in tasks}
        self.pair_tasks = [t["name"] for t in tasks if t.get("pair")]

    @torch.no_grad()
    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        encoded = glue_data.encode(self.tokenizer, texts, pairs, self.metadata.get("max_length", 128))
        results: list[dict] = [{} for _ in texts]
        for batch in glue_data.batch_order(encoded.lengths, self.batch_size, 0, 0, shuffle=False):
            inputs = glue_data.collate(encoded, batch, multiple=pad_multiple(self.device))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
                logits = self.model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
            for name, values in logits.items():  # one encoder pass gave every task's logits
                values = values.float().cpu()
                if self.model.num_labels[name] == 1:
                    mean, std = self.scales[name]
                    found = [round(float(v) * std + mean, 4) for v in values.squeeze(-1)]
                else:
                    names = self.labels.get(name) or list(range(values.shape[1]))
                    found = [names[i] for i in values.argmax(-1).tolist()]
                for row, value in zip(batch.tolist(), found):
                    results[row][name] = value
        return results


def predict_corpus(args: argparse.Namespace) -> Path | None:
    """--predict: label every row of a corpus with every task, in chunks (constant memory). Under torchrun
    the chunks are shared out (chunk j to rank j mod K) and rank 0 joins the parts in input order."""
    check_device(args.device)
    rank, world, device = setup_distributed(args.device)
    folder = Path(args.checkpoint or Path(args.output_dir) / "best")
    source = Path(args.predict)
    target = Path(args.predict_output or f"{source}.predictions.jsonl")
    columns = [c for c in args.text_columns.split(",") if c]
    if not source.is_file():
        raise SystemExit(f"error: --predict: no such file {source}")
    if target.resolve() == source.resolve():
        raise SystemExit(f"error: --predict-output {target} is the input file; give another path (nothing was written)")
    if not target.parent.is_dir():
        raise SystemExit(f"error: --predict-output: the folder {target.parent} does not exist; create it first")
    with user_errors():
        labeller = Labeller(folder, device, args.dtype)
    if len(columns) < 2 and labeller.pair_tasks:
        log(f"warning: {', '.join(labeller.pair_tasks)} read sentence pairs, and the corpus gives one text; "
            "name two columns with --text-columns a,b for them", rank)
    tmp = target.with_name(f".{target.name}.tmp")
    part = tmp if world == 1 else target.with_name(f".{target.name}.part{rank}")
    started, done, chunk = time.perf_counter(), 0, args.predict_chunk
    try:
        with open(part, "w", encoding="utf-8") as f:
            rows = read_corpus(source, columns)
            for index in itertools.count():
                block = list(itertools.islice(rows, chunk))
                if not block:
                    break
                done += len(block)
                if index % world != rank:
                    continue
                pairs = [r[2] for r in block] if block[0][2] is not None else None
                for (number, _, _), labels in zip(block, labeller([r[1] for r in block], pairs)):
                    f.write(json.dumps({"line": number, **labels}) + "\n")
                log(f"labelled {done} rows ({done / (time.perf_counter() - started):.0f} rows/s"
                    f"{f' over {world} processes' if world > 1 else ''})", rank)
        if world > 1:
            dist.barrier()  # every part is complete
            if rank == 0:
                join_parts([part.with_name(f".{target.name}.part{r}") for r in range(world)], tmp, chunk)
            dist.barrier()
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written output never takes the target's name
        if world > 1:
            part.unlink(missing_ok=True)
        raise
    if world > 1:
        part.unlink(missing_ok=True)
        dist.destroy_process_group()
    if rank != 0:
        return None
    tmp.replace(target)
    log(f"wrote {target}")
    return target


def join_parts(parts: list[Path], out: Path, chunk: int) -> None:
    """Interleave the ranks' parts chunk by chunk (chunk j is in part j mod K): the input's order."""
    files = [open(p, encoding="utf-8") for p in parts]
    try:
        with open(out, "w", encoding="utf-8") as f:
            for index in itertools.count():
                lines = list(itertools.islice(files[index % len(files)], chunk))
                if not lines:
                    break
                f.writelines(lines)
    finally:
        for file in files:
            file.close()


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.predict:
        return predict_corpus(args)
    return train(args)


if __name__ == "__main__":
    main()
