"""The GLUE leaderboard's files: one TSV per test set under its official name, and their zip; a custom
task set's test predictions are written the same way, with its label strings.

    write_submission(tasks, {"RTE/test": predictions, ...}, out_dir)   # the files from predictions
    write_test_predictions(out, tasks, args)    # train.py: the best model's test predictions, written
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

import glue_data
from glue_data import GLUE_TASKS, OFFICIAL_ROWS, Task
from mtop import MTOP
from support.files import atomic_write
from support.labelling import predict_tasks
from support.system import log

SUBMISSION_FILES: dict[str, str] = {  # "<task>/<test split>" -> the file name the leaderboard expects
    "CoLA/test": "CoLA.tsv", "SST-2/test": "SST-2.tsv", "MRPC/test": "MRPC.tsv", "STS-B/test": "STS-B.tsv",
    "QQP/test": "QQP.tsv", "MNLI/test_matched": "MNLI-m.tsv", "MNLI/test_mismatched": "MNLI-mm.tsv",
    "QNLI/test": "QNLI.tsv", "RTE/test": "RTE.tsv", "WNLI/test": "WNLI.tsv", "AX/test": "AX.tsv",
}


def left_out_of_submission(predictions: dict[str, np.ndarray]) -> list[str]:
    """Leaderboard files that write_submission leaves out because there are no predictions for them."""
    return [file_name for key, file_name in SUBMISSION_FILES.items() if key not in predictions]


def write_submission(tasks: list[Task], predictions: dict[str, np.ndarray], out_dir: str | Path,
                     check_rows: bool = True) -> Path:
    """Write one prediction file per test split (header `index<TAB>prediction`, test-file order) and a
    flat zip of them to out_dir; return the zip's path. predictions: "<task>/<split>" -> class indices or
    regression scores; "AX/test" holds the MNLI head's predictions on the diagnostic set. GLUE splits get
    their leaderboard names (SUBMISSION_FILES); a custom task gets <task>.tsv. check_rows: a GLUE split
    must have the official number of test rows."""
    trained = {task.name: task for task in tasks}
    ordered = [key for key in SUBMISSION_FILES if key in predictions]  # leaderboard order, then the rest
    ordered += [key for key in predictions if key not in SUBMISSION_FILES]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ordered:
        name, _, split = key.partition("/")
        task = trained.get(name, GLUE_TASKS["AX"] if name == "AX" else None)  # a custom task may be named AX
        if task is None or split not in task.test_splits or (task is GLUE_TASKS["AX"]
                                                             and "MNLI" not in trained):
            raise ValueError(f"predictions for {key!r}, but that is not a test split of a trained task "
                             f"(trained: {', '.join(trained)}; AX needs MNLI)")
        is_glue = GLUE_TASKS.get(name) == task
        values = np.asarray(predictions[key])
        if is_glue and check_rows and len(values) != OFFICIAL_ROWS[key]:
            raise ValueError(f"{key}: {len(values)} predictions, the test file has {OFFICIAL_ROWS[key]} rows")
        if task.kind == "regression" and is_glue:
            column = [f"{score:.3f}" for score in np.clip(values, 0.0, 5.0)]  # STS-B scores lie in [0, 5]
        elif task.kind == "regression":
            column = [f"{score:.6g}" for score in values]
        else:
            if values.size and (values.min() < 0 or values.max() >= task.num_labels):
                raise ValueError(f"{key}: class indices must lie in 0..{task.num_labels - 1}")
            column = [task.labels[index] for index in values.astype(np.int64)]
        file_name = SUBMISSION_FILES[key] if is_glue else f"{name}.tsv"
        lines = ["index\tprediction"] + [f"{index}\t{value}" for index, value in enumerate(column)]
        atomic_write(out_dir / file_name, lambda tmp: tmp.write_bytes(("\n".join(lines) + "\n").encode()))
        written.append(file_name)

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for file_name in written:
                archive.write(out_dir / file_name, arcname=file_name)  # flat: no folder in the zip
    # The leaderboard's zip when every task is GLUE's; a custom task set's test predictions otherwise.
    glue_only = all(GLUE_TASKS.get(task.name) == task for task in tasks)
    zip_path = out_dir / ("glue_submission.zip" if glue_only else "test_predictions.zip")
    atomic_write(zip_path, write_zip)
    left_out = left_out_of_submission(predictions) if set(written) & set(SUBMISSION_FILES.values()) else []
    print(f"wrote {zip_path} ({len(written)} files)"
          + (f"; left out of the leaderboard set, no predictions: {', '.join(left_out)}" if left_out else ""))
    return zip_path


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
    requests, keys, shared = [], [], {}  # tasks on one test file are predicted from one pass
    for source, head, split in jobs:
        if glue_data.missing_files([source], args.data_dir, splits=(split,)):
            log(f"no {source.name} {split} file: left out of the submission")
            continue
        encoded = glue_data.load_encoded(source, split, args.data_dir, tokenizer, args.max_length, cache,
                                         shared)
        log(f"test predictions: {source.name} {split}, {len(encoded)} rows")
        requests.append((head.name, encoded, np.arange(len(encoded))))
        keys.append(f"{source.name}/{split}")
    predictions = dict(zip(keys, predict_tasks(model, requests, args.device, args.dtype, scales,
                                               label="test")))
    wnli = glue_data.GLUE_TASKS["WNLI"]
    if args.task_set == "glue" and wnli not in tasks and not glue_data.missing_files([wnli], args.data_dir):
        # The paper leaves WNLI out; the leaderboard still wants its file: the train majority class.
        train = glue_data.load_split(wnli, "train", args.data_dir)
        majority = np.bincount(train.labels[train.labelled]).argmax()
        rows = len(glue_data.load_split(wnli, "test", args.data_dir))
        predictions["WNLI/test"] = np.full(rows, majority)
        tasks = tasks + [wnli]
    if predictions:
        path = write_submission(tasks, predictions, out / "submission")
        log(f"test predictions: {path}")
