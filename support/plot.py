"""training.png: a run's dev scores over steps and the share of steps each task got, from its log.jsonl.
Needs matplotlib, which is not a dependency of the project: without it nothing is drawn, and train.py
says how to draw it later (finish_message, the run's last lines):

    pip install matplotlib && python -m support.plot runs/mtop
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from support.system import log


def plot(out: Path) -> Path | None:
    """Dev scores over steps and how often each task was chosen, in out/training.png; None (nothing
    drawn) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    evals = [r for r in records if r["event"] == "eval"]
    steps = [r for r in records if r["event"] == "step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name in evals[0]["scores"] if evals else []:
        left.plot([r["step"] for r in evals], [100 * r["scores"][name] for r in evals], label=name,
                  marker="o")
    left.set(title="dev score", xlabel="step")
    left.legend()
    counts: dict[str, int] = {}
    for i, r in enumerate(steps, 1):
        counts[r["task"]] = counts.get(r["task"], 0) + 1
        r["share"] = dict(counts)
    for name in counts:
        right.plot([r["step"] for r in steps], [r["share"].get(name, 0) / i for i, r in enumerate(steps, 1)],
                   label=name)
    right.set(title="fraction of steps per task (cumulative)", xlabel="step")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.close(fig)
    return out / "training.png"


def finish_message(out: Path, tasks: list) -> None:
    """The run's last lines: the plot (or how to draw it), the best model and the next command."""
    drawn = plot(out)
    log(f"plot: {drawn}" if drawn else f"no plot: matplotlib is not installed (pip install matplotlib, then "
        f"python -m support.plot {out})")
    columns = "text" if any(len(t.text) == 1 for t in tasks) else ",".join(tasks[0].text)
    log(f"best model: {out / 'best'}\nlabel a corpus with it: python train.py --predict corpus.tsv "
        f"--checkpoint {shlex.quote(str(out / 'best'))} --text-columns {shlex.quote(columns)}")


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "log.jsonl").is_file():
        raise SystemExit("usage: python -m support.plot RUN_FOLDER (a train.py --output-dir, with log.jsonl)")
    drawn = plot(Path(sys.argv[1]))
    print(f"wrote {drawn}" if drawn else "matplotlib is not installed: pip install matplotlib")
