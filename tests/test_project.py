"""The project as a whole: README's examples, the layering of the modules, the experiment driver."""

import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.stats

import train
from conftest import GLUE_ENV, ROOT, SMALL_GLUE, readme_block

# -- the project as a whole: README's examples, the layering, the experiment driver ---------------------

def test_readme_labelling_example_runs_as_written(trained_folder, tmp_path, monkeypatch):
    """README's Python labelling example runs as written against a trained runs/mtop/best folder."""
    (tmp_path / "runs" / "mtop").mkdir(parents=True)
    shutil.copytree(trained_folder, tmp_path / "runs" / "mtop" / "best")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with pytest.warns(UserWarning, match="left out of this input"):
        exec(compile(readme_block("Labeller"), "README.md", "exec"), namespace)
    assert len(namespace["rows"]) == 2 and set(namespace["rows"][0]) == {"kind"}  # the single-text task
    assert namespace["rows"][0]["kind"] in ("no", "yes")
    assert len(namespace["pairs"]) == 1 and set(namespace["pairs"][0]) == {"nli", "sim"}
    assert namespace["pairs"][0]["nli"] in ("no", "yes") and isinstance(namespace["pairs"][0]["sim"], float)


def test_the_six_files_keep_their_layering():
    """Lower files never import higher ones: scheduler and support.files import no project file, electra
    only support.files, glue_data and mtop only what is below them; support/ may import the six files'
    lower layers and its own modules below it; nothing imports train or the tests. Every module of
    support/ is in the table."""
    import ast
    files, system, plot = "support.files", "support.system", "support.plot"
    allowed = {"scheduler": set(), files: set(), system: set(), plot: {system}, "electra": {files},
               "glue_data": {files, "support.tokenizer"}, "support.tokenizer": {files},
               "mtop": {"electra", files},
               "support.glue_download": {"glue_data", files},
               "support.checks": {"glue_data", "electra", "mtop", "support.glue_download", files, system},
               "support.run_state": {"mtop", files, system},
               "support.submission": {"glue_data", "mtop", files, "support.labelling", system},
               "support.labelling": {"glue_data", "mtop", system},
               "support.corpus": {"glue_data", "support.checks", "support.labelling", files, system},
               "train": {"electra", "glue_data", "mtop", "scheduler", "support.checks", "support.labelling",
                         "support.corpus", plot, "support.run_state", "support.submission", system}}
    modules = {p.stem for p in ROOT.glob("*.py")} | {f"support.{p.stem}"
                                                     for p in (ROOT / "support").glob("*.py")}
    assert modules - {"support.__init__", "test_mtop", "conftest"} == set(allowed), "a module is missing"
    for name, may in allowed.items():
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node,
                                                                        ast.Import) for alias in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        project = {m for m in imported if m in modules or m == "support"}
        assert project <= may, (name, project - may)


def load_aggregate():
    spec = importlib.util.spec_from_file_location("aggregate", ROOT / "experiments" / "aggregate.py")
    aggregate = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec.loader.exec_module(aggregate)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return aggregate


def test_results_intervals_use_students_t_quantiles():
    """aggregate.py's table of 95% t quantiles (for the intervals RESULTS.md states) is scipy's."""
    for df, quantile in load_aggregate().T975.items():
        assert quantile == pytest.approx(scipy.stats.t.ppf(0.975, df), abs=1e-3)


