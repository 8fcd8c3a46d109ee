"""What many label sets on one text cost: training step, dev evaluation and labelling, for N tasks.

    python benchmarks/bench_many_tasks.py                           # CPU, fp32: N = 8, 24, 64, 256
    python benchmarks/bench_many_tasks.py --device cuda --dtype bf16 --repeats 10

MiniLM's shape (6 layers, D = 384, 12 heads; random weights: speed does not depend on them), texts of
--lengths tokens (every text fills its length). For each N and length, every setting below in one
process, alternating in rounds so that machine noise hits them alike (medians reported):

    mtop        L = 4, S = 32 (the paper's pool)             one pass, N*L + S + T positions
    mtop-small  L = 1, S = 8                                 one pass, N + 8 + T positions
    stopgrad    L = 4, S = 0                                 one pass, N*L + T positions
    none        [CLS] heads (MT-DNN)                         one pass, T positions
    separate    L = 4 per task (prompt tuning, Fig. 1a)      N passes of L + T positions

Columns: "step s" is train.py's step (train.train_step: forward with one active task, loss, backward,
clipping, AdamW) on a batch of 16; "labels docs/s" is every task's label for --batch documents
(active_task=None: one pass, N passes for "separate"); "eval one pass s" and "eval per task s" time a
dev evaluation of --dev texts the two ways train.py could do it: predict_tasks' one pass for all N tasks
on shared texts, or predict_encoded once per task. Where N is large, the per-task path and "separate"
would take hours: they are timed on --sample tasks and scaled by N / sample (each task's pass costs the
same; the table marks them "~"). "peak MiB" is the resident memory high-water mark of a fresh process
that builds the model, trains 2 steps and labels one batch (VmHWM, Linux).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import glue_data  # noqa: E402
import train  # noqa: E402
from electra import Electra, ElectraConfig  # noqa: E402
from mtop import MTOP, PromptConfig  # noqa: E402
from support.labelling import forward_batches, predict_encoded, predict_tasks  # noqa: E402

from bench_mtop import timed  # noqa: E402  (seconds that fn() takes, waiting for the GPU)

SETTINGS = {"mtop": ("mtop", 4, 32), "mtop-small": ("mtop", 1, 8), "stopgrad": ("stopgrad", 4, 0),
            "none": ("none", 4, 0), "separate": ("separate", 4, 0)}
MINILM = dict(vocab_size=30522, embedding_size=384, hidden_size=384, num_hidden_layers=6,
              num_attention_heads=12, intermediate_size=1536)


def texts(count: int, length: int, seed: int = 0) -> glue_data.Encoded:
    """count texts of `length` tokens: [CLS], random word ids, [SEP]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (count, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    return glue_data.Encoded(ids.ravel(), np.zeros(count * length, np.int8),
                             np.arange(0, count * length + 1, length, dtype=np.int64), None, texts="bench")


class Cell:
    """One setting at one N and length: the model, its optimizer, and the actions that are timed."""

    def __init__(self, setting: str, n: int, length: int, options):
        self.setting, self.n, self.options = setting, n, options
        mode, L, S = SETTINGS[setting]
        self.positions = {"none": f"{length}", "separate": f"{n} x {L + length}"}.get(setting,
                                                                                      f"{n * L + S + length}")
        torch.manual_seed(0)
        self.model = MTOP(Electra(ElectraConfig(**MINILM)), [(f"t{i}", 2) for i in range(n)],
                          PromptConfig(mode, L, S)).to(options.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=True)  # as train.py's
        self.batch = glue_data.collate(texts(16, length, 1), np.arange(16))
        self.batch["labels"] = torch.zeros(16, dtype=torch.long)
        self.docs, self.dev = texts(options.batch, length, 2), texts(options.dev, length, 3)
        self.sample = self.model.task_names[:min(n, options.sample)]
        self.scales = {t: (0.0, 1.0) for t in self.model.task_names}

    def step(self) -> None:
        """train.py's step on one task's batch of 16."""
        self.model.train()
        train.train_step(self.model, self.model, self.optimizer, self.batch, "t0", (0.0, 1.0),
                         self.options.device, self.options.dtype, 1.0)

    def label(self) -> None:
        """Every task's logits for the documents, as Labeller computes them: one pass (active_task=None);
        in "separate" one pass per task, timed for the sample."""
        self.model.eval()
        tasks = self.sample if self.setting == "separate" else [None]
        for task in tasks:
            for _ in forward_batches(self.model, self.docs, np.arange(len(self.docs)), self.options.device,
                                     self.options.dtype, len(self.docs), task):
                pass

    def eval_one_pass(self) -> None:
        """A dev evaluation of N tasks on shared texts: predict_tasks, one pass for all."""
        self.model.eval()
        predict_tasks(self.model, [(t, self.dev, np.arange(len(self.dev))) for t in self.model.task_names],
                      self.options.device, self.options.dtype, self.scales)

    def eval_per_task(self) -> None:
        """The same evaluation one task at a time (predict_encoded), timed for the sample."""
        self.model.eval()
        for t in self.sample:
            predict_encoded(self.model, t, self.dev, None, self.options.device, self.options.dtype)

    def scale(self, action: str) -> float:
        """From the timed work to all N tasks' work: N / sample for the per-task paths."""
        per_task = action == "eval_per_task" or action == "label" and self.setting == "separate"
        return self.n / len(self.sample) if per_task else 1.0


def peak_mib(setting: str, n: int, length: int) -> float:
    """The peak resident memory of a fresh process that builds the model, trains 2 steps and labels one
    batch, in MiB."""
    done = subprocess.run([sys.executable, __file__, "--memory-cell", f"{setting},{n},{length}",
                           *sys.argv[1:]], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def parse():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="8,24,64,256", help="comma-separated task counts N")
    parser.add_argument("--lengths", default="20,128", help="comma-separated text lengths in tokens")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings")
    parser.add_argument("--batch", type=int, default=16, help="documents labelled per timed batch")
    parser.add_argument("--dev", type=int, default=32, help="dev texts of the timed evaluation")
    parser.add_argument("--sample", type=int, default=4,
                        help="tasks timed for the per-task paths when N is larger (scaled by N / sample)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of step and labels per cell")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory column")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--memory-cell", default="", help=argparse.SUPPRESS)  # peak_mib's child process
    return parser.parse_args()


