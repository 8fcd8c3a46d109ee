"""Write RESULTS.md and its figures from the experiments' JSON files alone.

    python experiments/aggregate.py --glue GLUE_DIR   # experiments/results/ -> RESULTS.md and figures/

RESULTS.md is experiments/RESULTS.template.md with every {{name}} filled in: {{table:<plan>}} is the
results table of a plan (mean and standard deviation over seeds of each task's dev score), {{diag:...}} the
diagnosis tables, {{steptime:<folder>}} the step times at ELECTRA-base's shape (base_step_time.py), and every
other {{key}} one number computed here (the list: --keys). The numbers come
from the JSON files; only the majority-class row and the steps of one pass are read from the GLUE files
(--glue). A key the template names but the files do not give stops the script: no number in
RESULTS.md is typed by hand.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import glue_data  # noqa: E402
from run import flag_value as flag  # noqa: E402  (experiments/run.py: the last value of --name)

RESULTS, FIGURES = ROOT / "experiments" / "results", ROOT / "experiments" / "figures"
TASK_ORDER = ["CoLA", "SST-2", "MRPC", "STS-B", "RTE"]
LABELS = {  # how the runs are named in the tables
    "single": "single-task (one model per task)", "mtdnn": "MT-DNN (`--mode none`)",
    "mtop-plr1e-3": "MTOP, `--prompt-lr 1e-3`", "mtop-plr1e-2": "MTOP, `--prompt-lr 1e-2`",
    "mtop-plr1e-1": "MTOP, `--prompt-lr 1e-1`", "cls": "[CLS] head (`--mode none`)",
    "L1": "MTOP, L = 1", "L2": "MTOP, L = 2", "L4": "MTOP, L = 4 (the paper's)", "L8": "MTOP, L = 8",
    "prompt-tuning": "prompt tuning (`--mode separate`)", "concat": "concat (Fig. 1b)",
    "stopgrad": "stopgrad (Fig. 1c)",
    "mtop-prop": "MTOP w/o DTS (proportional)", "mtop-dts": "MTOP, DTS, probes on dev",
    "mtop-dts-heldout": "MTOP, DTS, probes on held-out train", "mtop": "MTOP (32 shared prompts)",
    "after-norm.vocab-pos0": "MTOP, prompts start as tokens at position 0 (`vocab-pos0`, first version)",
    "after-norm.vocab": "MTOP, prompts start as tokens without a position (`vocab`)",
    "after-norm.random": "MTOP, random prompts (`random`, default)",
    "input.vocab": "MTOP, `--prompt-entry input`",
    "input-positions.vocab": "MTOP, `--prompt-entry input-positions`", "after-norm.vocab.S8": "MTOP, S = 8",
    "mtop-s8": "MTOP, S = 8", "mtop-dts-alpha1": "MTOP, DTS with alpha = 1",
    "mtop-meancls": "MTOP, heads also read [CLS] (`--pooling mean+cls`, ours)",
    "mtop-hlr1e-3": "MTOP, `--head-lr 1e-3` (ours)", "mtop-small": "MTOP, small pool (L = 1, S = 8)",
    "ptuning-v2": "P-Tuning v2 (deep prompts, one pass per task)",
    "mtop-s20": "MTOP, S = 20 (the paper's 4 per task)",
    "meancls-s8": "MTOP, S = 8, `--pooling mean+cls`", "meancls-s0": "MTOP, S = 0, `--pooling mean+cls`",
    "mtop-s32-check": "MTOP (S = 32) again with this plan's code",
}


# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables; a test checks them against
# scipy), for the intervals of differences (10 stands for 10 and more: a little wider than needed).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
DTS_ONLY = {"interval", "probe_size", "gamma", "c", "reward", "share", "fixed_alpha"}
PROMPTS_ONLY = {"prompt_entry", "prompt_init", "task_prompt_len", "shared_prompt_len", "prompt_lr", "pooling"}


def same_config(expected: list[str], ran: list[str]) -> bool:
    """Whether a run made for another plan ran this plan's configuration: train.py's parsed arguments
    agree except the seed, the folders, and the scheduler's own flags when the sampler is not DTS
    (nothing else reads them), and the prompt flags in mode none, which has no prompts (so a run
    that left them at a default that has changed since still matches). {glue} and {model} are filled
    with the folders the run used."""
    import train  # here, not at the top: it imports torch, which the rest of this script does not need
    ran_args = vars(train.parse_args(ran))
    fill = {"glue": ran_args["data_dir"], "model": ran_args["model"]}
    want = vars(train.parse_args([f.format(**fill) for f in expected]))
    ignore = {"seed", "no_test", "output_dir", "resume", "argv"} | (DTS_ONLY if want["sampler"] != "dts"
                                                                      else set())
    ignore |= PROMPTS_ONLY if want["mode"] == "none" else set()
    return all(want[k] == ran_args[k] for k in want if k not in ignore)


def load(plan: str) -> dict[str, list[dict]]:
    """{run name: [result of each seed]} in the plan's order. A run of the plan with "same_as":
    "<plan>/<run>" takes that run's results, after checking it ran the same configuration."""
    runs: dict[str, list[dict]] = {}
    for path in sorted((RESULTS / plan).glob("*.json"), key=lambda p: (p.stem.rsplit("-seed", 1)[0], p.stem)):
        result = json.loads(path.read_text())
        runs.setdefault(result["run"], []).append(result)
    plan_file = ROOT / "experiments" / "plans" / f"{plan}.json"
    if plan_file.exists():
        spec = json.loads(plan_file.read_text())
        for run in spec["runs"]:
            if "same_as" not in run:
                continue
            other_plan, other_run = run["same_as"].split("/")
            borrowed = load(other_plan).get(other_run, [])
            expected = spec["common"] + run.get("flags", [])
            for result in borrowed:
                if not same_config(expected, result["flags"]):
                    raise SystemExit(f"{plan_file}: run {run['name']!r} says it is {run['same_as']}, but "
                                     f"{other_plan}/{other_run}-seed{result['seed']} ran other flags")
            runs[run["name"]] = borrowed
        runs = {r["name"]: runs[r["name"]] for r in spec["runs"] if runs.get(r["name"])}
    return runs


def mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def majority_levels(glue: Path, tasks: list[str]) -> dict[str, float]:
    """Each task's dev score when every text gets the train majority class (regression: the train mean,
    whose correlations are undefined and count as 0)."""
    levels = {}
    for name in tasks:
        task = glue_data.GLUE_TASKS[name]
        if task.kind == "regression":
            levels[name] = 0.0
            continue
        train, dev = (glue_data.load_split(task, split, glue) for split in ("train", "dev"))
        majority = np.bincount(train.labels[train.labelled]).argmax()
        labels = dev.labels[dev.labelled]
        levels[name] = glue_data.task_score(task, glue_data.compute_metrics(task, np.full(len(labels),
                                                                                          majority), labels))
    return levels


def plan_table(plan: str, values: dict, majority: dict[str, float], glue: Path) -> str:
    runs = load(plan)
    if not runs:
        raise SystemExit(f"no results for plan {plan!r} in {RESULTS / plan}")
    tasks = [t for t in TASK_ORDER if t in next(iter(runs.values()))[0]["final"]["scores"]]
    lines = ["| run | " + " | ".join(tasks) + " | GLUE avg | Table 1 avg | seeds | minutes per run |",
             "|---|" + "---|" * (len(tasks) + 4)]
    lines.append("| majority class (no skill) | " + " | ".join(f"{100 * majority[t]:.1f}" for t in tasks)
                 + " | | | | |")
    for name, results in runs.items():
        cells = []
        for task in tasks:
            scores = [r["final"]["scores"][task] for r in results]
            cells.append(fmt(scores))
            values[f"{plan}.{name}.{task}"] = f"{100 * np.mean(scores):.1f}"
            values[f"{plan}.{name}.{task}.sd"] = f"{100 * mean_sd(scores)[1]:.1f}"
            values[f"{plan}.{name}.{task}.min"] = f"{100 * min(scores):.1f}"
            values[f"{plan}.{name}.{task}.max"] = f"{100 * max(scores):.1f}"
            values[f"{plan}.{name}.{task}.above5"] = f"{sum(s > 0.05 for s in scores)} of {len(scores)}"
            steps = [r["task_steps"].get(task, 0) for r in results if r["task_steps"]] or [0]  # recovered: {}
            values[f"{plan}.{name}.{task}.steps"] = f"{np.mean(steps):.0f}"
            values[f"{plan}.{name}.{task}.steps.min"] = str(min(steps))
            values[f"{plan}.{name}.{task}.steps.max"] = str(max(steps))
        for key in ("average", "paper_average"):
            scores = [r["final"][key] for r in results]
            cells.append(fmt(scores))
            mean, sd = mean_sd(scores)
            values[f"{plan}.{name}.{key}"] = f"{100 * mean:.1f}"
            values[f"{plan}.{name}.{key}.sd"] = f"{100 * sd:.1f}"
            values[f"{plan}.{name}.{key}.min"] = f"{100 * min(scores):.1f}"
            values[f"{plan}.{name}.{key}.max"] = f"{100 * max(scores):.1f}"
        for r in results:  # each seed's average and scores, for paired comparisons (one seed: one data order)
            values[f"{plan}.{name}.seed{r['seed']}.average"] = f"{100 * r['final']['average']:.1f}"
            for task in tasks:
                values[f"{plan}.{name}.seed{r['seed']}.{task}"] = f"{100 * r['final']['scores'][task]:.1f}"
        minutes = np.mean([r["wall_seconds"] for r in results if r["wall_seconds"] is not None]) / 60
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells)
                     + f" | {len(results)} | {minutes:.1f} |")
        values[f"{plan}.{name}.seeds"] = str(len(results))
    for name, results in runs.items():  # differences of the GLUE averages' means, for the prose
        for other, other_results in runs.items():
            mine, theirs = ([r["final"]["average"] for r in rs] for rs in (results, other_results))
            gap = np.mean(mine) - np.mean(theirs)
            values[f"{plan}.{name}.minus.{other}"] = f"{100 * gap:.1f}"
            # Welch's standard error of the gap, and the gap in those units (needs 2 seeds on each side)
            if len(mine) > 1 and len(theirs) > 1:
                a, b = np.var(mine, ddof=1) / len(mine), np.var(theirs, ddof=1) / len(theirs)
                se = np.sqrt(a + b)
                values[f"{plan}.{name}.minus.{other}.se"] = f"{100 * se:.1f}"
                values[f"{plan}.{name}.minus.{other}.t"] = f"{gap / se:.1f}" if se > 0 else "inf"
                # Welch's 95% interval, with the degrees of freedom rounded down (a little wider)
                df = (a + b) ** 2 / (a ** 2 / (len(mine) - 1) + b ** 2 / (len(theirs) - 1)) if se > 0 else 1
                half = T975[min(10, max(1, int(df)))] * se
                verdict = "significant at the 5% level" if abs(gap) > half else "not significant"
                values[f"{plan}.{name}.minus.{other}.verdict"] = verdict
                values[f"{plan}.{name}.minus.{other}.low"] = f"{100 * (gap - half):.1f}"
                values[f"{plan}.{name}.minus.{other}.high"] = f"{100 * (gap + half):.1f}"
            paired = [a["final"]["average"] - b["final"]["average"] for a in results for b in other_results
                      if a["seed"] == b["seed"]]
            if len(paired) > 1 and np.std(paired) > 0:  # one seed's runs share the data order: paired t
                t = np.mean(paired) / (np.std(paired, ddof=1) / np.sqrt(len(paired)))
                values[f"{plan}.{name}.minus.{other}.paired_t"] = f"{t:.1f}"
                values[f"{plan}.{name}.minus.{other}.paired"] = f"{100 * np.mean(paired):.1f}"
                values[f"{plan}.{name}.minus.{other}.paired_df"] = str(len(paired) - 1)
                half = T975[min(10, len(paired) - 1)] * np.std(paired, ddof=1) / np.sqrt(len(paired))
                values[f"{plan}.{name}.minus.{other}.paired_low"] = f"{100 * (np.mean(paired) - half):.1f}"
                values[f"{plan}.{name}.minus.{other}.paired_high"] = f"{100 * (np.mean(paired) + half):.1f}"
                ahead = sum(d > 0 for d in paired)
                values[f"{plan}.{name}.minus.{other}.ahead"] = f"{ahead} of {len(paired)}"
                # the seeds from 2 on alone: those a plan added after a choice made on seeds 0 and 1
                later = [a["final"]["average"] - b["final"]["average"] for a in results for b in other_results
                         if a["seed"] == b["seed"] >= 2]
                if len(later) > 1 and np.std(later) > 0:
                    t = np.mean(later) / (np.std(later, ddof=1) / np.sqrt(len(later)))
                    values[f"{plan}.{name}.minus.{other}.from2"] = f"{100 * np.mean(later):.1f}"
                    values[f"{plan}.{name}.minus.{other}.from2_t"] = f"{t:.1f}"
                    values[f"{plan}.{name}.minus.{other}.from2_n"] = str(len(later))
    # The plan's budget from a run trained as one model (a single-task run holds one flag list per task,
    # each with that task's share of the steps).
    flat = [r[0]["flags"] for r in runs.values() if not isinstance(r[0]["flags"][0], list)]
    first_flags = flat[0] if flat else next(iter(runs.values()))[0]["flags"][0]
    values[f"{plan}.steps"] = flag(first_flags, "--max-steps")
    # one pass over the (capped) training sets, in steps of the batch size
    cap = int(flag(first_flags, "--max-train-examples") or 0)
    rows = [len(glue_data.load_split(glue_data.GLUE_TASKS[t], "train", glue)) for t in tasks]
    values[f"{plan}.epoch_steps"] = f"{sum(min(r, cap) if cap else r for r in rows) // 16:,}"
    summarise(plan, runs, values)
    return "\n".join(lines)