def test_many_label_statistics_match_scipy_and_a_hand_count(tmp_path, monkeypatch):
    """Section 8's numbers (aggregate.many_labels): each run's mean over tasks with its spread, lowest and
    highest seed; the seed-paired difference of two runs with scipy's paired t and 95% interval; in how
    many seeds one run is ahead, counted by hand. Seeds pair by number: b lacks a's seed 0, and the files
    sort by name (seed10 before seed2), so pairing by position would pair the wrong runs."""
    aggregate = load_aggregate()
    monkeypatch.setattr(aggregate, "RESULTS", tmp_path)
    rng = np.random.default_rng(0)
    seeds = {"a": [0, 1, 2, 3, 10], "b": [1, 2, 3, 10]}
    scores = {run: {seed: rng.uniform(0, 1, 3) for seed in seeds[run]} for run in seeds}  # seed: (tasks,)
    (tmp_path / "p").mkdir()
    for run, table in scores.items():
        for seed in seeds[run]:
            result = {"run": run, "seed": seed, "plan": "p", "wall_seconds": 60.0, "machine": "m",
                      "commit": "c", "flags": ["--max-steps", "10"],
                      "final": {"scores": dict(zip("xyz", table[seed]))}}
            (tmp_path / "p" / f"{run}-seed{seed}.json").write_text(json.dumps(result))
    values = {}
    aggregate.many_labels("p", values, frequent=2)
    means = {run: np.array([table[seed].mean() for seed in seeds[run]]) for run, table in scores.items()}
    diff = np.array([scores["a"][seed].mean() - scores["b"][seed].mean() for seed in seeds["b"]])
    low, high = scipy.stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=scipy.stats.sem(diff))
    def pct(x):
        return f"{100 * x:.1f}"

    assert values["p.a.minus.b"] == pct(diff.mean())
    assert (values["p.a.minus.b.low"], values["p.a.minus.b.high"]) == (pct(low), pct(high))
    paired = [[scores[run][seed].mean() for seed in seeds["b"]] for run in ("a", "b")]
    assert values["p.a.minus.b.t"] == f"{scipy.stats.ttest_rel(*paired).statistic:.1f}"
    assert values["p.a.minus.b.ahead"] == f"{sum(d > 0 for d in diff)} of 4"
    assert values["p.b.minus.a.ahead"] == f"{sum(d < 0 for d in diff)} of 4"
    a = means["a"]
    assert (values["p.a.mean"], values["p.a.mean.sd"]) == (pct(a.mean()), pct(a.std(ddof=1)))
    assert (values["p.a.mean.min"], values["p.a.mean.max"]) == (pct(a.min()), pct(a.max()))
    assert values["p.a.rare"] == pct(np.mean([scores["a"][seed][2] for seed in seeds["a"]]))
    assert values["p.a.frequent.min"] == pct(min(scores["a"][seed][:2].mean() for seed in seeds["a"]))
    assert values["p.b.learned"] == "3.0"  # uniform(0, 1) scores: every task above 0 in every seed


