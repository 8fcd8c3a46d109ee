"""--predict: label a corpus file with a trained model's tasks, streaming, a chunk of rows at a time.

    python train.py --predict corpus.tsv --checkpoint runs/mtop/best --text-columns text --id-column id

The corpus is a .tsv or .csv file with a header (read as training files are: glue_data.read_table) or a
.jsonl file; a pipe (`<(zcat corpus.tsv.gz)`) streams too, named by its suffix-less path as a TSV. Each
input row gives one output line, in input order: {"row": its 0-based index among the rows (the header
and blank JSONL lines not counted), "id": the --id-column value, "labels": {task: label or value},
"probabilities": {task: {label: p}} (with --probabilities)}. Under torchrun the batches of every chunk
are dealt out to the K processes and rank 0 merges their parts: the same bytes one process writes.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import os
import stat
import time
from pathlib import Path

import torch.distributed as dist

import glue_data
from support.checks import check_device, user_errors, writable
from support.files import held
from support.labelling import Labeller, other_shape
from support.system import broadcast, exit_on_sigterm, log, setup_distributed


def read_corpus(path: Path, columns: list[str], id_column: str = "", kind: str = ""):
    """Yield (row, id or None, text_a, text_b or None) from a corpus: a .jsonl file (one JSON object per
    line, key "text" by default), or a .tsv/.csv file with a header (the first column by default); `kind`
    (jsonl, tsv, csv) overrides the suffix, and a path without one (a pipe) is a TSV. Bad input:
    SystemExit naming the file and line."""
    check_columns(columns, id_column)
    kind = kind or {".jsonl": "jsonl", ".csv": "csv"}.get(path.suffix.lower(), "tsv")
    try:
        reader = _read_jsonl if kind == "jsonl" else lambda *a: _read_table(*a, kind=kind)
        for row, (ident, text_a, text_b) in enumerate(reader(path, columns, id_column)):
            yield row, ident, text_a, text_b
    except ValueError as err:  # glue_data's readers name the file and line
        raise SystemExit(f"error: {err}") from None


def check_columns(columns: list[str], id_column: str = "") -> None:
    if len(columns) > 2:
        raise SystemExit(f"error: --text-columns names {len(columns)} columns ({', '.join(columns)}); a text "
                         "is one column, or two for a pair")
    if len(set(columns)) != len(columns):
        raise SystemExit(f"error: --text-columns names {columns[0]!r} twice; a pair is two different columns")
    if id_column and id_column in columns:
        raise SystemExit(f"error: --id-column {id_column!r} is also a text column; name the id column")


def _read_jsonl(path: Path, columns: list[str], id_column: str):
    keys = columns or ["text"]
    for number, line in glue_data.text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise SystemExit(f"error: {path}:{number}: not a JSON object ({str(err)[:100]})") from None
        missing = [k for k in keys + [id_column] * bool(id_column) if not isinstance(record, dict)
                   or k not in record]
        if missing:
            flag = "--id-column" if missing[0] == id_column else "--text-columns"
            raise SystemExit(f"error: {path}:{number}: no key {missing[0]!r} (use {flag})")
        texts = [record[k] for k in keys]
        if not all(isinstance(t, str) for t in texts):
            raise SystemExit(f"error: {path}:{number}: the value of {keys} must be a string")
        yield record[id_column] if id_column else None, texts[0], texts[1] if len(texts) > 1 else None


def _read_table(path: Path, columns: list[str], id_column: str, kind: str = ""):
    header, rows = glue_data.read_table(path, kind=kind)
    keys = columns or [header[0]]
    missing = [k for k in keys + [id_column] * bool(id_column) if k not in header]
    if missing:
        flag = "--id-column" if missing[0] == id_column else "--text-columns"
        raise SystemExit(f"error: {path}:1: no column {missing[0]!r} in header {header} (use {flag})")
    where = glue_data.column_indices(header, tuple(keys + [id_column] * bool(id_column)), path)
    for number, fields in rows:
        if len(fields) != len(header):
            raise SystemExit(f"error: {path}:{number}: {len(fields)} columns, the header has {len(header)}")
        ident = fields[where[-1]] if id_column else None
        yield ident, fields[where[0]], fields[where[1]] if len(keys) > 1 else None


def check_paths(source: Path, target: Path | None, world: int) -> Path:
    """--predict's input must exist (a file, or a pipe read by one process) and its output (default:
    <input>.predictions.jsonl beside a file) be writable, and not the input, before the model loads."""
    if not source.exists() or source.is_dir():
        raise SystemExit(f"error: --predict: no such file {source}")
    if not source.is_file():
        kind = "a pipe" if stat.S_ISFIFO(source.stat().st_mode) else "not a regular file"
        if world > 1:
            raise SystemExit(f"error: --predict {source} is {kind}, which only one process can read; under "
                             "torchrun give a file")
        if target is None:
            raise SystemExit(f"error: --predict {source} is {kind}, with no folder to write beside: give "
                             "--predict-output (and --predict-format when it is not a TSV)")
    target = target or Path(f"{source}.predictions.jsonl")
    if target.resolve() == source.resolve():
        raise SystemExit(f"error: --predict-output {target} is the input file; give another path (nothing "
                         "was written)")
    if not target.parent.is_dir():
        raise SystemExit(f"error: --predict-output: the folder {target.parent} does not exist; create it "
                         "first")
    if target.is_dir() or not writable(target.parent) or target.exists() and not writable(target):
        raise SystemExit(f"error: --predict-output {target}: cannot write a file there (a folder, or "
                         "read-only); give another path (nothing was written)")
    return target


def choose_tasks(labeller: Labeller, pairs: bool, rank: int) -> list[str]:
    """The tasks that label this corpus: --predict-tasks (or all), less those that read the other input
    shape, named once; a chosen task that cannot read it ends the run."""
    with user_errors():
        tasks, left_out = labeller.tasks_to_label(pairs)
    if left_out:
        fix = "name one --text-columns" if pairs else "name two columns with --text-columns a,b"
        log(f"left out: {', '.join(left_out)} (they read {other_shape(pairs)}; {fix} to label them)", rank)
    return tasks


def predict_corpus(args) -> Path | None:
    """--predict: label every row of a corpus, a chunk of --predict-chunk rows at a time (constant memory),
    into --predict-output, which one job at a time may write. Under torchrun each chunk's batches are
    dealt out (Labeller.label_encoded's shard) and rank 0 merges the processes' parts by row."""
    check_device(args.device)
    rank, world, device = setup_distributed(args.device)
    folder = Path(args.checkpoint or Path(args.output_dir) / "best")
    source = Path(args.predict)
    target = check_paths(source, Path(args.predict_output) if args.predict_output else None, world)
    columns = [c for c in args.text_columns.split(",") if c]
    with contextlib.ExitStack() as stack:
        job = hold_output(stack, target, rank, world)
        rows = read_corpus(source, columns, args.id_column, args.predict_format)
        first = next(rows, None)  # the header and the first row are checked before the model loads
        rows = itertools.chain([first] if first else [], rows)
        with user_errors():
            labeller = Labeller(folder, device, args.dtype,
                                tasks=[t for t in args.predict_tasks.split(",") if t] or None)
        tasks = choose_tasks(labeller, len(columns) == 2, rank)
        tmp = target.with_name(f".{target.name}.tmp")
        part = tmp if world == 1 else target.with_name(f".{target.name}.{job}.part{rank}")
        try:
            with exit_on_sigterm():  # SIGTERM: the clean-up below runs
                read, mine = label_chunks(labeller, rows, tasks, len(columns) == 2, part, args, rank, world)
                shares = [mine]
                if world > 1:
                    shares = [0] * world
                    dist.all_gather_object(shares, mine)  # every part is complete; each one's row count
                    if rank == 0:
                        merge_parts([part.with_name(f".{target.name}.{job}.part{r}") for r in range(world)],
                                    tmp)
                    dist.barrier()
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # a half-written output never takes the target's name
            if world > 1:
                part.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SystemExit(f"error: writing {target}: {err.strerror}; nothing was written") from None
            raise
        if world > 1:
            part.unlink(missing_ok=True)
            dist.destroy_process_group()
        if rank != 0:
            return None
        tmp.replace(target)
    per_process = f" (per process: {', '.join(map(str, shares))})" if world > 1 else ""
    log(f"wrote {target}: {read} rows{per_process}, tasks {', '.join(tasks)}")
    return target


def hold_output(stack: contextlib.ExitStack, target: Path, rank: int, world: int) -> str:
    """The output for this job alone: rank 0 takes its lock (support.files.held) in `stack`; every rank
    learns whether it could (a refused job stops on every rank, before any file is touched) and the job's
    name for its part files (rank 0's process id, so that no other job's parts are touched)."""
    refused = ""
    if rank == 0:
        try:
            stack.enter_context(held(target.with_name(f".{target.name}.lock"), f"--predict-output {target}"))
        except SystemExit as err:
            refused = str(err.code)
    refused, job = broadcast((refused, os.getpid()), world)
    if refused:
        raise SystemExit(refused)
    return str(job)


def label_chunks(labeller: Labeller, rows, tasks: list[str], pairs: bool, part: Path, args, rank: int,
                 world: int) -> tuple[int, int]:
    """Label the corpus's rows chunk by chunk into `part` (this process's batches of each chunk, in row
    order), with a progress line per chunk; returns (the rows read, the rows this process labelled)."""
    started, read, mine = time.perf_counter(), 0, 0
    with open(part, "w", encoding="utf-8") as f:
        while block := list(itertools.islice(rows, args.predict_chunk)):
            encoded = labeller.encode([r[2] for r in block], [r[3] for r in block] if pairs else None)
            progress = f"rows {read}-{read + len(block) - 1}" if rank == 0 else ""  # as "row" counts, from 0
            found = labeller.label_encoded(encoded, tasks, args.probabilities, (rank, world), progress)
            for k in sorted(found):
                result = found[k] if args.probabilities else {"labels": found[k]}
                ident = {"id": block[k][1]} if args.id_column else {}
                f.write(json.dumps({"row": block[k][0], **ident, **result}) + "\n")
            read, mine = read + len(block), mine + len(found)
            if world > 1:
                dist.barrier()  # every process has done this chunk: the count below is right
            log(f"labelled {read} rows ({read / (time.perf_counter() - started):.0f} rows/s"
                f"{f' over {world} processes' if world > 1 else ''})", rank)
    return read, mine


def merge_parts(parts: list[Path], out: Path) -> None:
    """Merge the processes' parts, each in row order, into one file in row order. Every line starts with
    '{"row": N,' (predict_corpus writes it so), which gives the key without parsing the whole line."""
    files = [open(p, encoding="utf-8") for p in parts]
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(heapq.merge(*files, key=lambda line: int(line[8:line.index(",", 8)])))
    finally:
        for file in files:
            file.close()
