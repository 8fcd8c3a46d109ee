"""How long the paper's full run would take: train.py's step timed at ELECTRA-base's shape, extrapolated to
5 epochs of the eight GLUE tasks (section 4.1: batch 16, 4 prompts per task, 32 shared, length 128).

    python experiments/base_step_time.py --glue GLUE_DIR --model MINILM --device cuda --out DIR

The encoder is ELECTRA-base's shape (12 layers, hidden 768, 12 heads, intermediate 3072, vocabulary
30522) with random weights: a step's time does not depend on the weights' values. The batches are
train.py's own (length-bucketed, padded to multiples of 8 on a GPU) from the five GLUE tasks this
project has, tokenized with MiniLM's uncased vocabulary, which is BERT's and ELECTRA's; the model has
eight tasks' prompts and heads (N*L + S = 64 prompt positions), as on all of GLUE. MNLI, QQP and QNLI,
which are not here, have longer texts than the mean of these five: the time is also measured with every
batch padded to 128 tokens, the most a GLUE text takes, as an upper bound. Writes DIR/base_step_time.json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import glue_data  # noqa: E402
import train  # noqa: E402
from electra import Electra, ElectraConfig  # noqa: E402
from mtop import MTOP, PromptConfig  # noqa: E402
from support.system import pad_multiple  # noqa: E402

# Official training rows of the paper's eight GLUE tasks (GLUE; REFERENCE.md).
GLUE_TRAIN_ROWS = {"CoLA": 8551, "SST-2": 67349, "MRPC": 3668, "STS-B": 5749, "QQP": 363846, "MNLI": 392702,
                   "QNLI": 104743, "RTE": 2490}
BASE = dict(vocab_size=30522, embedding_size=768, hidden_size=768, num_hidden_layers=12,
            num_attention_heads=12, intermediate_size=3072)
TINY = dict(vocab_size=30522, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)  # --shape tiny: a check of the script on a CPU


def timed_steps(model, optimizer, batches, device, dtype, pad128: bool) -> list[float]:
    times = []
    for task, batch in batches:
        if pad128:
            batch = {k: F.pad(v, (0, 128 - v.shape[1])) if v.dim() == 2 else v for k, v in batch.items()}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        train.train_step(model, model, optimizer, batch, task, (0.0, 1.0), device, dtype, 1.0)
        times.append(time.perf_counter() - start)  # train_step reads the loss: the GPU has finished
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue", required=True)
    parser.add_argument("--model", required=True, help="a model folder whose vocab.txt tokenizes (MiniLM's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (after 10 warm-up)")
    parser.add_argument("--shape", choices=("base", "tiny"), default="base")
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    names = ["RTE", "MRPC", "STS-B", "CoLA", "SST-2"]
    args = train.parse_args(["--data-dir", options.glue, "--tasks", ",".join(names), "--probe-size", "1"])
    tasks = glue_data.load_task_set("glue", options.glue, names)
    data = train.load_data(args, tasks, glue_data.load_tokenizer(options.model), rank=1)
    streams = {t.name: train.TaskStream(data[t.name]["train"], data[t.name]["train_idx"], 16, 0,
                                        pad_multiple(options.device)) for t in tasks}
    rng = np.random.default_rng(0)
    sizes = np.array([len(data[n]["train_idx"]) for n in names], dtype=float)
    order = rng.choice(names, size=options.steps + 10, p=sizes / sizes.sum())  # proportional sampling
    batches = [(str(name), streams[str(name)].next()) for name in order]
    heads = [(t.name, t.num_labels) for t in tasks] + [("QQP", 2), ("MNLI", 3), ("QNLI", 2)]
    torch.manual_seed(0)
    config = ElectraConfig(**(BASE if options.shape == "base" else TINY))
    result = {"device": torch.cuda.get_device_name() if options.device.startswith("cuda") else "cpu",
              "shape": options.shape, "steps_timed": options.steps, "variants": {}}
    for dtype in options.dtypes.split(","):
        model = MTOP(Electra(config), heads, PromptConfig()).to(options.device).train()
        optimizer, _ = train.make_optimizer(model, args, 10 ** 6)
        for pad128 in (False, True):
            times = timed_steps(model, optimizer, batches, options.device, dtype, pad128)[10:]
            median = statistics.median(times)
            key = f"{dtype}, {'padded to 128' if pad128 else 'bucketed'}"
            result["variants"][key] = {"median_step_s": median, "mean_step_s": statistics.mean(times)}
            print(f"{key}: median step {1000 * median:.1f} ms", flush=True)
        del model, optimizer
    steps = 5 * sum(GLUE_TRAIN_ROWS.values()) // 16
    result["paper_run_steps"] = steps  # 5 epochs of the eight tasks' training rows, batch 16
    for v in result["variants"].values():
        v["paper_run_hours"] = steps * v["median_step_s"] / 3600
    Path(options.out).mkdir(parents=True, exist_ok=True)
    (Path(options.out) / "base_step_time.json").write_text(json.dumps(result, indent=1))
    print(f"the paper's run: {steps} steps; " + "; ".join(
        f"{k}: {v['paper_run_hours']:.1f} h" for k, v in result["variants"].items()), flush=True)


if __name__ == "__main__":
    main()
