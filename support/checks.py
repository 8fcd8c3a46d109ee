"""The checks every input of a training run passes before any work: flags that name things on this
machine, the task set and its files (downloaded when --data-dir holds no GLUE file), every split read
once, the model folder and its vocabulary. Bad input ends the run with one message naming the file,
line or flag and the fix, before a step is trained or a file written.

    tasks, model_dir, model_folder, tokenizer = prepare_inputs(args, rank, world, device)
    with user_errors(): ...        # FileNotFoundError / ValueError / OSError -> "error: ..." and exit 1
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

import glue_data
from electra import ElectraConfig, resolve_pretrained
from mtop import MAX_SETTINGS_BYTES, PromptConfig
from support.files import held
from support.glue_download import download_glue
from support.system import cpu_has_bf16, log


@contextlib.contextmanager
def user_errors():
    """Turn the clear errors of bad input (a missing file, an unknown task, a malformed row, a
    checkpoint that does not match) into one message and exit status 1, without a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


def check_device(device: str) -> None:
    """--device: cpu, cuda or cuda:N, and a CUDA device must be there."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SystemExit(f"error: --device {device!r}: give cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}, but torch sees no CUDA device here (a CPU-only build of "
                         "torch, or no GPU): use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {device}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s), numbered from 0")


def writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def check_flags(args, device: str) -> None:
    """The flags that name things on this machine, before anything is read or downloaded."""
    check_device(device)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output-dir {out} is a file, not a folder; give a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not writable(existing):
        raise SystemExit(f"error: --output-dir {out}: {existing} cannot be written here (read-only, or "
                         "another user's); give a folder you can write to")


def output_dir_held(args):
    """The run folder for this training alone: a lock file beside it (.<name>.lock, support.files.held),
    taken by the process of rank 0 (under torchrun, RANK=0; the job's other ranks share its folder)."""
    out = Path(args.output_dir).resolve()  # one lock for a folder, whatever path or link names it
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    check_flags(args, args.device)  # a folder that cannot be written is refused before the lock is made
    return held(out.parent / f".{out.name}.lock", f"--output-dir {args.output_dir}")


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
            if not len(examples.labelled):
                raise ValueError(f"{examples.path}: every row's {task.label!r} is a missing value "
                                 f"{list(task.missing)}; task {task.name} needs labelled rows in its {split} "
                                 "file")
            official = glue_data.OFFICIAL_ROWS.get(f"{task.name}/{split}")
            if (split.startswith("test") and not args.no_test and glue_data.GLUE_TASKS.get(task.name) == task
                    and official is not None and len(examples) != official):
                raise ValueError(f"{examples.path}: {len(examples)} rows, but GLUE's {task.name} {split} "
                                 f"file has {official}: the leaderboard needs the official file (or run "
                                 "with --no-test)")
        if args.max_length < 3 + 2 * (len(task.text) - 1):
            raise ValueError(f"--max-length {args.max_length} leaves no room for the text of {task.name}: "
                             f"[CLS] and [SEP] take {1 + len(task.text)} of them")


def check_metadata_size(model, metadata: dict, tasks: list[glue_data.Task]) -> int:
    """best/mtop.json must stay under its size limit, or the first evaluation would fail to write it:
    model.settings_text of the metadata with a dev result of the largest shape (every metric of every
    split at full precision, each task's longest label as its one class). Returns that size."""
    value = 1 / 3  # 0.3333333333333333: a float's longest repr but for its exponent forms
    metrics = {t.name: {f"{m}_{split}": value for m in t.metrics for split in t.dev_splits} for t in tasks}
    scores = {t.name: value for t in tasks}
    longest = {t.name: max(t.labels or [""], key=len) for t in tasks}
    dev = {"metrics": metrics, "scores": scores, "average": value, "primary": scores, "paper_average": value,
           "one_class": longest}
    size = len(model.settings_text(metadata | {"step": 10**9, "dev": dev}).encode())
    if size > MAX_SETTINGS_BYTES:
        raise ValueError(f"the tasks' names and labels would make best/mtop.json up to {size} bytes, over "
                         f"its limit of {MAX_SETTINGS_BYTES}: fewer or shorter labels (or tasks)")
    return size


def prompt_config(args) -> PromptConfig:
    """The prompt settings the flags give (--mode, --task-prompt-len, --shared-prompt-len, --prompt-*,
    --pooling)."""
    return PromptConfig(args.mode, args.task_prompt_len, args.shared_prompt_len, args.prompt_entry,
                        args.prompt_init, args.pooling)


def check_model(model_folder: Path, tokenizer, config: ElectraConfig, args, num_tasks: int) -> None:
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
    positions = 0  # prompts take positions only when they enter with them
    if args.prompt_entry == "input-positions":
        positions = prompt_config(args).prompt_positions(num_tasks)
    if positions + args.max_length > config.max_position_embeddings:
        limit = config.max_position_embeddings
        raise ValueError(f"--prompt-entry input-positions puts {positions} prompts before the text: with "
                         f"--max-length {args.max_length} that is {positions + args.max_length} positions, "
                         f"over the model's max_position_embeddings={limit}; lower --max-length to "
                         f"{limit - positions} or use --prompt-entry after-norm")


def fetch_glue_if_absent(tasks: list[glue_data.Task], args, rank: int, world: int) -> None:
    """--task-set glue with a --data-dir that holds no GLUE file: rank 0 downloads the tasks (and AX with
    MNLI) while the other ranks wait. Then every train and dev file must be there."""
    glue_files = [t.path(split, args.data_dir) for t in glue_data.GLUE_TASKS.values() for split in t.splits]
    if rank == 0 and args.task_set == "glue" and not any(p.is_file() for p in glue_files):
        names = [t.name for t in tasks] + (["AX"] if any(t.name == "MNLI" for t in tasks) else [])
        try:
            download_glue(args.data_dir, names)
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
                         "or train on the tasks you have" + (f" with --tasks {','.join(have)}" if have else
                                                             " (--tasks)") + ".")