@pytest.mark.skipif(not os.environ.get(GLUE_ENV), reason=f"set {GLUE_ENV} to the GLUE folder")
def test_results_md_regenerates_byte_for_byte_from_the_committed_results(tmp_path):
    """RESULTS.md is what experiments/aggregate.py writes from the template and the committed result files
    (figures are not drawn here: matplotlib is kept out)."""
    script = ("import os, runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
              "sys.path.insert(0, os.path.dirname(sys.argv[0])); "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, "-c", script, str(ROOT / "experiments" / "aggregate.py"), "--glue",
                    os.environ[GLUE_ENV], "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    assert out.read_bytes() == (ROOT / "RESULTS.md").read_bytes()


def test_experiment_driver_starts_seed_by_seed_and_skips_finished_runs(tmp_path, monkeypatch):
    """experiments/run.py --dry-run lists the trainings of a plan: every run of the first seed before
    any of the next, none for a run whose JSON result exists or that borrows another plan's runs, each
    with its seed and its own output folder; --threads sets the trainings' thread count and MTOP_COMMIT
    names the code in the results."""
    plan = {"name": "p", "seeds": [0, 1], "common": ["--data-dir", "{glue}", "--model", "{model}"],
            "runs": [{"name": "a", "flags": ["--mode", "none"]}, {"name": "b", "flags": ["--mode", "mtop"]},
                     {"name": "c", "same_as": "other/x"}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "results" / "p").mkdir(parents=True)
    (tmp_path / "results" / "p" / "b-seed1.json").write_text("{}")
    script = ROOT / "experiments" / "run.py"
    listed = subprocess.run([sys.executable, str(script), str(tmp_path / "plan.json"), "--glue", "G",
                             "--model", "M",
                             "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
                             "--jobs", "2",
                             "--threads", "3", "--dry-run"], capture_output=True, text=True,
                            check=True).stdout
    commands = [line.split() for line in listed.splitlines() if "train.py" in line]
    assert [(c[c.index("--seed") + 1], c[c.index("--output-dir") + 1]) for c in commands] == [
        ("0", str(tmp_path / "work" / "p" / "a-seed0")), ("0", str(tmp_path / "work" / "p" / "b-seed0")),
        ("1", str(tmp_path / "work" / "p" / "a-seed1"))]
    assert all(c[c.index("--data-dir") + 1] == "G" and c[c.index("--model") + 1] == "M" for c in commands)
    assert "2 at a time with 3 threads each" in listed and "c: the runs of other/x" in listed
    plan["runs"][0]["seeds"] = [1, 5]  # seed 5 is not the plan's: refused, not skipped
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    refused = subprocess.run([sys.executable, str(script), str(tmp_path / "plan.json"), "--glue", "G",
                              "--model", "M", "--dry-run"], capture_output=True, text=True)
    assert refused.returncode == 2 and "run 'a' names seeds [5]" in refused.stderr, refused.stderr
    spec = importlib.util.spec_from_file_location("experiments_run", script)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    monkeypatch.setenv("MTOP_COMMIT", "abc1234")
    assert run.commit() == "abc1234"
    monkeypatch.delenv("MTOP_COMMIT")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True,
                          text=True)
    if head.returncode == 0:  # a git checkout: the commit is git's, with +changes where .py files differ
        assert run.commit().split("+")[0] == head.stdout.strip()
    folder = tmp_path / "work" / "p" / "a-seed0"  # a finished training's log goes beside the results
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text('{"event": "step"}\n')
    (folder / "stdout.txt").write_text("done\n")
    run.keep_log(run.Unit([], folder), tmp_path / "results" / "p", tmp_path / "work")
    logs = tmp_path / "results" / "p-logs"
    assert (logs / "a-seed0.log.jsonl").read_text() == '{"event": "step"}\n'
    assert (logs / "a-seed0.stdout.txt").read_text() == "done\n"


def line_kind(line: str) -> str:
    """What a line of train.py's output says, without its numbers and names (for comparing outputs)."""
    kinds = [("labels", r"^\S+: (\d+ labels|regression on)"), ("rows", r"^\S+: \d+ train, "),
             ("training", r"^training \d+ tasks"), ("probing", r"^probing \d+ rows"),
             ("probe", r"^probe at step"), ("step", r"^step \d+/"), ("evaluating", r"^evaluating at step"),
             ("dev", r"^dev at step"), ("one class", r"^warning: one class"), ("best", r"^best dev average"),
             ("plot", r"^(plot|no plot)"), ("best model", r"^best model: "),
             ("next", r"^label a corpus with it")]
    return next((kind for kind, pattern in kinds if re.match(pattern, line)), f"other: {line[:40]}")


def test_readme_quick_start_prints_what_its_committed_output_shows(tiny_model, token_cache, tmp_path, capsys):
    """README's quick-start command, run on a tiny model and small GLUE files with fewer steps, prints the
    same kinds of lines in the same order as the committed output of the real run
    (experiments/results/quick-start/stdout.txt), and the README's excerpt is in that output."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.DOTALL).group(1)
    command = block[block.index("python train.py"):].replace("\\\n", " ").split()[2:]
    committed = (ROOT / "experiments/results/quick-start/stdout.txt").read_text().splitlines()
    smaller = {"--max-steps": "12", "--interval": "2", "--eval-every": "6", "--probe-size": "8",
               "--max-train-examples": "24"}
    argv = [smaller.get(command[i - 1], a) if i else a for i, a in enumerate(command)]
    argv = [str(tiny_model) if a == "$M" else a for a in argv]
    train.main(argv + ["--data-dir", str(SMALL_GLUE), "--cache-dir", str(token_cache), "--output-dir",
                       str(tmp_path / "quick"), "--log-every", "3"])
    printed = capsys.readouterr().out.splitlines()
    first_seen = lambda lines: list(dict.fromkeys(line_kind(line) for line in lines))  # noqa: E731
    expected = [k for k in first_seen(committed) if k != "one class"]  # a tiny model may warn, or not
    assert [k for k in first_seen(printed) if k != "one class"] == expected
    excerpt = re.search(r"## Quick start.*?```bash.*?```.*?```\n(.*?)```", readme, re.DOTALL).group(1)
    for line in excerpt.splitlines():
        assert line.replace("runs/quick", "/tmp/qs3") in committed, line


def test_pip_install_makes_the_code_importable_from_any_folder(tmp_path):
    """pyproject.toml builds (pip, as `pip install -e .` does) a package of the five modules and support/,
    with requirements.txt's runtime dependencies: installed elsewhere, `from train import Labeller` works
    from any folder."""
    text = (ROOT / "pyproject.toml").read_text()
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = json.loads(re.search(r"^dependencies = (\[.*\])$", text, re.M).group(1))
    assert listed == [r for r in required if r]
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "experiments", "benchmarks",
                                                                  "tests", "glue_data", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                            str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("mtop-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        names = set(z.namelist())
    assert {"electra.py", "glue_data.py", "mtop.py", "scheduler.py", "train.py", "support/corpus.py"} <= names
    code = "from train import Labeller; import train; print(train.__file__)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert found.returncode == 0 and found.stdout.strip() == str(tmp_path / "site" / "train.py"), found.stderr
