"""A training run's folder and state: what train.py needs to stop at any moment and go on bitwise.

    run = Run(args, parts, fingerprint, rank, world, device)   # a new run, or --resume's checkpoint
    run.step, run.best, run.history                              # where the run stands
    run.step_done(task, loss, examples, seconds, lr)             # history, log.jsonl, progress line
    run.keep_if_best(result, metadata, model_folder)             # best/ when the dev average improved
    run.save()                                                   # checkpoint.safetensors (every rank calls)

Files in --output-dir:
    checkpoint.safetensors  the whole state: weights, AdamW, schedule, sampler, data streams, random
                            generators, step, best, history, flags; tensors as tensors, the rest as JSON
                            in the file's metadata: loading it runs no code (no pickle)
    log.jsonl               one record per step, probe and evaluation (a resumed run drops what came
                            after its checkpoint and logs it again)
    args.json               the flags of the run, the code's version and the command that reruns it
    best/                   the best model so far (MTOP.save, with the vocabulary): --predict reads it
Every file is written whole or not at all (support.files.atomic_write), and nothing non-finite is ever
written: a diverging run stops with one message and the last good state on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtop import MTOP
from support.files import atomic_write
from support.system import code_version, log

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # earlier versions pickled the state: never loaded (it could run code)
# Flags that may differ between a run and its resumption; every other flag shapes the trajectory.
RUN_ONLY = {"resume", "stop_after", "log_every", "save_every", "output_dir", "no_test", "device", "cache_dir",
            # --predict's flags: a training never reads them
            "predict", "checkpoint", "text_columns", "predict_output", "predict_chunk", "id_column",
            "predict_tasks", "probabilities", "revision", "predict_format",
            "argv"}  # the command line as given (args.json), not a flag
# Flags newer than some checkpoints, with the value that trains as the code before them did: a checkpoint
# without one was written with that value, so --resume compares against it (train.py's defaults).
ADDED_FLAGS = {"pooling": "mean", "head_lr": 0.0}
MAX_COUNT = 10**9  # epochs, positions, steps: far above any run, far below what overflows


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight that is NaN or infinite: the run stops instead of training on it."""


def check_finite(model: MTOP) -> None:
    """Before anything is written: refuse weights that hold a NaN or an infinity."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"non-finite weights in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


# -- checkpoints: one safetensors file, no pickle, written atomically ------------------------------

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
    except (SafetensorError, OSError, ValueError, KeyError, RecursionError) as err:
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
        for number, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(),
                                      1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                print(f"{self.path}:{number}: an unreadable record (cut off by a crash?) is dropped",
                      flush=True)
                continue
            if r["step"] < step or r["step"] == step and r["event"] != "probe":
                records.append(line)
        atomic_write(self.path, lambda p: p.write_text("".join(line + "\n" for line in records),
                                                       encoding="utf-8"))

    def write(self, **record) -> None:
        """Append a record, with the time it was written ("time": seconds since the epoch, UTC)."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record | {"time": round(time.time(), 3)}) + "\n")
        except OSError as err:  # a full disk: one message; the checkpoint on disk is whole
            raise SystemExit(f"error: cannot append to {self.path} ({err.strerror or err}); free some space "
                             "and continue with --resume") from None


def save_best(model: MTOP, metadata: dict, model_folder: Path, folder: Path) -> None:
    """The model, its settings and the vocabulary (so --predict needs nothing else), written to a new
    folder that then replaces `folder`: a crash leaves the previous best model whole."""
    fresh, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    model.save(fresh, metadata)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):  # tokenizing as in training
        if (model_folder / name).exists():
            shutil.copyfile(model_folder / name, fresh / name)
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def data_fingerprint(tasks: list, data: dict) -> dict[str, str]:
    """Digests of everything that shapes a run besides its flags: each task's training rows as trained on
    (key: the task's name), its dev splits ("<task>/dev"), its probe rows ("<task>/probe") and its
    definition ("<task>/task": type, labels, metrics, columns, missing values). A resumed run must see the
    same (Run's resume check; a checkpoint older than the last three keys is checked on the first)."""
    def digest(*arrays) -> str:
        h = hashlib.sha256()
        for array in arrays:
            if array is not None:
                h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]
    out = {}
    for task in tasks:
        d = data[task.name]
        out[task.name] = digest(*labelled_rows(d["train"], d["train_idx"]))
        out[f"{task.name}/dev"] = digest(*(a for e in d["dev"].values() for a in (e.ids, e.offsets, e.labels,
                                                                                     e.labelled)))
        probe, probe_rows = d["probe"]
        out[f"{task.name}/probe"] = digest(probe.ids, probe.offsets, probe.labels, probe_rows)
        definition = (task.kind, task.labels, task.metrics, task.text, task.label, task.missing, task.member,
                      task.separator)
        out[f"{task.name}/task"] = hashlib.sha256(repr(definition).encode()).hexdigest()[:16]
    return out