def summarise(plan: str, runs: dict[str, list[dict]], values: dict) -> None:
    """The plan's own runs (not those borrowed with same_as): their count, hours, machine and commits."""
    own = [r for rs in runs.values() for r in rs if r["plan"] == plan]
    first = (own or next(iter(runs.values())))[0]
    values[f"{plan}.runs"] = str(len(own))
    values[f"{plan}.hours"] = f"{sum(r['wall_seconds'] or 0 for r in own) / 3600:.1f}"  # recovered: None
    values[f"{plan}.machine"] = first["machine"]
    values[f"{plan}.commit"] = ", ".join(sorted({r["commit"] for r in own} or {first["commit"]}))


def curves(plan: str, values: dict) -> str:
    """Dev average against step, mean over seeds: a table and figures/<plan>.png."""
    runs = load(plan)
    if not runs:
        raise SystemExit(f"no results for plan {plan!r} in {RESULTS / plan}")
    steps = sorted({e["step"] for results in runs.values() for r in results for e in r["evals"]})
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    series = {}
    for name, results in runs.items():
        row = []
        for step in steps:
            found = [e["average"] for r in results for e in r["evals"] if e["step"] == step]
            row.append(fmt(found) if found else "")
            if found:
                series.setdefault(name, []).append((step, float(np.mean(found))))
                values[f"{plan}.{name}.step{step}"] = f"{100 * np.mean(found):.1f}"
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(row) + " |")
    for name in series:  # gaps between the runs' means at each step, for the prose
        for other in series:
            theirs = dict(series[other])
            for step, value in series[name]:
                if step in theirs:
                    values[f"{plan}.{name}.minus.{other}.step{step}"] = f"{100 * (value - theirs[step]):.1f}"
    # Each task's dev score at the last evaluation, and the steps each task got.
    last = steps[-1]
    lines += ["", f"Each task at step {last} (the steps each task got in brackets):", "",
              "| run | " + " | ".join(TASK_ORDER) + " |", "|---|" + "---|" * len(TASK_ORDER)]
    at_last = {}
    for name, results in runs.items():
        cells = []
        for task in TASK_ORDER:
            found = [e["scores"][task] for r in results for e in r["evals"] if e["step"] == last
                     and task in e["scores"]]
            steps_got = [r["task_steps"].get(task, 0) for r in results]
            cells.append(f"{fmt(found)} ({np.mean(steps_got):.0f})" if found else "")
            values[f"{plan}.{name}.{task}.steps"] = f"{np.mean(steps_got):.0f}"
            if found:
                at_last[name, task] = float(np.mean(found))
                values[f"{plan}.{name}.step{last}.{task}"] = f"{100 * at_last[name, task]:.1f}"
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    for name in runs:  # per-task gaps at the last evaluation
        for other in runs:
            for task in TASK_ORDER:
                if (name, task) in at_last and (other, task) in at_last:
                    gap = at_last[name, task] - at_last[other, task]
                    values[f"{plan}.{name}.minus.{other}.step{last}.{task}"] = f"{100 * gap:.1f}"
    values[f"{plan}.steps"] = str(last)
    summarise(plan, runs, values)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in series.items():
            ax.plot(*zip(*[(s, 100 * v) for s, v in points]), marker="o", label=LABELS.get(name,
                                                                                           name).replace("`",
                                                                                                         ""))
        ax.set(xlabel="training step (batch 16)", ylabel="dev average (GLUE, x100)",
               title=f"learning curves ({plan})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        FIGURES.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURES / f"{plan}.png", dpi=100)
        plt.close(fig)
    except ImportError:
        print("matplotlib is not installed: figures left as they are", file=sys.stderr)
    return "\n".join(lines)


def diagnosis(folder: str, values: dict) -> dict[str, str]:
    """Tables of experiments/diagnose.py's measurements: at step 0 and at the last step."""
    results = [json.loads(p.read_text()) for p in sorted((RESULTS / folder).glob("*.json"))]
    if not results:
        raise SystemExit(f"no diagnosis results in {RESULTS / folder}")

    def label(r):
        c = r["config"]
        return "[CLS], no prompts" if c["mode"] == "none" else f"{c['entry']}, {c['init']}, S = {c['shared']}"

    def key(r):
        c = r["config"]
        return "none" if c["mode"] == "none" else f"{c['entry']}.{c['init']}.S{c['shared']}"

    tables = {}
    head = ("| prompts | feature variation | slot cosine | text -> prompts attention (layers 1..6) | "
            "prompts -> text attention | text shift (layers 1..6) | majority share | dev | gradient norms "
            "(task prompts / shared / heads / encoder) |")

    def gradients(points, index):  # measured over the steps before this point (the first window at step 0)
        g = points[max(index, 1) if index >= 0 else index]["grad_norm"]
        return " / ".join("-" if g[k] is None else f"{g[k]:.1g}" for k in ("task_prompts", "shared_prompts",
                                                                           "heads", "encoder"))

    for which, index in (("init", 0), ("last", -1)):
        lines = [head, "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            p = r["points"][index]
            k = f"{folder}.{key(r)}.{which}"
            values[f"{k}.feature_variation"] = f"{p['feature_variation']:.2f}"
            values[f"{k}.dev"] = f"{100 * p['dev']:.1f}"
            values[f"{k}.step"] = str(p["step"])
            window = r["points"][max(index, 1) if index >= 0 else index]["grad_norm"]
            for group in ("task_prompts", "heads", "encoder"):
                if window[group] is not None:
                    values[f"{k}.grad_{group}"] = f"{window[group]:.1g}"
            if "slot_cosine" in p:
                values[f"{k}.slot_cosine"] = f"{p['slot_cosine']:.2f}"
                values[f"{k}.text_to_prompts"] = f"{np.mean(p['attention_text_to_prompts']):.2f}"
                values[f"{k}.prompts_to_text"] = f"{np.mean(p['attention_prompts_to_text']):.2f}"
                values[f"{k}.text_shift_last"] = f"{p['text_shift'][-1]:.2f}"
                cells = [f"{p['feature_variation']:.2f}", f"{p['slot_cosine']:.2f}",
                         " ".join(f"{v:.2f}" for v in p["attention_text_to_prompts"]),
                         " ".join(f"{v:.2f}" for v in p["attention_prompts_to_text"]),
                         " ".join(f"{v:.2f}" for v in p["text_shift"])]
            else:
                cells = [f"{p['feature_variation']:.2f}", "", "", "", ""]
            cells += [f"{p.get('majority_share', float('nan')):.2f}", f"{100 * p['dev']:.1f}",
                      gradients(r["points"], index)]
            lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
        tables[f"diag:{folder}:{which}"] = "\n".join(lines)
        values[f"{folder}.{which}.step"] = str(results[0]["points"][index]["step"])
    # Over training: feature variation and dev score at every measurement.
    for r in results:
        for p in r["points"]:
            values[f"{folder}.{key(r)}.step{p['step']}.dev"] = f"{100 * p['dev']:.0f}"
            values[f"{folder}.{key(r)}.step{p['step']}.feature_variation"] = f"{p['feature_variation']:.2f}"
    steps = [p["step"] for p in results[0]["points"]]
    lines = ["| prompts | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for r in results:
        lines.append(f"| {label(r)} | " + " | ".join(f"{p['feature_variation']:.2f} / {100 * p['dev']:.0f}"
                                                   for p in r["points"]) + " |")
    tables[f"diag:{folder}:training"] = "\n".join(lines)
    if "linear_probe_head_input" in results[0]["points"][0]:  # what the head's input carries (--linear-probe)
        head_row = "| prompts | " + " | ".join(f"step {s}" for s in steps) + " |"
        lines = [head_row, "|---|" + "---|" * len(steps)]
        for r in results:
            cells = []
            for p in r["points"]:
                head, cls = 100 * p["linear_probe_head_input"], 100 * p["linear_probe_cls_alone"]
                values[f"{folder}.{key(r)}.step{p['step']}.probe_head"] = f"{head:.1f}"
                values[f"{folder}.{key(r)}.step{p['step']}.probe_cls"] = f"{cls:.1f}"
                values[f"{folder}.{key(r)}.step{p['step']}.majority"] = f"{p.get('majority_share', 0):.2f}"
                cells.append(f"{head:.1f} / {cls:.1f} / {100 * p['dev']:.1f}")
            lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
        tables[f"diag:{folder}:probes"] = "\n".join(lines)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
        for r in results:
            left.plot([p["step"] for p in r["points"]], [p["feature_variation"] for p in r["points"]],
                      marker=".",
                      label=label(r))
            if "attention_text_to_prompts" in r["points"][0]:
                right.plot(range(1, 1 + len(r["points"][0]["attention_text_to_prompts"])),
                           r["points"][0]["attention_text_to_prompts"], marker="o", label=label(r))
        left.set(xlabel="step", ylabel="feature variation across inputs",
                 title="what the task feature carries")
        right.set(xlabel="layer", ylabel="share of text attention on prompts", title="at initialisation")
        left.legend(fontsize=6)
        right.legend(fontsize=6)
        fig.tight_layout()
        FIGURES.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURES / f"{folder}.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    return tables


def inference(folder: str, values: dict) -> str:
    """The table of experiments/inference_cost.py's <folder>/inference.json; its keys start with <folder>."""
    path = RESULTS / folder / "inference.json"
    if not path.exists():
        raise SystemExit(f"no {path}: run experiments/inference_cost.py --out {path.parent} first, or take "
                         f"{{{{inference:{folder}}}}} out of the template")
    result = json.loads(path.read_text())
    lines = ["| method | encoder passes per document | documents/s (all tasks) |", "|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {LABELS.get(name, name)} | {m['encoder_passes_per_document']:.0f} | "
                     f"{m['documents_per_second']:.1f} |")
        values[f"{folder}.{name}.docs"] = f"{m['documents_per_second']:.1f}"
        values[f"{folder}.{name}.passes"] = f"{m['encoder_passes_per_document']:.0f}"
    where = f"{result['threads']} threads" if result.get("device", "cpu") == "cpu" else result["dtype"]
    values[f"{folder}.machine"] = f"{result['machine']}, {where}, torch {result['torch']}"
    values[f"{folder}.texts"] = str(result["texts"])
    return "\n".join(lines)


def step_time(folder: str, values: dict) -> str:
    """{{steptime:<folder>}}: experiments/base_step_time.py's table; keys <folder>.<dtype>-<batches>.ms and
    .hours, <folder>.steps and .device."""
    path = RESULTS / folder / "base_step_time.json"
    if not path.exists():
        raise SystemExit(f"{path}: no such result (experiments/base_step_time.py writes it)")
    result = json.loads(path.read_text())
    lines = ["| dtype, batches | median step, ms | the paper's run (steps only), hours |", "|---|---|---|"]
    for name, v in result["variants"].items():
        key = f"{folder}.{name.replace(', ', '-').replace(' ', '-')}"
        values[f"{key}.ms"] = f"{1000 * v['median_step_s']:.1f}"
        values[f"{key}.hours"] = f"{v['paper_run_hours']:.1f}"
        lines.append(f"| {name} | {values[key + '.ms']} | {values[key + '.hours']} |")
    values[f"{folder}.steps"], values[f"{folder}.device"] = f"{result['paper_run_steps']:,}", result["device"]
    return "\n".join(lines)


def many_labels(plan: str, values: dict, frequent: int = 7) -> str:
    """{{manylabel:<plan>}}: a plan of many tasks on one text (one row per run: the mean of the tasks'
    scores, on the first `frequent` tasks of the task set (ordered by train positives) and on the rest,
    with the standard deviation over seeds), then each task's mean score per run ({{...:summary}}: the
    first table alone). Keys <plan>.<run>.{mean,frequent,rare} with .sd, .min and .max over seeds,
    <plan>.<run>.{learned,minutes}, and for each pair of runs <plan>.<a>.minus.<b> with .low, .high (the
    95% interval of the seed-paired difference), .t and .ahead (in how many seeds a is above b)."""
    runs = load(plan)
    if not runs:
        raise SystemExit(f"no results for plan {plan!r} in {RESULTS / plan}")
    tasks = list(next(iter(runs.values()))[0]["final"]["scores"])
    groups = {"mean": tasks, "frequent": tasks[:frequent], "rare": tasks[frequent:]}
    lines = [f"| run | mean of {len(tasks)} tasks | {frequent} frequent | {len(tasks) - frequent} rare | "
             "tasks above 0 | seeds | minutes per run |", "|---|---|---|---|---|---|---|"]
    for name, results in runs.items():
        cells = []
        for group, members in groups.items():
            per_seed = [np.mean([r["final"]["scores"][t] for t in members]) for r in results]
            cells.append(fmt(per_seed))
            mean, sd = mean_sd(per_seed)
            values[f"{plan}.{name}.{group}"], values[f"{plan}.{name}.{group}.sd"] = f"{100 * mean:.1f}", \
                f"{100 * sd:.1f}"
            values[f"{plan}.{name}.{group}.min"] = f"{100 * min(per_seed):.1f}"
            values[f"{plan}.{name}.{group}.max"] = f"{100 * max(per_seed):.1f}"
        learned = np.mean([sum(r["final"]["scores"][t] > 0 for t in tasks) for r in results])
        minutes = np.mean([r["wall_seconds"] for r in results]) / 60
        values[f"{plan}.{name}.learned"] = f"{learned:.1f}"
        values[f"{plan}.{name}.minutes"] = f"{minutes:.0f}"
        values[f"{plan}.{name}.seeds"] = str(len(results))
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells)
                     + f" | {learned:.1f} | {len(results)} | {minutes:.0f} |")
    for name, results in runs.items():  # seed-paired differences of the mean score, with their interval
        for other, other_results in runs.items():
            by_seed = {r["seed"]: np.mean(list(r["final"]["scores"].values())) for r in other_results}
            paired = [np.mean(list(r["final"]["scores"].values())) - by_seed[r["seed"]] for r in results
                      if r["seed"] in by_seed]
            if name == other or len(paired) < 2:
                continue
            mean, se = np.mean(paired), np.std(paired, ddof=1) / np.sqrt(len(paired))
            half = T975[min(10, len(paired) - 1)] * se
            key = f"{plan}.{name}.minus.{other}"
            values[key], values[f"{key}.low"], values[f"{key}.high"] = (f"{100 * v:.1f}" for v in
                                                                         (mean, mean - half, mean + half))
            values[f"{key}.t"] = f"{mean / se:.1f}" if se > 0 else "inf"
            values[f"{key}.ahead"] = f"{sum(d > 0 for d in paired)} of {len(paired)}"
    header = "| task | " + " | ".join(LABELS.get(n, n) for n in runs) + " |"
    lines += ["", header, "|---|" + "---|" * len(runs)]
    for task in tasks:
        means = [100 * np.mean([r["final"]["scores"][task] for r in rs]) for rs in runs.values()]
        lines.append(f"| {task} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    summarise(plan, runs, values)
    values[f"{plan}.steps"] = f'{int(flag(next(iter(runs.values()))[0]["flags"], "--max-steps")):,}'
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", default=str(ROOT / "experiments" / "RESULTS.template.md"))
    parser.add_argument("--out", default=str(ROOT / "RESULTS.md"))
    parser.add_argument("--glue", required=True,
                        help="GLUE folder, for the majority-class row and one pass's steps")
    parser.add_argument("--keys", action="store_true", help="print every key the template may use, and exit")
    options = parser.parse_args()
    template = Path(options.template).read_text(encoding="utf-8")
    values: dict[str, str] = {}
    tables: dict[str, str] = {}
    glue = Path(options.glue)
    if not glue.is_dir():
        parser.error(f"--glue {glue}: no such folder (the GLUE task folders CoLA/, SST-2/, ...)")
    majority = majority_levels(glue, TASK_ORDER)
    for name in sorted(set(re.findall(r"\{\{(\w+):([\w.-]+)(?::\w+)?\}\}", template))):
        kind, arg = name
        try:
            if kind == "table":
                tables[f"table:{arg}"] = plan_table(arg, values, majority, glue)
            elif kind == "curves":
                tables[f"curves:{arg}"] = curves(arg, values)
            elif kind == "diag":
                tables |= diagnosis(arg, values)
            elif kind == "inference":
                tables[f"inference:{arg}"] = inference(arg, values)
            elif kind == "steptime":
                tables[f"steptime:{arg}"] = step_time(arg, values)
            elif kind == "manylabel":  # ...:summary, the first table alone
                tables[f"manylabel:{arg}"] = many_labels(arg, values)
                tables[f"manylabel:{arg}:summary"] = tables[f"manylabel:{arg}"].split("\n\n")[0]
        except SystemExit as missing:
            if not options.keys:
                raise
            print(f"(left out: {missing})", file=sys.stderr)  # --keys lists what the results give
    values |= {f"majority.{t}": f"{100 * v:.1f}" for t, v in majority.items()}
    values |= tables
    if options.keys:
        print("\n".join(sorted(k for k in values if ":" not in k)))
        return
    missing = sorted({k for k in re.findall(r"\{\{([^}]+)\}\}", template) if k not in values})
    if missing:
        raise SystemExit(f"{options.template} names values the results do not give: {', '.join(missing)}")
    text = re.sub(r"\{\{([^}]+)\}\}", lambda m: values[m.group(1)], template)
    Path(options.out).write_text(text, encoding="utf-8")
    print(f"wrote {options.out} ({len(values)} values)")


if __name__ == "__main__":
    main()
