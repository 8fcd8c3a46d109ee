"""The GLUE download: every task's files from their published locations, each checked against its
published sha256, unpacked in a staging folder and moved into place whole (MRPC is rebuilt from the
SentEval copies of the MSR Paraphrase corpus, as GLUE's own script did).

    download_glue(data_dir, ["RTE", "MRPC"])     # train.py calls it for a --data-dir without GLUE files
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from glue_data import GLUE_TASKS, missing_files
from support.files import fetch

GLUE_URL = "https://dl.fbaipublicfiles.com"
_ARCHIVES = {"CoLA": "glue/data/CoLA.zip", "SST-2": "glue/data/SST-2.zip", "QQP": "glue/data/QQP-clean.zip",
             "STS-B": "glue/data/STS-B.zip", "MNLI": "glue/data/MNLI.zip", "QNLI": "glue/data/QNLIv2.zip",
             "RTE": "glue/data/RTE.zip", "WNLI": "glue/data/WNLI.zip"}  # each unzips to <task>/<split>.tsv
# The sha256 of every file the download fetches, as published: Hugging Face datasets' glue
# dataset_infos.json (last version, 2020-09-18), Transformers.jl's GLUE data dependencies and TensorFlow
# Datasets' url_checksums/glue.txt agree on each (Transformers.jl gives the three MRPC files one combined
# digest, which these three reproduce). A file with another digest is refused and nothing is installed.
GLUE_SHA256 = {
    "glue/data/CoLA.zip": "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff",
    "glue/data/SST-2.zip": "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa",
    "glue/data/QQP-clean.zip": "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0",
    "glue/data/STS-B.zip": "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85",
    "glue/data/MNLI.zip": "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633",
    "glue/data/QNLIv2.zip": "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5",
    "glue/data/RTE.zip": "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee",
    "glue/data/WNLI.zip": "ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46",
    "glue/data/AX.tsv": "0e13510b1bb14436ff7e2ee82338f0efb0133ecf2e73507a697dc210db3f05fd",
    "senteval/senteval_data/msr_paraphrase_train.txt":
        "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89",
    "senteval/senteval_data/msr_paraphrase_test.txt":
        "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784",
    "glue/data/mrpc_dev_ids.tsv": "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7",
}


def download_glue(data_dir: str | Path, task_names: list[str], base_url: str = GLUE_URL,
                  checksums: dict[str, str] = GLUE_SHA256) -> None:
    """Fetch the named GLUE tasks (and "AX") whose files are missing from data_dir, each file checked
    against its sha256 in `checksums` (keys: paths under base_url). Each task is fetched and unpacked in a
    temporary folder inside data_dir, then its files are moved into place: a failed, refused or interrupted
    download leaves no partial task files (a hard kill may leave a hidden .download-* folder), and a
    data_dir this call created is removed again if it stays empty."""
    data_dir = Path(data_dir)
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        _download_tasks(data_dir, task_names, base_url, checksums)
    except BaseException:
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise


def _download_tasks(data_dir: Path, task_names: list[str], base_url: str, checksums: dict[str, str]) -> None:
    for name in task_names:
        if name not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {name!r}; valid names: {', '.join(GLUE_TASKS)}")
        task = GLUE_TASKS[name]
        if not missing_files([task], data_dir):
            print(f"{name}: already in {data_dir}")
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=data_dir))
        try:
            if name == "MRPC":
                _build_mrpc(staging, base_url, checksums)
            elif name == "AX":
                _fetch(base_url, "glue/data/AX.tsv", staging / "diagnostic" / "diagnostic.tsv", checksums)
            else:
                _fetch(base_url, _ARCHIVES[name], staging / "archive.zip", checksums)
                try:
                    with zipfile.ZipFile(staging / "archive.zip") as archive:
                        archive.extractall(staging)  # extractall drops '..' and absolute paths
                except zipfile.BadZipFile as error:
                    raise OSError(f"{base_url}/{_ARCHIVES[name]} is not a valid zip ({error})") from None
            relative = [relative_path for _, relative_path in task.files]
            absent = [p for p in relative if not (staging / p).is_file()]
            if absent:
                raise OSError(f"{name}: the download lacks {', '.join(absent)}")
            for relative_path in relative:  # every file is complete: move them into place
                (data_dir / relative_path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / relative_path, data_dir / relative_path)
            print(f"{name}: done")
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _fetch(base_url: str, url_path: str, destination: Path, checksums: dict[str, str]) -> None:
    """Download base_url/url_path to destination, refused unless its sha256 is checksums[url_path]."""
    if url_path not in checksums:
        raise OSError(f"no published sha256 for {url_path}, so a download of it cannot be verified")
    fetch(f"{base_url}/{url_path}", destination, sha256=checksums[url_path])


def _build_mrpc(staging: Path, base_url: str, checksums: dict[str, str]) -> None:
    """Build MRPC/{train,dev,test}.tsv from the SentEval copies of the MSR Paraphrase corpus, as GLUE did:
    train rows whose (#1 ID, #2 ID) is in mrpc_dev_ids.tsv form dev; the test label becomes an index."""
    sources = {"train": "senteval/senteval_data/msr_paraphrase_train.txt",
               "test": "senteval/senteval_data/msr_paraphrase_test.txt",
               "dev_ids": "glue/data/mrpc_dev_ids.tsv"}
    lines = {}
    for key, url_path in sources.items():
        _fetch(base_url, url_path, staging / Path(url_path).name, checksums)
        text = (staging / Path(url_path).name).read_text(encoding="utf-8")
        lines[key] = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    dev_ids = {tuple(line.strip().split("\t")) for line in lines["dev_ids"]}

    def fields(line: str, file: str) -> list[str]:
        row = line.strip().split("\t")
        if len(row) != 5:
            raise OSError(f"{file}: expected 5 tab-separated columns, got {len(row)} in {line[:80]!r}")
        return row

    header = lines["train"][0]  # copied as is, byte-order mark included
    train, dev = [header], [header]
    for line in lines["train"][1:]:
        row = fields(line, "msr_paraphrase_train.txt")
        (dev if (row[1], row[2]) in dev_ids else train).append("\t".join(row))
    test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    test += [f"{index}\t" + "\t".join(fields(line, "msr_paraphrase_test.txt")[1:])
             for index, line in enumerate(lines["test"][1:])]
    (staging / "MRPC").mkdir()
    for split, rows in (("train", train), ("dev", dev), ("test", test)):
        (staging / "MRPC" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
