"""Inference cost of each compared method: label every dev text of the task mix with all of its tasks.

    python experiments/inference_cost.py --glue GLUE_DIR --model MINILM --out experiments/results/inference

The methods of the results table, as models of the same architecture (the cost does not depend on the
trained values): single-task (one [CLS] model per task: N passes), MT-DNN (mode none: one pass), prompt
tuning (mode separate: N passes), concat and stopgrad (N*L prompts: one pass), MTOP (N*L + S prompts: one
pass). Each labels the same dev texts (of all tasks, pairs as pairs) with all N tasks, in batches of 64,
through MTOP.forward with active_task=None, timed in interleaved rounds in one process; encoder passes
are counted. Writes inference.json. --device cuda times it on a GPU (synchronised before each clock read),
--dtype bf16 under autocast.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import glue_data  # noqa: E402
from electra import Electra  # noqa: E402
from mtop import MTOP, PromptConfig  # noqa: E402
from run import machine  # noqa: E402  (experiments/run.py: the CPU model and the GPU, if any)

METHODS = {"single": ("none", 0), "mtdnn": ("none", 0), "prompt-tuning": ("separate", 0), "concat": ("concat",
                                                                                                     0),
           "stopgrad": ("stopgrad", 0), "mtop": ("mtop", 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", default="RTE,MRPC,STS-B,CoLA,SST-2")
    parser.add_argument("--texts", type=int, default=1024,
                        help="dev texts labelled per round (a seeded sample)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    tasks = glue_data.load_task_set("glue", options.glue, options.tasks.split(","))
    tokenizer = glue_data.load_tokenizer(options.model)
    encoded = []
    for task in tasks:  # every dev text of the mix, each as its task gives it (single or pair)
        examples = glue_data.load_split(task, "dev", options.glue)
        encoded.append(glue_data.encode(tokenizer, examples.text_a, examples.text_b, 128))
    ids = [(e, i) for e in encoded for i in range(len(e))]
    pick = np.random.default_rng(0).permutation(len(ids))[:options.texts]
    texts = [ids[i] for i in pick]
    # One Encoded for the sample: concatenate the picked examples.
    parts = [(e.ids[e.offsets[i]:e.offsets[i + 1]],
              e.type_ids[e.offsets[i]:e.offsets[i + 1]]) for e, i in texts]
    offsets = np.concatenate([[0], np.cumsum([len(p[0]) for p in parts])])
    sample = glue_data.Encoded(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                               offsets, None)
    device = torch.device(options.device)
    multiple = 8 if device.type == "cuda" else 1  # as train.py pads on GPUs
    batches = [{k: v.to(device) for k, v in glue_data.collate(sample, b, multiple=multiple).items()}
               for b in glue_data.batch_order(sample.lengths, 64, 0, 0, shuffle=False)]
    bf16 = options.dtype == "bf16"
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else contextlib.nullcontext

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    heads = [(t.name, t.num_labels) for t in tasks]
    models, passes = {}, {}
    for name, (mode, shared) in METHODS.items():
        torch.manual_seed(0)
        copies = len(tasks) if name == "single" else 1  # single-task: one model per task
        prompts = PromptConfig(mode, task_prompt_len=4, shared_prompt_len=shared)
        models[name] = [MTOP(Electra.from_pretrained(options.model), heads if copies == 1 else [heads[k]],
                             prompts).to(device).eval() for k in range(copies)]
        passes[name] = 0
        for model in models[name]:
            encode = model.encoder.encode

            def counting(*args, _encode=encode, _name=name, **kwargs):
                passes[_name] += 1
                return _encode(*args, **kwargs)

            model.encoder.encode = counting
    seconds = {name: 0.0 for name in METHODS}
    with torch.no_grad(), autocast():
        for name in METHODS:  # warm-up
            for model in models[name]:
                model(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["token_type_ids"])
        warm = dict(passes)  # the warm-up's passes
        for _ in range(options.rounds):
            for name in METHODS:
                sync()
                start = time.perf_counter()
                for batch in batches:
                    for model in models[name]:
                        model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                sync()
                seconds[name] += time.perf_counter() - start
    documents = len(texts) * options.rounds
    result = {"machine": machine(gpu=device.type == "cuda"), "device": options.device, "dtype": options.dtype,
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "texts": len(texts), "rounds": options.rounds,
              "tasks": options.tasks,
              "methods": {name: {"documents_per_second": documents / seconds[name],
                                 # each pass encodes a whole batch: per document it is passes / batches
                                 "encoder_passes_per_document":
                                     (passes[name] - warm[name]) / (len(batches) * options.rounds)}
                          for name in METHODS}}
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(result, indent=1))
    for name, m in result["methods"].items():
        print(f"{name}: {m['documents_per_second']:.1f} documents/s, "
              f"{m['encoder_passes_per_document']:.0f} encoder passes per document")


if __name__ == "__main__":
    main()
