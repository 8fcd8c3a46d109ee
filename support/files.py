"""File helpers every layer uses: a JSON object read with one clear error, a download that lands whole or
not at all, and a write that readers never see half done. Imports nothing of the project.

    read_json(path, hint)          a JSON object, or one error naming the file
    fetch(url, dest, sha256=...)   download with progress; dest appears only when complete (and verified)
    atomic_write(path, write)      write to a temporary name, then rename; a full disk is one message
    held(lock, what)               one process at a time (a run folder, a --predict output)
    name_problem(name)             why a task name cannot name a file ("" when it can)
    read_table(path), text_lines   how every text file is read (training files, corpora): one set of rules
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from safetensors import SafetensorError


def read_json(path: Path, missing_hint: str) -> dict:
    """A JSON object from a file; a missing, unreadable or non-object file gets one error naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read; not a file this project writes") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def fetch(url: str, dest: Path, optional: bool = False, sha256: str | None = None) -> bool:
    """Download url -> dest with progress on stdout; False if optional and the server says 404. The
    bytes go to dest.part, renamed to dest only when complete and, with `sha256`, when their digest is
    that one: a failed, cut or refused download leaves nothing under dest's name."""
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as err:
        if optional and err.code == 404:
            return False
        raise OSError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise OSError(f"download of {url} failed: {getattr(err, 'reason', err)} (no network?)") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest, total, done, reported = hashlib.sha256(), int(response.headers.get("Content-Length") or 0), 0, 0
    print(f"downloading {url}" + (f" ({total / 1e6:.1f} MB)" if total else ""), flush=True)
    try:
        with response, open(part, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total > 10 << 20 and done * 10 // total > reported:  # a line at every 10% of a big file
                    reported = done * 10 // total
                    print(f"  {done / 1e6:.0f} / {total / 1e6:.0f} MB", flush=True)
        if total and done != total:
            raise OSError(f"the connection closed after {done} of {total} bytes")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise OSError(f"its sha256 is {digest.hexdigest()}, not the published {sha256}: a changed or "
                          "tampered file, refused (nothing was installed)")
        part.replace(dest)
    except (OSError, http.client.HTTPException) as err:
        part.unlink(missing_ok=True)
        raise OSError(f"download of {url} failed: {err}") from None
    return True


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path over `path`: readers never see half a file, and a crash
    or an error leaves no file behind. The temporary name is unique, so processes that write the same
    file at once (torchrun ranks filling one cache) do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        try:
            write(tmp)
        except SafetensorError as err:  # safetensors reports a full disk as its own error, not an OSError
            raise OSError(errno.ENOSPC if "No space" in str(err) else errno.EIO, str(err)) from None
        tmp.replace(path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(err):
            raise OSError(f"no space left on the device while writing {path}; the previous {path.name}, "
                          "if any, is untouched. Free some space and run again (--resume continues a "
                          "run)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def held(path: Path, what: str):
    """Hold the lock file `path` for the block: one process at a time. A second gets SystemExit naming
    `what` and the process that holds it; the kernel releases the lock when its process ends, however it
    ends (flock), so a killed process leaves nothing stuck. The file is removed on release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            file = open(path, "a+", encoding="utf-8")
        except OSError as err:
            raise SystemExit(f"error: {what}: cannot create {path} ({err.strerror}); give a folder you can "
                             "write to") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read(100).strip()
            file.close()
            raise SystemExit(f"error: {what} is in use by another process ({holder or 'unknown'}); wait for "
                             "it to end, or use another one") from None
        except OSError as err:  # a file system without locks (some network ones): go on, and say so
            file.close()
            print(f"warning: {what}: {path} cannot be locked here ({err.strerror}); nothing keeps a second "
                  "process out of it", flush=True)
            yield
            return
        if path.exists() and os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
            break  # the lock is on the file at `path`, not on one its last holder removed meanwhile
        file.close()
    try:
        file.truncate(0)
        file.write(f"pid {os.getpid()}")
        file.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        file.close()


def name_problem(name: object) -> str:
    """Why `name` cannot name a task ("" when it can): task names become file names (the token cache, the
    leaderboard files), so they are non-empty, at most 100 characters, with no / \\ : * ? " < > |, no
    control characters, and not "." or ".."."""
    if not isinstance(name, str) or not name.strip():
        return f"must be a non-empty string, got {name!r}"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a file"
    if len(name) > 100:
        return f"is {len(name)} characters long; at most 100 (it names files)"
    if bad := [c for c in name if c in '/\\:*?"<>|' or not c.isprintable()]:
        return (f"{name[:40]!r} holds {bad[0]!r}; a task name can name a file (no / \\ : * ? \" < > |, no "
                "control characters)")
    return ""


# .csv fields have no length limit, as .tsv fields have none (csv's default is 131,072 characters). The
# setting is the process's; set once, here, so that reads that overlap never see another value.
csv.field_size_limit(2**31 - 1)


def read_table(path: Path, header: tuple[str, ...] | None = None, kind: str = ""):
    """(header, rows): rows yields (line number, fields) of a .tsv or .csv file, streaming; every text file
    the project takes (training, dev, test, a corpus to label) is read by this one function.

    The rules: UTF-8 (a byte-order mark at the start is dropped), lines end at "\\n" only (a "\\r" before
    it is dropped; a lone "\\r" stays in the text), blank lines at the end of the file are ignored, no
    limit on a field's length. A .tsv splits on tabs with no quoting (a '"' is text); a .csv follows the
    csv module's defaults (commas, '"' quotes fields and may hold line breaks). `header` names the columns
    of a file without a header row (CoLA train/dev); `kind` ("csv" or "tsv") overrides the suffix (a pipe
    has none). Errors name the file and line."""
    lines = text_lines(path)
    if (kind or path.suffix.lower().lstrip(".")) == "csv":
        rows = _csv_rows(path, lines)
    else:
        # NOTE: no quote handling. With quoting on, a field that starts with '"' swallows the tabs and
        # lines after it (MRPC train would read 3570 rows, not 3668).
        rows = ((number, line.removesuffix("\r").split("\t")) for number, line in lines)
    rows = _drop_trailing_blank(rows)
    if header is None:
        first = next(rows, None)
        if first is None:
            raise ValueError(f"{path}: the file is empty; expected a header row")
        header = tuple(first[1])
        if not any(name.strip() for name in header):
            raise ValueError(f"{path}, line {first[0]}: the header row is empty; the first line names the "
                             "columns")
    return list(header), rows


def text_lines(path: Path):
    """(line number, text) of each line of a text file, split at "\\n" only, decoded as UTF-8 one line at
    a time, a byte-order mark at the start dropped: how every text file is read (read_table, JSONL)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {number}: bytes that are not UTF-8 ({error.reason}); "
                                 "save the file as UTF-8") from None
            yield number, (line.removeprefix("\ufeff") if number == 1 else line).removesuffix("\n")


def _csv_rows(path: Path, lines):
    """(line number of the record's last line, fields); the csv module reads quoted line breaks itself."""
    reader = csv.reader(line + "\n" for _, line in lines)
    try:
        for fields in reader:
            yield reader.line_num, fields
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: {error}") from None


def _drop_trailing_blank(rows):
    blank = []  # blank rows are held back: kept if a row follows, dropped at the end of the file
    for number, fields in rows:
        if fields in ([""], []):
            blank.append((number, fields))
            continue
        yield from blank
        blank.clear()
        yield number, fields