def labelled_rows(encoded, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, offsets, rows, labels) of the rows with a label only, `rows` as positions among them: the
    training data as every version of train.py held it (before rows without a label kept their text), so
    that a checkpoint of any version compares alike."""
    labelled = encoded.labelled if encoded.labelled is not None else np.arange(len(encoded))
    if len(labelled) == len(encoded):
        return encoded.ids, encoded.offsets, rows, encoded.labels
    starts, lengths = encoded.offsets[labelled], np.diff(encoded.offsets)[labelled]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = encoded.ids[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]
    return ids, offsets, np.searchsorted(labelled, rows), encoded.labels[labelled]


def check_state(state, tasks: list[str], path: Path) -> None:
    """A checkpoint's state against what Run.save writes, before any of it is used: the types, the ranges
    and how the fields agree (one task per step in the history, the learning rates finite and >= 0, each
    task's stream position). ValueError names the file and the field."""
    def bad(field: str, wanted: str):
        raise ValueError(f"{path}: {field} {wanted}")
    if not isinstance(state, dict):
        bad("(the whole)", "is not a JSON object")
    kinds = {"model": dict, "optimizer": dict, "lr_schedule": dict, "sampler": dict, "streams": dict,
             "rng": list, "step": int, "best": dict, "history": list, "args": dict, "world": int,
             "data": dict}
    for key, kind in kinds.items():
        if key not in state:
            bad(key, "is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            bad(key, f"is {str(state[key])[:40]!r}, not of type {kind.__name__}")
    step, history, best = state["step"], state["history"], state["best"]
    if step < 0 or step != len(history):
        bad("step", f"is {step} with a history of {len(history)} steps; the history holds one task per step")
    unknown = [task for task in history if task not in tasks]
    if unknown:
        bad("history", f"names {unknown[0]!r}, not one of this run's tasks ({', '.join(tasks)})")
    average = best.get("average")
    if isinstance(average, bool) or not isinstance(average, (int, float)) or not average <= 1:
        bad("best.average", f"is {average!r}, not a score (-Infinity before the first evaluation)")
    best_step = best.get("step")
    if isinstance(best_step, bool) or not isinstance(best_step, int) or not 0 <= best_step <= step:
        bad("best.step", f"is {best_step!r}, not a step from 0 to {step}")
    if state["world"] < 1 or len(state["rng"]) != state["world"]:
        bad("rng", f"holds {len(state['rng'])} generator states for {state['world']} processes")
    def rate(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
            and 0 <= value < 1e3
    for group in state["optimizer"].get("param_groups", []):
        for key in ("lr", "initial_lr"):
            value = group.get(key, 0.0) if isinstance(group, dict) else None
            if not rate(value):
                bad(f"optimizer.param_groups.{key}", f"is {value!r}, not a learning rate from 0 to 1000")
    schedule = state["lr_schedule"]
    for key in ("base_lrs", "_last_lr"):
        values = schedule.get(key, [])
        if not isinstance(values, list) or not all(rate(v) for v in values):
            bad(f"lr_schedule.{key}", f"is {str(values)[:60]}, not a list of learning rates from 0 to 1000")
    if not isinstance(schedule.get("last_epoch", 0), int) or not 0 <= schedule.get("last_epoch", 0) <= step:
        bad("lr_schedule.last_epoch", f"is {schedule.get('last_epoch')!r}, not a step from 0 to {step}")
    for task in tasks:
        stream = state["streams"].get(task)
        counts = [stream.get(k) for k in ("epoch", "position")] if isinstance(stream, dict) else [None]
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_COUNT for n in counts):
            bad(f"streams.{task}", f"is {stream!r}, not {{'epoch': n, 'position': n}} with 0 <= n <= "
                                   f"{MAX_COUNT}")


def still_to_come(step: int, total: int, eval_every: int, interval: int) -> tuple[int, int]:
    """(evaluations, probes) a run has left once `step` of `total` steps are trained (the progress line's
    moment, before that step's own evaluation): an evaluation after every eval_every-th step and after the
    last; a probe before every interval-th step from step 0 on (none when interval is 0: no DTS)."""
    evals = total // eval_every - (step - 1) // eval_every + (total % eval_every != 0)
    probes = (total - 1) // interval - (step - 1) // interval if interval else 0
    return evals, probes


# -- the run ------------------------------------------------------------------------------------------

class Run:
    """The state of one training run in args.output_dir, new or resumed (--resume), and its files.

    parts: {"model", "optimizer", "lr_schedule", "sampler", "streams"}, the objects a checkpoint holds;
    fingerprint: data_fingerprint of the training data. Refuses (SystemExit, one message) to overwrite
    another run's checkpoint, to load a pickle one, and to resume with other flags or other data.
    """

    def __init__(self, args, parts: dict, fingerprint: dict, rank: int, world: int, device: str):
        self.args, self.parts, self.fingerprint = args, parts, fingerprint
        self.rank, self.world, self.device = rank, world, device
        self.out = Path(args.output_dir)
        self.path = self.out / CHECKPOINT
        self.step, self.best, self.history = 0, {"average": -math.inf, "step": 0}, []
        self._open()
        self.log = JsonlLog(self.out / "log.jsonl", rank == 0)
        self.losses: list[float] = []  # this invocation's
        self.invocation_steps, self.seen, self.train_seconds = 0, 0, 0.0
        self.timed: dict[str, float] = {}  # seconds of the last "eval" and "probe", for the ETA
        self.started = self.last_line = time.perf_counter()
        self.drawn = hashlib.sha256()  # the batches this rank drew (torchrun's agreement check)

    def _open(self) -> None:
        if (self.out / LEGACY_CHECKPOINT).exists():
            raise SystemExit(f"error: {self.out / LEGACY_CHECKPOINT} is a checkpoint of an earlier "
                             "train.py, a pickle file. It is not loaded: unpickling a file can run any code "
                             "in it. Start a new run in another --output-dir.")
        if self.args.resume:
            if not self.path.exists():
                raise SystemExit(f"error: --resume: no checkpoint at {self.path} (start without --resume)")
            self._restore()
            if self.rank == 0:
                self._clean_up()  # the folder is this run's: what a killed write left can go
                JsonlLog(self.out / "log.jsonl", True).truncate(self.step)
            log(f"resumed from {self.path} at step {self.step}", self.rank)
        elif self.path.exists():
            raise SystemExit(f"error: {self.path} exists: continue that run with --resume, or give another "
                             "--output-dir")
        elif self.rank == 0:
            self._clean_up()
            (self.out / "log.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            record = vars(self.args) | {"code_version": code_version(),
                                        "command": shlex.join(["python", "train.py", *self.args.argv])}
            atomic_write(self.out / "args.json", lambda p: p.write_text(json.dumps(record,
                                                                                   indent=2)))

    def _clean_up(self) -> None:
        """What a killed write left in the folder: temporary files of atomic_write (.NAME.*.tmp) and of
        safetensors itself (.tmpXXXXXX, which it renames over the name it was given) are removed; a best/
        caught between its two renames (best.old there, best/ not) is put back, and a best.old left after
        them is removed. Called once the folder is known to be this run's."""
        for stale in self.out.glob(".*tmp*") if self.out.is_dir() else []:
            ours = stale.name.endswith(".tmp") and stale.name.startswith((f".{CHECKPOINT}.", ".log.jsonl.",
                                                                          ".args.json."))
            if ours or re.fullmatch(r"\.tmp\w{6}", stale.name):
                log(f"removing {stale}, left by a write that was killed", self.rank)
                stale.unlink(missing_ok=True)
        best, old = self.out / "best", self.out / "best.old"
        if old.is_dir() and not best.exists():
            old.rename(best)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.out / "best.new", ignore_errors=True)

    def _restore(self) -> None:
        """Load the checkpoint into the parts; refuse one written with other settings or other data."""
        try:
            state = load_checkpoint(self.path)
            if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
                raise ValueError(f"{self.path}: its state has no flags (args): not written by train.py")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        ran = ADDED_FLAGS | state["args"]
        changed = [f"--{k.replace('_', '-')} {ran.get(k)!r} -> {v!r}" for k, v in vars(self.args).items()
                   if k not in RUN_ONLY and ran.get(k) != v]
        if state.get("world") != self.world:  # the batch per step, the schedule and the data order hang on it
            changed.append(f"{state.get('world')} -> {self.world} processes")
        data = state.get("data") if isinstance(state.get("data"), dict) else {}
        what = {"": "the training data", "dev": "the dev data", "probe": "the probe rows",
                "task": "the definition (type, labels, metrics, columns)"}
        for key, digest in self.fingerprint.items():  # a key the checkpoint lacks is newer than it
            name, _, part = key.partition("/")
            if data.get(key) != digest and (key in data or not part):
                changed.append(f"{what[part]} of {name} changed")
        if changed:
            raise SystemExit(f"error: --resume: {self.path} was written with other settings: "
                             f"{'; '.join(changed)}. Resume with the same ones, or start a new run in "
                             "another --output-dir.")
        try:
            check_state(state, list(self.parts["streams"]), self.path)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        try:
            self._load_parts(state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as err:
            raise SystemExit(f"error: {self.path}: a part of the state does not fit this run ({err}). Delete "
                             "the file to start again, or give another --output-dir") from None
        self.step, self.best, self.history = state["step"], state["best"], state["history"]

    def _load_parts(self, state: dict) -> None:
        parts = self.parts
        for key, value in parts["model"].state_dict().items():  # load_state_dict would cast silently
            stored = state["model"].get(key)
            if torch.is_tensor(stored) and stored.dtype != value.dtype:
                raise ValueError(f"model tensor {key} is {stored.dtype}, the model's is {value.dtype}")
        parts["model"].load_state_dict(state["model"])  # strict: every key, every shape
        optimizer_state = state["optimizer"]
        # JSON keys are strings
        optimizer_state["state"] = {int(k): v for k, v in optimizer_state["state"].items()}
        parts["optimizer"].load_state_dict(optimizer_state)
        for param in parts["model"].parameters():  # AdamW's moments must have their parameter's shape
            for name, value in parts["optimizer"].state.get(param, {}).items():
                if name != "step" and (not torch.is_tensor(value) or value.shape != param.shape):
                    raise ValueError(f"optimizer {name} of shape {tuple(getattr(value, 'shape', ()))} for a "
                                     f"parameter of shape {tuple(param.shape)}")
                if name != "step" and value.dtype != param.dtype:  # load_state_dict casts without a word
                    raise ValueError(f"optimizer {name} is {value.dtype}, its parameter's is {param.dtype}")
        parts["lr_schedule"].load_state_dict(state["lr_schedule"])
        parts["sampler"].load_state_dict(state["sampler"])
        for name, stream in state["streams"].items():
            parts["streams"][name].load_state_dict(stream)
        set_rng_state(state["rng"][self.rank], self.device)

    @contextlib.contextmanager
    def stop_if_diverged(self):
        """Around a training step: a non-finite loss or gradient ends the run with one message."""
        try:
            yield
        except NonFiniteError as err:
            raise SystemExit(f"error: training diverged at step {self.step + 1} ({err}). Nothing of this "
                             f"step was kept: {self.path} and {self.out / 'best'} hold the last good state, "
                             "if any. Lower --lr, or check the data of this task.") from None

    @contextlib.contextmanager
    def _writing(self):
        """Weights that went non-finite stop the run before they are written anywhere; a write that fails
        (a full disk) stops it with one message."""
        try:
            yield
        except NonFiniteError as err:
            raise SystemExit(f"error: at step {self.step}: {err}. Nothing was written: {self.path} and "
                             f"{self.out / 'best'} hold the last good state, if any. Lower --lr.") from None
        except OSError as err:
            raise SystemExit(f"error: at step {self.step}: {err}") from None

    def step_done(self, task: str, loss: float, batch: dict, seconds: float, rates: dict[str, float]) -> None:
        """Count a finished training step: history, log.jsonl (with the learning rates it used), and the
        drawn batch under torchrun."""
        if self.world > 1:
            self.drawn.update(batch["input_ids"].numpy().tobytes())
        self.step, self.invocation_steps = self.step + 1, self.invocation_steps + 1
        self.seen += len(batch["labels"]) * self.world
        self.losses.append(loss)
        self.train_seconds += seconds
        self.history.append(task)
        self.log.write(event="step", step=self.step, task=task, loss=loss, **rates)

    def progress(self, total_steps: int, epoch: int, epochs: int, eval_every: int) -> None:
        """A progress line every --log-every steps, at the end, and at least every 30 seconds. The ETA
        counts the steps left at this invocation's step time, and the evaluations, probes and test
        predictions left at the last ones' times (named, not counted, before the first is timed)."""
        now = time.perf_counter()
        if not (self.step % self.args.log_every == 0 or self.step == total_steps or now - self.last_line > 30
                or self.invocation_steps == 1):
            return
        self.last_line = now
        left = total_steps - self.step
        evals, probes = still_to_come(self.step, total_steps, eval_every,
                                      self.args.interval if self.args.sampler == "dts" else 0)
        evals += not self.args.no_test  # the test predictions take about an evaluation
        eta = self.train_seconds / self.invocation_steps * left + evals * (self.timed.get("eval") or 0) \
            + probes * (self.timed.get("probe") or 0)
        untimed = [what for what, n in (("eval", evals), ("probe", probes)) if n and what not in self.timed]
        log(f"step {self.step}/{total_steps} | epoch {epoch}/{epochs} | {self.history[-1]} | loss "
            f"{np.mean(self.losses[-self.args.log_every:]):.4f} | "
            f"{self.seen / self.train_seconds:.1f} train ex/s | ETA {eta / 60:.1f} min"
            + "".join(f" + {what}s" for what in untimed), self.rank)

    def keep_if_best(self, result: dict, metadata: dict, model_folder: Path) -> None:
        """Rank 0, after a dev evaluation: write best/ if its GLUE average beats every earlier one."""
        if result["average"] > self.best["average"]:
            self.best = {"average": result["average"], "step": self.step, "scores": result["scores"]}
            with self._writing():
                check_finite(self.parts["model"])
                save_best(self.parts["model"], metadata | {"step": self.step, "dev": result}, model_folder,
                          self.out / "best")

    def save(self) -> None:
        """checkpoint.safetensors. Every rank calls it: each one's random generators are gathered."""
        rngs = [rng_state(self.device)]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state(self.device))
        if self.rank != 0:
            return
        p = self.parts
        with self._writing():
            check_finite(p["model"])
            save_checkpoint(self.path, {
                "model": p["model"].state_dict(), "optimizer": p["optimizer"].state_dict(),
                "lr_schedule": p["lr_schedule"].state_dict(), "sampler": p["sampler"].state_dict(),
                "streams": {n: s.state_dict() for n, s in p["streams"].items()}, "rng": rngs,
                "step": self.step,
                "best": self.best, "history": self.history, "args": vars(self.args), "world": self.world,
                "data": self.fingerprint})

    def finish(self) -> None:
        """Under torchrun: print this rank's fingerprint (the same tasks and weights on every rank, their own
        batches) and end the process group; rank 0 alone writes what follows."""
        if self.world == 1:
            return
        model = self.parts["model"]
        weights = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in model.state_dict().values()))
        tasks_seen = hashlib.sha256(" ".join(self.history).encode())
        print(f"rank {self.rank}: {self.step} steps, tasks {tasks_seen.hexdigest()[:16]}, weights "
              f"{weights.hexdigest()[:16]}, batches {self.drawn.hexdigest()[:16]}", flush=True)
        dist.barrier()
        dist.destroy_process_group()
