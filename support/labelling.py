"""Inference: every task's predictions from one encoder pass per batch, for evaluation and probes, and
for labelling from Python (Labeller; a corpus file: support/corpus.py).

    forward_batches(model, encoded, rows, ...)   the one loop: bucketed batches -> collate -> forward
    predict_encoded(model, task, encoded, ...)   one task's predictions (class ids or unscaled floats)
    predict_tasks(model, requests, ...)          many tasks' predictions, one pass for tasks on one text
    Labeller("runs/mtop/best")(texts)            [{task: label, ...}, ...] for a list of texts (or pairs)

MTOP's point (Sec. 3.1): with active_task=None, one forward pass gives every task's logits.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import glue_data
from mtop import MTOP
from support.system import autocast, log, pad_multiple


@torch.no_grad()
def forward_batches(model: MTOP, encoded: glue_data.Encoded, indices: np.ndarray, device: str, dtype: str,
                    batch_size: int = 64, active_task: str | None = None, label: str = "",
                    heads: list[str] | None = None):
    """Yield (positions, logits) over the rows `indices` of `encoded`, in length-bucketed batches:
    positions (b,) index into `indices`, logits is forward's {task: (b, C)} (every task's when
    active_task is None: one encoder pass). `heads`: one pass, then only these tasks' heads, each run as
    its own module, as a pass with active_task runs it (not MTOP.all_heads' batched products, which
    round differently); in mode "separate", these tasks' passes only. With a label, a progress line
    every 30 seconds."""
    started = last = time.perf_counter()
    done = 0
    for batch in glue_data.batch_order(encoded.lengths[indices], batch_size, 0, 0, shuffle=False):
        done += len(batch)
        if label and time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"{label}: {done}/{len(indices)} rows ({done / (last - started):.0f} rows/s)")
        inputs = glue_data.collate(encoded, indices[batch], multiple=pad_multiple(device),
                                   limit=model.max_text_length)
        ids, mask, types = (inputs[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))
        with autocast(device, dtype):
            if heads is None:
                logits = model(ids, mask, types, active_task=active_task)
            elif model.mode == "separate":  # one pass per task: only the tasks asked for
                logits = {name: model(ids, mask, types, active_task=name)[name] for name in heads}
            else:
                features = model.features(ids, mask, types)  # (b, N, D): every task's a_i, one pass
                logits = {name: model.heads[model.task_index[name]](features[:, model.task_index[name]])
                          for name in heads}
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


@torch.no_grad()
def predict_tasks(model: MTOP, requests: list[tuple[str, glue_data.Encoded, np.ndarray]], device: str,
                  dtype: str, scales: dict[str, tuple[float, float]], batch_size: int = 64,
                  label: str = "") -> list[np.ndarray]:
    """Each request (task, encoded, rows) -> that task's predictions on those rows, as predict_encoded
    gives them. Requests on the same texts (one Encoded.texts key) share one encoder pass over the union
    of their rows, every head reading it (active_task=None): MTOP's one pass, at evaluation. A request
    alone on its texts, and every request in mode "separate" (one pass per task anyway), runs as
    predict_encoded does, with active_task=task.

    The shared pass runs each head as the single-task pass does, and its last encoder layer computes every
    task's prompt rows where the single-task pass computes one task's (electra.py's `rows`): on the CPUs
    tested, a task that reads every row of the union gets bitwise its own predictions. A task that reads
    some of them (a label missing on some rows) is batched with other rows, so with other padding: its
    logits may differ in the last float digit (1 ulp seen; the same classes)."""
    groups: dict[str, list[int]] = {}
    for i, (_, encoded, _) in enumerate(requests):
        alone = not encoded.texts or model.mode == "separate"
        groups.setdefault(f"#{i}" if alone else encoded.texts, []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(requests)
    for members in groups.values():
        if len(members) == 1:
            task, encoded, rows = requests[members[0]]
            out[members[0]] = predict_encoded(model, task, encoded, rows, device, dtype, scales[task],
                                              batch_size, label and f"{label} {task}")
            continue
        encoded = requests[members[0]][1]
        union = np.unique(np.concatenate([requests[i][2] for i in members]))  # sorted
        found = {i: np.zeros(len(union), np.float32 if model.num_labels[requests[i][0]] == 1 else np.int64)
                 for i in members}
        tag = label and f"{label} {requests[members[0]][0]} and {len(members) - 1} more tasks"
        model.eval()
        names = list(dict.fromkeys(requests[i][0] for i in members))
        for positions, logits in forward_batches(model, encoded, union, device, dtype, batch_size, None, tag,
                                                 names):
            for i in members:
                task = requests[i][0]
                found[i][positions] = to_predictions(logits[task], scales[task])
        for i in members:
            out[i] = found[i][np.searchsorted(union, requests[i][2])]
    return out


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
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate (half of a UTF-16 pair): not text
            raise ValueError(f"Labeller: {name}[{i}] holds {item[err.start:err.end]!r} at character "
                             f"{err.start}: not a Unicode character (half of a UTF-16 pair?)") from None


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


def other_shape(pairs: bool) -> str:
    """What the tasks left out of an input read: single texts when the input is pairs, else pairs."""
    return "single texts" if pairs else "sentence pairs"


class Labeller:
    """A trained model folder (runs/.../best) that labels texts with its tasks from one encoder pass per
    batch. From Python:

        labeller = Labeller("runs/mtop/best")
        labeller(["a gripping film", "the plot goes nowhere"])     # [{"SST-2": "1", "CoLA": "1"}, ...]
        labeller(questions, answers)                               # pairs: two lists of one length
        labeller(texts, probabilities=True)                        # [{"labels": {...}, "probabilities":
                                                                   #   {"SST-2": {"0": 0.1, "1": 0.9}}}]

    A task reads single texts or pairs, as it was trained: texts alone are labelled by the single-text
    tasks, pairs by the pair tasks; the others are left out (a warning names them once). `tasks` chooses
    tasks by name (default: all); a chosen task that cannot read the input is an error.
    """

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: str = "fp32", batch_size: int = 64,
                 tasks: list[str] | None = None):
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)) or dtype not in ("fp32", "bf16"):
            raise ValueError(f"Labeller: device {device!r} / dtype {dtype!r}: give cpu, cuda or cuda:N, and "
                             "fp32 or bf16")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"Labeller: device {device!r}, but torch sees no CUDA device here; use 'cpu'")
        self.model, self.metadata = MTOP.load(folder, map_location=device)
        self.tokenizer = glue_data.load_tokenizer(folder)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Labeller: batch_size must be a whole number >= 1, got {batch_size!r}")
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        entries = check_metadata(self.metadata, self.model, Path(folder) / "mtop.json")
        self.labels = {t["name"]: t.get("labels") for t in entries}
        self.scales = {t["name"]: t.get("scale", (0.0, 1.0)) for t in entries}
        self.pair_tasks = [t["name"] for t in entries if t.get("pair")]
        names = self.model.task_names
        if tasks is not None and (unknown := [t for t in tasks if t not in names]):
            raise ValueError(f"Labeller: no task {unknown[0]!r} in {folder}; its tasks are "
                             f"{', '.join(names)}")
        self.tasks = list(names if tasks is None else dict.fromkeys(tasks))
        self.chosen = tasks is not None
        self._named: set[bool] = set()  # input shapes whose left-out tasks were named

    def tasks_for(self, pairs: bool) -> list[str]:
        """The tasks (of self.tasks) that read pairs (pairs=True) or single texts."""
        return [t for t in self.tasks if (t in self.pair_tasks) == pairs]

    def __call__(self, texts: list[str], pairs: list[str] | None = None, probabilities: bool = False,
                 progress: str = "") -> list[dict]:
        """texts (and pairs, of the same length): strings -> one {task: label or value} dict per text, or
        with probabilities {"labels": {...}, "probabilities": {task: {label: p}}} (classification tasks;
        softmax, 6 decimals). Raises ValueError naming the first item that is not a string (None, a NaN
        from pandas, ...), or a chosen task that cannot read this input. `progress`: a label for a
        progress line every 30 seconds."""
        encoded = self.encode(texts, pairs)
        tasks, left_out = self.tasks_to_label(pairs is not None)
        if left_out and (pairs is not None) not in self._named:
            self._named.add(pairs is not None)
            warnings.warn(f"Labeller: {', '.join(left_out)} read {other_shape(pairs is not None)}, so they "
                          "are left out of this input", stacklevel=2)
        found = self.label_encoded(encoded, tasks, probabilities, progress=progress)
        return [found[row] for row in range(len(encoded))]

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> glue_data.Encoded:
        """Checked and tokenized as the model's tasks were trained (mtop.json's max_length)."""
        check_texts(texts, "texts")
        if pairs is not None:
            check_texts(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"Labeller: {len(texts)} texts but {len(pairs)} pairs; give one pair per "
                                 "text")
        return glue_data.encode(self.tokenizer, texts, pairs, self.metadata.get("max_length", 128))

    def tasks_to_label(self, pairs: bool) -> tuple[list[str], list[str]]:
        """(the tasks that read this input shape, the tasks left out); a task chosen by name that reads
        the other shape is a ValueError."""
        fits = self.tasks_for(pairs)
        left_out = [t for t in self.tasks if t not in fits]
        if left_out and self.chosen:
            fix = "give texts alone" if pairs else "give pairs"
            raise ValueError(f"Labeller: task {left_out[0]!r} reads {other_shape(pairs)}; {fix}, or leave it "
                             "out of the tasks chosen")
        if not fits:
            raise ValueError(f"Labeller: no task of this model reads {other_shape(not pairs)}: its tasks "
                             f"({', '.join(self.tasks)}) read {other_shape(pairs)}")
        return fits, left_out

    @torch.no_grad()
    def label_encoded(self, encoded: glue_data.Encoded, tasks: list[str], probabilities: bool = False,
                      shard: tuple[int, int] = (0, 1), progress: str = "") -> dict[int, dict]:
        """{row: result} for the rows of `encoded` in this shard's batches: shard (r, K) takes batches r,
        r + K, ... of the length-sorted order, so every row is computed in the batch it has with one
        process, and K processes give bitwise what one gives."""
        results: dict[int, dict] = {}
        batches = glue_data.batch_order(encoded.lengths, self.batch_size, 0, 0, shuffle=False)
        mine = np.concatenate(batches[shard[0]::shard[1]] or [np.zeros(0, np.int64)])  # this shard's rows
        heads = tasks if self.model.mode == "separate" else None  # "separate": the chosen tasks' passes only
        for positions, logits in forward_batches(self.model, encoded, mine, self.device, self.dtype,
                                                 self.batch_size, label=progress, heads=heads):
            labels, scores = {}, {}
            for name in tasks:
                values = logits[name]
                predicted = to_predictions(values, self.scales[name], torch.float64)
                if self.model.num_labels[name] == 1:
                    labels[name] = [round(float(v), 4) for v in predicted]
                    continue
                names = self.labels.get(name) or list(range(values.shape[1]))
                labels[name] = [names[i] for i in predicted.tolist()]
                if probabilities:
                    p = values.float().softmax(-1).cpu().numpy()  # (b, C)
                    scores[name] = [{label: round(float(x), 6) for label, x in zip(names, row)} for row in p]
            for k, row in enumerate(mine[positions].tolist()):
                row_labels = {name: labels[name][k] for name in tasks}
                results[row] = row_labels if not probabilities else {
                    "labels": row_labels, "probabilities": {name: scores[name][k] for name in scores}}
        return results
