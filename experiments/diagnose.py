"""Why MTOP starts slowly: what the prompt pool does to the encoder, at initialisation and while training.

    python experiments/diagnose.py --data-dir GLUE --model MINILM --tasks CoLA --shared 0,8,32 \
        --variants after-norm/vocab-pos0,after-norm/vocab --steps 300 --measure-every 50 --out DIR

For each prompt variant (entry/init, as train.py's --prompt-entry/--prompt-init) and number of shared
prompts, the script trains with train.py's own pieces (set_up, make_optimizer, make_sampler, TaskStream,
train_step) and, at step 0 and every --measure-every steps, measures on a fixed sample of dev texts of the
first task (eval mode, no dropout):

    feature_variation   how much a task's pooled prompt feature a_i (Eq. 1) varies across inputs:
                        mean_x |a_i(x) - mean_x a_i| / |mean_x a_i| (the [CLS] output for mode none)
    cls_variation       the same for the text's [CLS] output without prompts (the MT-DNN feature)
    slot_cosine         mean pairwise cosine between the outputs of the prompt slots
    attention           per layer, the share of attention that text queries give prompt keys, and that
                        prompt queries give text keys (averaged over heads, inputs and real tokens)
    text_shift          per layer, |h_text(with prompts) - h_text(without)| / |h_text(without)|
    majority_share      share of the dev texts that get the most common predicted class
    dev                 the task's dev score (all of dev)
    grad_norm           mean gradient norms since the last measurement: the trained task's prompts,
                        the shared prompts, the heads, the encoder
    linear_probe_*      with --linear-probe N: the task's dev score of a logistic-regression probe
                        fitted on N training texts, on the head's input (head_input: the pooled prompt
                        feature, or [CLS] in mode none) and on the text-alone [CLS] (cls_alone)

One JSON file per configuration in --out (a finished one is skipped when the script runs again).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import glue_data  # noqa: E402
import train  # noqa: E402
from support.labelling import predict_encoded  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import commit, machine  # noqa: E402  (experiments/run.py: the code and the machine, as results name them)


@torch.no_grad()
def layer_trace(model, batch, prompts):
    """Each layer's input x (B, S, D), attention probabilities (B, H, S, S) and output, for one pass."""
    captured = []
    hooks = [layer.register_forward_hook(lambda module, args, out: captured.append((module, args[0], args[1],
                                                                                    out)))
             for layer in model.encoder.layers]
    try:
        model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], prompts)
    finally:
        for hook in hooks:
            hook.remove()
    trace = []
    for layer, x, mask, out in captured:
        B, S, D = x.shape
        H = layer.num_heads
        q, k, _ = layer.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, K)
        scores = q @ k.transpose(-2, -1) / (D // H) ** 0.5  # (B, H, S, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        trace.append((x, scores.softmax(-1), out))
    return trace


def variation(features: torch.Tensor) -> float:
    """mean_x |f(x) - mean f| / |mean f| for features (B, D)."""
    centre = features.mean(0)
    return float((features - centre).norm(dim=-1).mean() / centre.norm())


@torch.no_grad()
def measure(model, task, batch, dev, args) -> dict:
    model.eval()
    real = batch["attention_mask"].bool()  # (B, T)
    base = layer_trace(model, batch, None)  # the same encoder without prompts
    result = {"cls_variation": variation(base[-1][2][:, 0])}
    pool = model.prompt_pool()
    if pool is None:  # mode none: the heads read [CLS]
        result["feature_variation"] = result["cls_variation"]
    else:
        P, L, N = len(pool), model.task_prompt_len, len(model.tasks)
        trace = layer_trace(model, batch, pool)
        last = trace[-1][2]  # (B, P+T, D)
        features = last[:, :N * L].unflatten(1, (N, L)).mean(2)  # Eq. (1): (B, N, D)
        result["feature_variation"] = variation(features[:, model.task_index[task.name]])
        slots = F.normalize(last[:, :P], dim=-1)  # (B, P, D)
        cosine = slots @ slots.transpose(1, 2)  # (B, P, P)
        result["slot_cosine"] = float((cosine.sum((1, 2)) - P).mean() / (P * (P - 1))) if P > 1 else 1.0
        text_to_prompt, prompt_to_text, shift = [], [], []
        weight = real[:, None, :, None].float()  # (B, 1, T, 1): real text queries only
        for (x, probs, out), (_, _, out0) in zip(trace, base):
            to_prompts = probs[..., :P].sum(-1)  # (B, H, S): each query's attention on the prompts
            text_to_prompt.append(float((to_prompts[:, :, P:,
                                                    None] * weight).sum() / (weight.sum() * probs.shape[1])))
            prompt_to_text.append(float(1 - to_prompts[:, :, :P].mean()))
            delta = (out[:, P:] - out0).norm(dim=-1)[real] / out0.norm(dim=-1)[real]
            shift.append(float(delta.mean()))
        result |= {"attention_text_to_prompts": text_to_prompt, "attention_prompts_to_text": prompt_to_text,
                   "text_shift": shift}
    if args.linear_probe and task.kind == "classification":
        result |= linear_probes(model, task, args)
    encoded = dev
    predictions = predict_encoded(model, task.name, encoded, None, "cpu", "fp32", args.scale)
    metrics = glue_data.compute_metrics(task, predictions, encoded.labels)
    result["dev"] = glue_data.task_score(task, metrics)
    if task.kind == "classification":
        result["majority_share"] = float(np.bincount(predictions).max() / len(predictions))
    return result


@torch.no_grad()
def features_of(model, task, encoded, rows) -> dict[str, torch.Tensor]:
    """For the texts `rows` (eval mode): the head's input (the pooled prompt feature of Eq. 1, or [CLS] in
    mode none) and the [CLS] output of the same encoder run on the text alone: {name: (n, D)}."""
    model.eval()
    pooled, cls = [], []
    for batch in glue_data.batch_order(encoded.lengths[rows], 64, 0, 0, shuffle=False):
        inputs = glue_data.collate(encoded, rows[batch])
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        alone = model.encode(ids, mask, types, None, rows=slice(0, 1))[:, 0]  # (b, D)
        feature = model.features(ids, mask, types, active_task=task.name)[:, 0]  # Eq. (1): (b, D)
        order = torch.as_tensor(batch)
        pooled.append((order, feature))
        cls.append((order, alone))
    def gather(parts):
        out = torch.empty(len(rows), parts[0][1].shape[-1])
        for order, values in parts:
            out[order] = values
        return out
    return {"head_input": gather(pooled), "cls_alone": gather(cls)}


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-2) -> torch.nn.Linear:
    """A logistic-regression probe (L2-regularised, LBFGS) on standardised features."""
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    return probe


