"""A result file for a training that finished its last evaluation but was killed before run.py wrote its
JSON: the dev evaluations come from the lines train.py printed ("dev at step N: average ... | TASK x.xx").

    python experiments/recover_result.py \
        experiments/results/gpu-session/logs/gpu-table.prompt-tuning-seed2.txt \
        --plan gpu-table --run prompt-tuning --seed 2 \
        --like experiments/results/gpu-table/prompt-tuning-seed1.json

The printed scores have two decimals (x100), so the recovered ones do too; the steps each task got and
the wall time are not in the printed lines and are left out (null); the flags, commit and machine are
those of --like, a run of the same call with another seed, with the seed changed. "recovered" says all
this in the file, and aggregate.py leaves the missing wall time out of its averages.
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import write_json  # noqa: E402


def evaluations(log: Path) -> list[dict]:
    """Every "dev at step" line of a printed log: step, each task's score and the two averages (0..1)."""
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        match = re.match(r"dev at step (\d+): average ([\d.-]+) \(Table 1's: ([\d.-]+)\) \| (.*)", line)
        if match:
            scores = {name: float(value) / 100 for name, value in
                      (part.rsplit(" ", 1) for part in match.group(4).split(" | "))}
            found.append({"step": int(match.group(1)), "scores": scores, "primary": {},
                          "average": float(match.group(2)) / 100,
                          "paper_average": float(match.group(3)) / 100})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="the training's printed output")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--like", required=True, help="the result file of the same run with another seed")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    options = parser.parse_args()
    like = json.loads(Path(options.like).read_text(encoding="utf-8"))
    evals = evaluations(Path(options.log))
    if not evals:
        raise SystemExit(f"{options.log}: no 'dev at step' line")
    flags = list(like["flags"])
    flags[flags.index("--seed") + 1] = str(options.seed)
    result = {"plan": options.plan, "run": options.run, "seed": options.seed, "single_task": False,
              "flags": flags, "mode": like["mode"], "evals": evals, "final": evals[-1],
              "best": max(evals, key=lambda e: e["average"]), "task_steps": {}, "wall_seconds": None,
              "commit": like["commit"], "machine": like["machine"], "threads": like["threads"],
              "resumed": None,
              "recovered": f"from {options.log}: the training reached its step-{evals[-1]['step']} "
                           "evaluation and was killed before its JSON was written; scores as printed (two "
                           "decimals; Table 1's per-task metrics not printed), steps per task, wall time and "
                           "whether it was resumed unknown; flags, commit and machine of "
                           f"{Path(options.like).name}"}
    path = Path(options.results) / options.plan / f"{options.run}-seed{options.seed}.json"
    if path.exists():
        raise SystemExit(f"{path} exists: nothing to recover")
    write_json(path, result)
    print(f"wrote {path}: average {100 * result['final']['average']:.2f} at step {result['final']['step']}")


if __name__ == "__main__":
    main()
