"""The leaderboard's files (support/submission.py) and the GLUE download (support/glue_download.py)."""

import contextlib
import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest

import glue_data
from conftest import GLUE, SMALL_GLUE, news_task_set
from support import glue_download, submission

# -- glue_data.py: submission; support/glue_download.py: the download ---------------------------------

def test_submission_has_official_names_headers_rows_and_clipped_scores(tmp_path, capsys):
    """The zip holds one flat file per predicted test set, in the leaderboard format; the rest are listed."""
    rng = np.random.default_rng(0)
    keys = [key for key in submission.SUBMISSION_FILES if key not in ("QQP/test", "WNLI/test")]
    predictions = {key: rng.integers(0, GLUE[key.split("/")[0]].num_labels, glue_data.OFFICIAL_ROWS[key])
                   for key in keys}
    predictions["STS-B/test"] = rng.uniform(-1, 6, glue_data.OFFICIAL_ROWS["STS-B/test"])
    trained = glue_data.load_task_set("glue", SMALL_GLUE, ["CoLA", "SST-2", "MRPC", "STS-B", "MNLI", "QNLI",
                                                           "RTE"])
    zip_path = submission.write_submission(trained, predictions, tmp_path)
    names = [submission.SUBMISSION_FILES[key] for key in keys]
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == names
        files = {name: archive.read(name).decode().split("\n") for name in names}
    for key, name in zip(keys, names):
        lines = files[name]
        assert lines[0] == "index\tprediction" and lines[-1] == ""
        assert len(lines) - 2 == glue_data.OFFICIAL_ROWS[key] and lines[1].startswith("0\t")
    sts = [line.split("\t")[1] for line in files["STS-B.tsv"][1:-1]]
    assert min(map(float, sts)) == 0.0 and max(map(float, sts)) == 5.0
    assert all(len(score.split(".")[1]) == 3 for score in sts)
    assert {line.split("\t")[1] for line in files["AX.tsv"][1:-1]} == {"contradiction", "entailment",
                                                                       "neutral"}
    assert files["MNLI-m.tsv"][1] == f"0\t{GLUE['MNLI'].labels[predictions['MNLI/test_matched'][0]]}"
    assert submission.left_out_of_submission(predictions) == ["QQP.tsv", "WNLI.tsv"]
    assert "QQP.tsv, WNLI.tsv" in capsys.readouterr().out
    with pytest.raises(ValueError, match="RTE/test: 5 predictions, the test file has 3000 rows"):
        submission.write_submission(trained, {"RTE/test": np.zeros(5, np.int64)}, tmp_path)


def test_custom_task_predictions_are_written_with_their_label_strings(tmp_path, capsys):
    """A custom task's test predictions go to <task>.tsv in the zip; a split it lacks is an error."""
    topic, sentiment = glue_data.load_task_set(str(news_task_set(tmp_path)), tmp_path)
    zip_path = submission.write_submission([topic, sentiment], {"topic/test": np.array([1])},
                                           tmp_path / "out")
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["topic.tsv"]
        assert archive.read("topic.tsv") == b"index\tprediction\n0\tsports\n"
    assert "left out" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="'sentiment/test'.*not a test split of a trained task"):
        submission.write_submission([topic, sentiment], {"sentiment/test": np.array([1])}, tmp_path / "out")