def linear_probes(model, task, args) -> dict[str, float]:
    """What the head's input carries about the labels, against [CLS]: a linear probe fitted on
    --linear-probe training texts, scored (the task's metrics) on all of dev."""
    train_set, dev = args.data[task.name]["train"], args.data[task.name]["dev"][task.dev_splits[0]]
    rows = np.sort(np.random.default_rng(0).permutation(len(train_set))[:args.linear_probe])
    fit, held = features_of(model, task, train_set, rows), features_of(model, task, dev, np.arange(len(dev)))
    y = torch.as_tensor(train_set.labels[rows])
    scores = {}
    for name in fit:
        mean, std = fit[name].mean(0), fit[name].std(0) + 1e-6
        probe = fit_linear_probe((fit[name] - mean) / std, y, task.num_labels)
        predictions = probe((held[name] - mean) / std).argmax(-1).numpy()
        scores[f"linear_probe_{name}"] = glue_data.task_score(
            task, glue_data.compute_metrics(task, predictions, dev.labels))
    return scores


def run(config: dict, options) -> dict:
    flags = ["--data-dir", options.data_dir, "--model", options.model, "--tasks", options.tasks,
             "--cache-dir", options.cache_dir, "--lr", options.lr, "--max-steps", str(options.steps),
             "--seed", str(config["seed"]), "--mode", config["mode"], "--sampler", "proportional",
             "--shared-prompt-len", str(config["shared"]), "--prompt-entry", config["entry"],
             "--prompt-init", config["init"], "--probe-size", "1"]
    args = train.parse_args(flags)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    tasks, data, model, _ = train.set_up(args, 0, 1, "cpu")
    optimizer, lr_schedule = train.make_optimizer(model, args, options.steps)
    sampler = train.make_sampler(args, tasks, data)
    streams = {t.name: train.TaskStream(data[t.name]["train"], data[t.name]["train_idx"], 16, args.seed + i)
               for i, t in enumerate(tasks)}
    task = tasks[0]
    dev = data[task.name]["dev"][task.dev_splits[0]]
    rows = np.random.default_rng(0).permutation(len(dev))[:options.texts]
    batch = glue_data.collate(dev, np.sort(rows))
    options.scale, options.data = data[task.name]["scale"], data

    shared = [model.shared_prompts] if model.shared_prompts is not None else []
    groups = {"task_prompts": [p for p in model.prompt_parameters() if not any(p is s for s in shared)],
              "shared_prompts": shared, "heads": list(model.heads.parameters()),
              "encoder": list(model.encoder.parameters())}
    norms = {g: [] for g in groups}

    def record_gradients(opt, *_):  # runs inside train_step, after backward and clipping, before AdamW
        for group, params in groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norms[group].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    optimizer.register_step_pre_hook(record_gradients)
    points = []
    start = time.perf_counter()
    for step in range(options.steps + 1):
        if step % options.measure_every == 0:
            point = {"step": step, **measure(model, task, batch, dev, options),
                     "grad_norm": {g: float(np.mean(v)) if v else None for g, v in norms.items()}}
            norms = {g: [] for g in groups}
            points.append(point)
            print(f"{config['name']} step {step}: dev {100 * point['dev']:.2f}, feature variation "
                  f"{point['feature_variation']:.3f}, majority {point.get('majority_share', 0):.2f} "
                  f"[{time.perf_counter() - start:.0f}s]", flush=True)
        if step == options.steps:
            break
        model.train()
        name = sampler.choose()
        train.train_step(model, model, optimizer, streams[name].next(), name, data[name]["scale"], "cpu",
                         "fp32",
                         args.max_grad_norm)
        lr_schedule.step()
    return {"config": config, "flags": flags, "points": points, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mtop"))
    parser.add_argument("--tasks", default="CoLA")
    parser.add_argument("--variants", default="after-norm/vocab-pos0,after-norm/vocab",
                        help="entry/init pairs, comma-separated; 'none' for the [CLS] baseline")
    parser.add_argument("--shared", default="0,8,32", help="numbers of shared prompts, comma-separated")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--measure-every", type=int, default=50)
    parser.add_argument("--texts", type=int, default=64, help="dev texts the features are measured on")
    parser.add_argument("--lr", default="1e-4")
    parser.add_argument("--linear-probe", type=int, default=0,
                        help="training texts a linear probe of the head's input and of [CLS] is fitted on "
                             "at each measurement (0: none)")
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for seed in map(int, options.seeds.split(",")):
        for variant in options.variants.split(","):
            if variant == "none":
                configs.append({"mode": "none", "entry": "after-norm", "init": "vocab", "shared": 0,
                                "seed": seed})
                continue
            entry, init = variant.split("/")
            configs += [{"mode": "mtop", "entry": entry, "init": init, "shared": int(s), "seed": seed}
                        for s in options.shared.split(",")]
    for config in configs:
        config["name"] = (f"{options.tasks.replace(',', '+')}-{config['mode']}-{config['entry']}-"
                          f"{config['init']}-S{config['shared']}-seed{config['seed']}")
        path = out / f"{config['name']}.json"
        if path.exists():
            continue
        result = run(config, options) | {"commit": commit(), "machine": machine(gpu=False),
                                          "threads": torch.get_num_threads()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