def fetch_model(args, rank: int, world: int) -> tuple[Path, Path]:
    """(model_dir, model_folder): --model as a local folder or .safetensors file, or a hub name that rank 0
    fetches (at --revision) while the other ranks wait; model_folder is the folder that holds config.json."""
    cache_dir = Path(args.cache_dir).expanduser()
    fetch = lambda: resolve_pretrained(args.model, cache_dir=cache_dir, revision=args.revision or None)
    model_dir = None
    if rank == 0:
        try:
            model_dir = fetch()
        except OSError as err:
            raise SystemExit(f"error: {err}\nFix: pass a local model folder (config.json, model.safetensors, "
                             "vocab.txt or tokenizer.json) with --model") from None
    if world > 1:
        dist.barrier()
        model_dir = model_dir or fetch()  # from the cache rank 0 filled
    return model_dir, model_dir if model_dir.is_dir() else model_dir.parent


def prepare_inputs(args, rank: int, world: int, device: str):
    """Every input of a training run, checked: (tasks, model_dir, model_folder, tokenizer). Data files and
    the model are downloaded where they are missing and can be; bad input ends the run with one message."""
    check_flags(args, device)
    with user_errors():
        prompt_config(args)  # a setting the mode cannot take (--pooling mean+cls with none) ends here
        names = [n for n in args.tasks.split(",") if n] or None
        tasks = glue_data.load_task_set(args.task_set, args.data_dir, names)
        problems = []  # offline, the data and the model are named in one message
        try:
            fetch_glue_if_absent(tasks, args, rank, world)
        except SystemExit as err:
            problems.append(str(err.code))
        try:
            model_dir, model_folder = fetch_model(args, rank, world)
        except SystemExit as err:
            problems.append(str(err.code))
        if problems:
            raise SystemExit("\n".join(problems))
        check_data(tasks, args)
        tokenizer = glue_data.load_tokenizer(model_folder)
        config = ElectraConfig.from_json(model_folder / "config.json")
        check_model(model_folder, tokenizer, config, args, len(tasks))
    if device == "cpu" and args.dtype == "bf16" and not cpu_has_bf16():
        log("warning: --dtype bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) emulates them, "
            "tens of times slower than fp32: use --dtype fp32 on this machine", rank)
    return tasks, model_dir, model_folder, tokenizer
