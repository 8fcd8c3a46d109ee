"""Run a plan of train.py configurations x seeds, as a user would, one JSON result per run.

    python experiments/run.py experiments/plans/ablation-mix.json --glue GLUE_DIR --model MINILM --jobs 2
    python experiments/run.py PLAN --glue DIR --model DIR --dry-run      # list what would run
    python experiments/aggregate.py --glue GLUE_DIR                       # RESULTS.md from the JSON files

A plan is a JSON file:

    {"name": "table", "seeds": [0, 1, 2],
     "common": ["--data-dir", "{glue}", "--model", "{model}", "--tasks", "RTE,MRPC", "--max-steps", "600"],
     "runs": [{"name": "mtdnn", "flags": ["--mode", "none"]},
              {"name": "single", "flags": ["--mode", "none"], "single_task": true}]}

Each (run, seed) is `python train.py <common> <flags> --seed S --output-dir <work>/<plan>/<run>-seed<S>`;
{glue} and {model} are filled from --glue and --model. When train.py ends, the dev evaluations in its
log.jsonl, the steps each task got and the wall time go to <results>/<plan>/<run>-seed<S>.json, and the
model files are deleted (--keep-models keeps them); its log.jsonl and printed output are copied to
<results>/<plan>-logs/, to be committed with the result. A run whose JSON exists is skipped, so the script can
be stopped at any moment and started again: an unfinished run continues from its checkpoint (--resume).

"single_task": one model per task (single-task fine-tuning), each trained on its task alone for the
share of --max-steps that proportional sampling would give it (its training rows over all rows), with
one evaluation at its end; the JSON holds every task's score from its own model.

"seeds" in a run: the plan's seeds this run is trained with (default: all of them).

"script": a run made by another script than train.py, with train.py's flags (baselines/ptuning_v2.py).

"same_as": "<plan>/<run>": this configuration is already run by another plan; nothing is trained and
aggregate.py takes that run's results, after checking that its flags are this run's flags.

--jobs N runs N trainings side by side, each with (CPU cores / N) threads unless --threads says; on a GPU
several small models fit side by side too. The trainings start seed by seed (every run of the first seed,
then of the next), so in a plan stopped early the first seeds are the most complete. A result records
whether any of its trainings was continued from a checkpoint ("resumed").
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import glue_data  # noqa: E402


def machine(gpu: bool = True) -> str:
    """The CPU model and core count, and first the GPU's name where there is one and `gpu` is set."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    name = ""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True,
                               text=True, timeout=30) if gpu else None
        if query and query.returncode == 0:
            name = query.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    cpu = f"{platform.machine()} {model or platform.processor()}, {os.cpu_count()} cores".strip()
    return f"{name}; {cpu}" if name else cpu


def commit() -> str:
    """The code the runs ran: the commit of train.py's repository, '+changes' if its .py files differ.
    MTOP_COMMIT, where set, names it instead: a copy of the tree made elsewhere (a GPU machine's) may carry
    no git, or another commit's git metadata."""
    if os.environ.get("MTOP_COMMIT"):
        return os.environ["MTOP_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flag_value(flags: list[str], name: str, default: str = "") -> str:
    """The last value given for --name in a flag list (argparse keeps the last one too)."""
    values = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]
    return values[-1] if values else default


