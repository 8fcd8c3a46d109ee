"""Inference: every task's predictions from one encoder pass per batch, for evaluation, for labelling
from Python (Labeller) and for labelling a corpus file (train.py --predict).

    forward_batches(model, encoded, rows, ...)   the one loop: bucketed batches -> collate -> forward
    predict_encoded(model, task, encoded, ...)   one task's predictions (class ids or unscaled floats)
    Labeller("runs/mtop/best")(texts)            [{task: label, ...}, ...] for a list of texts (or pairs)
    predict_corpus(args)                         --predict: a TSV or JSONL corpus -> JSONL, streaming

MTOP's point (Sec. 3.1): with active_task=None, one forward pass gives every task's logits.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import glue_data
from mtop import MTOP
from support.checks import check_device, user_errors, writable
from support.system import autocast, log, pad_multiple, setup_distributed


@torch.no_grad()
def forward_batches(model: MTOP, encoded: glue_data.Encoded, indices: np.ndarray, device: str, dtype: str,
                    batch_size: int = 64, active_task: str | None = None, label: str = ""):
    """Yield (positions, logits) over the rows `indices` of `encoded`, in length-bucketed batches:
    positions (b,) index into `indices`, logits is forward's {task: (b, C)} (every task's when
    active_task is None: one encoder pass). With a label, a progress line every 30 seconds."""
    started = last = time.perf_counter()
    done = 0
    for batch in glue_data.batch_order(encoded.lengths[indices], batch_size, 0, 0, shuffle=False):
        done += len(batch)
        if label and time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"{label}: {done}/{len(indices)} rows ({done / (last - started):.0f} rows/s)")
        inputs = glue_data.collate(encoded, indices[batch], multiple=pad_multiple(device))
        with autocast(device, dtype):
            logits = model(inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                           inputs["token_type_ids"].to(device), active_task=active_task)
        yield batch, logits


def to_predictions(logits: torch.Tensor, scale, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """A head's logits (B, C) -> class ids (B,), or for C = 1 the regression value mapped back from the
    standardised target the head was trained on: value * train std + train mean, scale = (mean, std),
    computed in `dtype` (evaluation: float32; Labeller: float64, then rounded to 4 places)."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1).to(dtype) * scale[1] + scale[0]).cpu().numpy()
    return logits.argmax(-1).cpu().numpy()


@torch.no_grad()
def predict_encoded(model: MTOP, task: str, encoded: glue_data.Encoded, indices: np.ndarray | None,
                    device: str, dtype: str, scale: tuple[float, float] = (0.0, 1.0),
                    batch_size: int = 64, label: str = "") -> np.ndarray:
    """Predictions of one task's head for the given rows (all when None), in their order: class ids
    (int64), or float32 values mapped back with scale = (train mean, train std)."""
    model.eval()
    indices = np.arange(len(encoded)) if indices is None else indices
    out = np.zeros(len(indices), dtype=np.float32 if model.num_labels[task] == 1 else np.int64)
    for positions, logits in forward_batches(model, encoded, indices, device, dtype, batch_size, task, label):
        out[positions] = to_predictions(logits[task], scale)
    return out


def read_corpus(path: Path, columns: list[str]):
    """Yield (line number, text_a, text_b or None) from a corpus: a .jsonl file (one JSON object per line,
    key "text" by default), or a .tsv or .csv file with a header (the first column by default), read by
    glue_data's readers under the rules of training files. Bad input: SystemExit naming file and line."""
    check_columns(columns)
    try:
        yield from (_read_jsonl if path.suffix.lower() == ".jsonl" else _read_table)(path, columns)
    except ValueError as err:  # glue_data's readers name the file and line
        raise SystemExit(f"error: {err}") from None


def check_columns(columns: list[str]) -> None:
    if len(columns) > 2:
        raise SystemExit(f"error: --text-columns names {len(columns)} columns ({', '.join(columns)}); a text "
                         "is one column, or two for a pair")


def _read_jsonl(path: Path, columns: list[str]):
    keys = columns or ["text"]
    for number, line in glue_data.text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"error: {path}:{number}: not a JSON object ({err})") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise SystemExit(f"error: {path}:{number}: no key {missing[0]!r} (use --text-columns)")
        texts = [row[k] for k in keys]
        if not all(isinstance(t, str) for t in texts):
            raise SystemExit(f"error: {path}:{number}: the value of {keys} must be a string")
        yield number, texts[0], texts[1] if len(texts) > 1 else None


def _read_table(path: Path, columns: list[str]):
    if path.stat().st_size == 0:
        raise SystemExit(f"error: {path}: empty; expected a header row naming the text column(s)")
    header, rows = glue_data.read_table(path)
    keys = columns or [header[0]]
    missing = [k for k in keys if k not in header]
    if missing:
        raise SystemExit(f"error: {path}:1: no column {missing[0]!r} in header {header} (use --text-columns)")
    where = glue_data.column_indices(header, tuple(keys), path)
    for number, row in rows:
        if len(row) != len(header):
            raise SystemExit(f"error: {path}:{number}: {len(row)} columns, the header has {len(header)}")
        yield number, row[where[0]], row[where[1]] if len(where) > 1 else None