def main() -> None:
    options = parse()
    if options.memory_cell:
        setting, n, length = options.memory_cell.split(",")
        cell = Cell(setting, int(n), int(length), options)
        for action in (cell.step, cell.step, cell.label):
            action()
        # VmHWM, this process's own peak: ru_maxrss would count the parent's, kept across fork and exec
        status = Path("/proc/self/status").read_text().splitlines()
        print(int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) / 1024)  # KiB
        return
    threads = torch.get_num_threads() if options.device == "cpu" else "-"
    print(f"torch {torch.__version__}, {options.device} {options.dtype}, threads {threads}, MiniLM shape, "
          f"random weights; step: batch 16; labels: batches of {options.batch}; eval: {options.dev} texts\n")
    print("| T | N | setting | positions | step s | labels docs/s | eval one pass s | eval per task s | "
          "per task / one pass | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for length in map(int, options.lengths.split(",")):
        for n in map(int, options.tasks.split(",")):
            cells = [Cell(s, n, length, options) for s in options.settings.split(",")]
            times = {}
            for round_ in range(options.repeats + 1):  # round 0 warms up (allocations, kernel choices)
                for cell in cells:
                    actions = ["step", "label"]
                    if cell.setting != "separate" and round_ < 2:  # evaluation: one timed round
                        actions += ["eval_one_pass", "eval_per_task"]
                    for action in actions:
                        spent = timed(getattr(cell, action), options.device) * cell.scale(action)
                        if round_:
                            times.setdefault((cell.setting, action), []).append(spent)
            for cell in cells:
                t = {a: statistics.median(v) for (s, a), v in times.items() if s == cell.setting}
                mark = "~" if cell.scale("eval_per_task") != 1.0 else ""
                evals = "- | - | -" if "eval_one_pass" not in t else (
                    f"{t['eval_one_pass']:.2f} | {mark}{t['eval_per_task']:.1f} | "
                    f"{t['eval_per_task'] / t['eval_one_pass']:.1f}x")
                memory = "" if options.no_memory else f"{peak_mib(cell.setting, n, length):.0f}"
                docs = f"{'~' if cell.scale('label') != 1.0 else ''}{options.batch / t['label']:.1f}"
                print(f"| {length} | {n} | {cell.setting} | {cell.positions} | {t['step']:.2f} | {docs} | "
                      f"{evals} | {memory} |", flush=True)
                rows.append({"T": length, "N": n, "setting": cell.setting, "positions": cell.positions,
                             "seconds": t, "labels_docs_per_s": options.batch / t["label"],
                             "peak_mib": memory, "per_task_scaled_from": len(cell.sample)})
            del cells
    if options.json:
        Path(options.json).write_text(json.dumps({"torch": torch.__version__, "threads": threads,
                                                  "options": vars(options), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