@contextlib.contextmanager
def serve_on_localhost(files: dict[str, bytes], truncated: tuple[str, ...] = ()):
    """An HTTP server on 127.0.0.1 serving `files` by URL path; `truncated` ones stop halfway."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if self.path in truncated else body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def glue_zip(folder: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((SMALL_GLUE / folder).iterdir()):
            archive.write(path, f"{folder}/{path.name}")
    return buffer.getvalue()


def mrpc_sources() -> dict[str, bytes]:
    """The SentEval MSR Paraphrase files and dev ids that the shared MRPC files were built from."""
    def rows(split: str) -> list[str]:
        return (SMALL_GLUE / f"MRPC/{split}.tsv").read_text(encoding="utf-8").split("\n")[:-1]
    train, dev, test = rows("train"), rows("dev"), rows("test")
    senteval_test = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    senteval_test += ["1\t" + row.split("\t",
                                        1)[1] for row in test[1:]]  # the label back in place of the index
    return {"/senteval/senteval_data/msr_paraphrase_train.txt": "\n".join(train + dev[1:]).encode() + b"\n",
            "/senteval/senteval_data/msr_paraphrase_test.txt": "\n".join(senteval_test).encode() + b"\n",
            "/glue/data/mrpc_dev_ids.tsv": "".join("\t".join(r.split("\t")[1:3]) + "\n"
                                                   for r in dev[1:]).encode()}


def sha256_of(files: dict[str, bytes]) -> dict[str, str]:
    """The checksums download_glue checks, for files the test serves itself."""
    return {path.lstrip("/"): hashlib.sha256(body).hexdigest() for path, body in files.items()}


def test_download_fetches_archives_builds_mrpc_and_skips_present_tasks(tmp_path, monkeypatch, capsys):
    """From a local server: CoLA unzips, MRPC is rebuilt byte for byte, AX lands in diagnostic/."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    files = {"/glue/data/CoLA.zip": glue_zip("CoLA"),
             "/glue/data/AX.tsv": (SMALL_GLUE / "diagnostic/diagnostic.tsv").read_bytes()} | mrpc_sources()
    with serve_on_localhost(files) as base_url:
        glue_download.download_glue(tmp_path / "glue", ["CoLA", "MRPC", "AX"], base_url=base_url,
                                checksums=sha256_of(files))
        for relative in ["CoLA/train.tsv", "CoLA/dev.tsv", "CoLA/test.tsv", "MRPC/train.tsv", "MRPC/dev.tsv",
                         "MRPC/test.tsv", "diagnostic/diagnostic.tsv"]:
            got = (tmp_path / "glue" / relative).read_bytes()
            assert got == (SMALL_GLUE / relative).read_bytes(), relative
        assert sorted(p.name for p in (tmp_path / "glue").iterdir()) == ["CoLA", "MRPC", "diagnostic"]
        assert "downloading" in capsys.readouterr().out
        glue_download.download_glue(tmp_path / "glue", ["CoLA"], base_url=base_url)
    assert "CoLA: already in" in capsys.readouterr().out


def test_download_refuses_a_file_that_is_not_the_published_one(tmp_path, monkeypatch):
    """The default checksums are the published sha256s: any other archive (here a rezipped CoLA) is refused,
    nothing is installed, and the data folder the call created is gone again."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    # as Hugging Face datasets and Transformers.jl publish it
    assert glue_download.GLUE_SHA256["glue/data/CoLA.zip"] == \
        "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"
    with serve_on_localhost({"/glue/data/CoLA.zip": glue_zip("CoLA")}) as base_url:
        with pytest.raises(OSError, match="not the published f212fcd8"):
            glue_download.download_glue(tmp_path / "glue", ["CoLA"], base_url=base_url)
    assert not (tmp_path / "glue").exists()


@pytest.mark.parametrize("failure", ["truncated", "missing", "not a zip"])
def test_failed_download_leaves_no_partial_files(tmp_path, monkeypatch, failure):
    """A broken connection, a 404 or a corrupt archive raises and leaves the data folder empty."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    body = b"not a zip file at all" if failure == "not a zip" else glue_zip("RTE")
    files = {} if failure == "missing" else {"/glue/data/RTE.zip": body}
    truncated = ("/glue/data/RTE.zip",) if failure == "truncated" else ()
    with serve_on_localhost(files, truncated) as base_url:
        with pytest.raises(OSError, match="RTE.zip"):
            glue_download.download_glue(tmp_path / "glue", ["RTE"], base_url=base_url,
                                    checksums=sha256_of({"/glue/data/RTE.zip": body}))
    assert not (tmp_path / "glue").exists()  # the folder the download created is removed again