def check_texts(items, name: str) -> None:
    """Labeller's input: a list (or other sequence) of strings; the first item that is not is named."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
        raise ValueError(f"Labeller: {name} must be a list of strings, got {type(items).__name__} (for one "
                         "text, pass [text])")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            hint = " (a missing value?)" if item is None or isinstance(item, float) and item != item else ""
            raise ValueError(f"Labeller: {name}[{i}] is {item!r}, a {type(item).__name__}, not a "
                             f"string{hint}")


def check_metadata(metadata: dict, model: MTOP, path: Path) -> list[dict]:
    """train.py's metadata in mtop.json, against the model it came with: one entry per head, labels as
    many as the head's classes (or none: class ids are emitted), a finite regression scale with std > 0,
    max_length within the encoder's positions. Returns the task entries; ValueError names the field."""
    tasks = metadata.get("tasks")
    if not isinstance(tasks, list) or any(not isinstance(t, dict) or not isinstance(t.get("name"), str)
                                          for t in tasks):
        raise ValueError(f"{path}: its metadata has no task list (written by train.py)")
    by_name = {t["name"]: t for t in tasks}
    for name, classes in model.num_labels.items():
        entry = by_name.get(name)
        if entry is None:
            raise ValueError(f"{path}: metadata.tasks has no entry for the model's task {name!r}")
        labels, scale = entry.get("labels", []), entry.get("scale", (0.0, 1.0))
        if classes > 1 and (not isinstance(labels, list) or labels and (
                len(labels) != classes or not all(isinstance(x, str) for x in labels))):
            raise ValueError(f"{path}: metadata.tasks {name!r}: labels {str(labels)[:80]} must be {classes} "
                             f"strings, one per class of its head")
        numbers = isinstance(scale, (list, tuple)) and len(scale) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scale)
        if classes == 1 and not (numbers and scale[1] > 0):
            raise ValueError(f"{path}: metadata.tasks {name!r}: scale {scale!r} must be [mean, std], finite, "
                             "std > 0")
    length, positions = metadata.get("max_length", 128), model.encoder.config.max_position_embeddings
    if model.prompt_entry == "input-positions":  # the prompts take positions before the text
        positions -= model.prompts.prompt_positions(len(model.tasks))
    if isinstance(length, bool) or not isinstance(length, int) or not 3 <= length <= positions:
        raise ValueError(f"{path}: metadata.max_length {length!r} must be a whole number from 3 to "
                         f"{positions}")
    return tasks


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
        tasks = check_metadata(self.metadata, self.model, Path(folder) / "mtop.json")
        self.labels = {t["name"]: t.get("labels") for t in tasks}
        self.scales = {t["name"]: t.get("scale", (0.0, 1.0)) for t in tasks}
        self.pair_tasks = [t["name"] for t in tasks if t.get("pair")]

    @torch.no_grad()
    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """texts (and pairs, of the same length): strings -> one {task: label or value} dict per text.
        Raises ValueError naming the first item that is not a string (None, a NaN from pandas, ...)."""
        check_texts(texts, "texts")
        if pairs is not None:
            check_texts(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"Labeller: {len(texts)} texts but {len(pairs)} pairs; give one pair per "
                                 "text")
        encoded = glue_data.encode(self.tokenizer, texts, pairs, self.metadata.get("max_length", 128))
        results: list[dict] = [{} for _ in texts]
        rows = np.arange(len(encoded))
        for positions, logits in forward_batches(self.model, encoded, rows, self.device, self.dtype,
                                                 self.batch_size):
            for name, values in logits.items():  # one encoder pass gave every task's logits
                predicted = to_predictions(values, self.scales[name], torch.float64)
                if self.model.num_labels[name] == 1:
                    found = [round(float(v), 4) for v in predicted]
                else:
                    names = self.labels.get(name) or list(range(values.shape[1]))
                    found = [names[i] for i in predicted.tolist()]
                for row, value in zip(positions.tolist(), found):
                    results[row][name] = value
        return results


def check_paths(source: Path, target: Path) -> None:
    """--predict's input must exist and its output be writable, and not the input, before the model loads."""
    if not source.is_file():
        raise SystemExit(f"error: --predict: no such file {source}")
    if target.resolve() == source.resolve():
        raise SystemExit(f"error: --predict-output {target} is the input file; give another path (nothing "
                         "was written)")
    if not target.parent.is_dir():
        raise SystemExit(f"error: --predict-output: the folder {target.parent} does not exist; create it "
                         "first")
    if target.is_dir() or not writable(target.parent) or target.exists() and not writable(target):
        raise SystemExit(f"error: --predict-output {target}: cannot write a file there (a folder, or "
                         "read-only); give another path (nothing was written)")


def predict_corpus(args) -> Path | None:
    """--predict: label every row of a corpus with every task, in chunks (constant memory). Under torchrun
    the chunks are shared out (chunk j to rank j mod K) and rank 0 joins the parts in input order."""
    check_device(args.device)
    rank, world, device = setup_distributed(args.device)
    folder = Path(args.checkpoint or Path(args.output_dir) / "best")
    source = Path(args.predict)
    target = Path(args.predict_output or f"{source}.predictions.jsonl")
    columns = [c for c in args.text_columns.split(",") if c]
    check_paths(source, target)
    check_columns(columns)
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