def train_sizes(flags: list[str]) -> dict[str, int]:
    """Training rows per task, after --max-train-examples, as train.py counts them."""
    tasks = glue_data.load_task_set(flag_value(flags, "--task-set", "glue"), flag_value(flags, "--data-dir"),
                                    [t for t in flag_value(flags, "--tasks").split(",") if t] or None)
    cap = int(flag_value(flags, "--max-train-examples", "0"))
    sizes = {}
    for task in tasks:
        rows = len(glue_data.load_split(task, "train", flag_value(flags, "--data-dir")).labels)
        if flag_value(flags, "--probe-on") == "heldout":
            rows -= min(rows // 10, int(flag_value(flags, "--probe-size", "2000")) or rows // 10)
        sizes[task.name] = min(rows, cap) if cap else rows
    return sizes


class Unit:
    """One train.py process: a run of the plan, or one task's model of a single-task run. `script` is
    train.py, or a run's "script" that wraps it (a baseline: baselines/ptuning_v2.py)."""

    def __init__(self, flags: list[str], folder: Path, script: str = "train.py"):
        self.flags, self.folder, self.process, self.started, self.resumed = flags, folder, None, 0.0, False
        self.script = script

    def command(self) -> list[str]:
        resume = ["--resume"] if (self.folder / "checkpoint.safetensors").exists() else []
        self.resumed |= bool(resume)
        return [sys.executable, str(ROOT / self.script), *self.flags, "--output-dir", str(self.folder),
                *resume]

    def done(self) -> bool:
        return (self.folder / "done.json").exists()


def units_of(plan: dict, run: dict, seed: int, work: Path, fill: dict) -> list[Unit]:
    flags = [f.format(**fill) for f in plan["common"] + run.get("flags", [])] + ["--seed", str(seed),
                                                                                 "--no-test"]
    folder = work / plan["name"] / f"{run['name']}-seed{seed}"
    if not run.get("single_task"):
        return [Unit(flags, folder, run.get("script", "train.py"))]
    sizes = train_sizes(flags)
    total = int(flag_value(flags, "--max-steps"))
    units = []
    for task, size in sizes.items():
        steps = max(1, round(total * size / sum(sizes.values())))
        units.append(Unit(flags + ["--tasks", task, "--max-steps", str(steps), "--eval-every", str(steps)],
                          folder / task))
    return units


def read_log(folder: Path) -> tuple[list[dict], dict[str, int]]:
    """The dev evaluations and the steps per task from a finished run's log.jsonl."""
    evals, steps = [], {}
    for line in (folder / "log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["event"] == "eval":
            evals.append({k: record[k] for k in ("step", "scores", "primary", "average", "paper_average")})
        elif record["event"] == "step":
            steps[record["task"]] = steps.get(record["task"], 0) + 1
    return evals, steps


def result_of(plan: dict, run: dict, seed: int, units: list[Unit], seconds: float, threads: int) -> dict:
    evals, steps = [], {}
    if run.get("single_task"):  # one evaluation per task, each from that task's own model
        final = {"step": 0, "scores": {}, "primary": {}}
        for unit in units:
            unit_evals, unit_steps = read_log(unit.folder)
            last = unit_evals[-1]
            final["scores"] |= last["scores"]
            final["primary"] |= last["primary"]
            final["step"] += last["step"]
            steps |= unit_steps
        final["average"] = glue_data.glue_average(final["scores"])
        final["paper_average"] = glue_data.glue_average(final["primary"])
        evals = [final]
    else:
        evals, steps = read_log(units[0].folder)
    return {"plan": plan["name"], "run": run["name"], "seed": seed,
            "single_task": bool(run.get("single_task")),
            "flags": units[0].flags if len(units) == 1 else [u.flags for u in units],
            "mode": flag_value(units[0].flags, "--mode", "mtop"), "evals": evals, "final": evals[-1],
            "best": max(evals, key=lambda e: e["average"]), "task_steps": steps,
            "wall_seconds": round(seconds, 1), "commit": commit(),
            "threads": threads, "resumed": any(u.resumed for u in units),
            "machine": machine(gpu=flag_value(units[0].flags, "--device", "cuda") != "cpu")}


def unlisted_seeds(plan: dict) -> str:
    """A run's "seeds" that its plan's "seeds" do not list (they would be skipped without a word), as an
    error message; "" when there are none."""
    for run in plan["runs"]:
        if extra := [seed for seed in run.get("seeds", []) if seed not in plan["seeds"]]:
            return (f"run {run['name']!r} names seeds {extra} that the plan's \"seeds\" {plan['seeds']} "
                    "do not list; add them there")
    return ""


def keep_log(unit: Unit, results: Path, work: Path) -> None:
    """A finished training's log.jsonl and printed output, kept beside the results (<plan>-logs/) to be
    committed with them: the name is the unit's folder under the plan's, e.g. mtdnn-seed0 or
    single-seed0-RTE."""
    name = "-".join(unit.folder.relative_to(work).parts[1:])
    logs = results.parent / f"{results.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for source, suffix in (("log.jsonl", ".log.jsonl"), ("stdout.txt", ".stdout.txt")):
        if (unit.folder / source).exists():
            shutil.copyfile(unit.folder / source, logs / f"{name}{suffix}")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the plan's JSON file")
    parser.add_argument("--glue", required=True, help="GLUE folder, fills {glue}")
    parser.add_argument("--model", required=True, help="model folder, fills {model}")
    parser.add_argument("--results", default=str(ROOT / "experiments" / "results"),
                        help="JSON results go here")
    parser.add_argument("--work", default=str(ROOT / "runs" / "experiments"), help="train.py output folders")
    parser.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per training (0: CPU cores / jobs)")
    parser.add_argument("--runs", default="", help="only these runs of the plan (comma-separated names)")
    parser.add_argument("--seeds", default="", help="only these seeds (comma-separated)")
    parser.add_argument("--keep-models", action="store_true", help="keep checkpoints and best models")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    options = parser.parse_args()
    plan = json.loads(Path(options.plan).read_text(encoding="utf-8"))
    if problem := unlisted_seeds(plan):
        parser.error(f"{options.plan}: {problem}")
    fill = {"glue": options.glue, "model": options.model}
    work, results = Path(options.work), Path(options.results) / plan["name"]
    if options.jobs < 1 or options.threads < 0:
        parser.error("--jobs must be at least 1 and --threads at least 0")
    threads = options.threads or max(1, (os.cpu_count() or 1) // options.jobs)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    todo = []  # (run, seed, units, result path)
    for seed in plan["seeds"]:
        for run in plan["runs"]:
            if options.runs and run["name"] not in options.runs.split(","):
                continue
            if options.seeds and str(seed) not in options.seeds.split(","):
                continue
            if seed not in run.get("seeds", plan["seeds"]):  # a run may name fewer seeds than its plan
                continue
            if "same_as" in run:
                if seed == plan["seeds"][0]:
                    print(f"{run['name']}: the runs of {run['same_as']}", flush=True)
                continue
            path = results / f"{run['name']}-seed{seed}.json"
            if not path.exists():
                todo.append((run, seed, units_of(plan, run, seed, work, fill), path))
    print(f"{plan['name']}: {len(todo)} runs to do, {options.jobs} at a time with {threads} threads each",
          flush=True)
    if options.dry_run:
        for run, seed, units, path in todo:
            for unit in units:
                print(" ".join(unit.command()))
        return

    pending = [(item, unit) for item in todo for unit in item[2] if not unit.done()]
    running, started, failed = [], {}, []
    clock = time.perf_counter()
    while pending or running:
        while pending and len(running) < options.jobs:
            item, unit = pending.pop(0)
            unit.folder.mkdir(parents=True, exist_ok=True)
            unit.log = open(unit.folder / "stdout.txt", "a", encoding="utf-8")
            unit.process = subprocess.Popen(unit.command(), stdout=unit.log, stderr=subprocess.STDOUT,
                                            env=env,
                                            cwd=ROOT)
            unit.started = time.perf_counter()
            started.setdefault(id(item), unit.started)
            running.append((item, unit))
            print(f"start {unit.folder.relative_to(work)}", flush=True)
        time.sleep(2)
        for item, unit in list(running):
            if unit.process.poll() is None:
                continue
            running.remove((item, unit))
            unit.log.close()
            seconds = time.perf_counter() - unit.started
            if unit.process.returncode != 0:
                failed.append(unit.folder)
                tail = (unit.folder / "stdout.txt").read_text(encoding="utf-8", errors="replace")[-1500:]
                print(f"FAILED {unit.folder.relative_to(work)} (exit {unit.process.returncode}):\n{tail}",
                      flush=True)
                continue
            write_json(unit.folder / "done.json", {"seconds": seconds})
            keep_log(unit, results, work)
            if not options.keep_models:
                (unit.folder / "checkpoint.safetensors").unlink(missing_ok=True)
                shutil.rmtree(unit.folder / "best", ignore_errors=True)
            run, seed, units, path = item
            if all(u.done() for u in units):
                total = sum(json.loads((u.folder / "done.json").read_text())["seconds"] for u in units)
                result = result_of(plan, run, seed, units, total, threads)
                write_json(path, result)
                left = len(pending) + len(running)
                print(f"done {path.name}: average {100 * result['final']['average']:.2f} in "
                      f"{total / 60:.1f} min; "
                      f"{left} trainings left, {(time.perf_counter() - clock) / 60:.0f} min so far",
                      flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: " + ", ".join(map(str, failed)))


if __name__ == "__main__":
    main()
