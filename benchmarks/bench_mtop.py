"""Documents per second when predicting all N tasks: MTOP's one pass vs prompt tuning's N passes.

    python benchmarks/bench_mtop.py                          # CPU, fp32, ELECTRA-small shape
    python benchmarks/bench_mtop.py --dtype bf16             # bf16 autocast (AMX CPUs, GPUs)
    python benchmarks/bench_mtop.py --device cuda --repeats 20 --separate-repeats 10

Table 1, for each N in --tasks: "mtop" encodes [P~_S ; P_S ; X] once (N*L + S + T positions) and
reads every task's logits from that pass; "separate" (Fig. 1a, prompt tuning) encodes [P_i ; X]
once per task. Both run with active_task=None, as at inference, on the same random encoder, timed
alternately in one process; the median over repeats is reported. speedup = separate / mtop time.
Table 2: milliseconds for one "mtop" pass as N grows, next to the pass without prompts ("none",
the MT-DNN baseline), to show what the N*L extra positions cost. Every document fills --length.
Table 3: labelling throughput as N grows (documents/s, all N tasks from one pass), the share of that
time spent in the encoder and in the heads, and the heads run as N separate modules (the training
path) against MTOP.all_heads' two batched products (the inference path), whose logits must equal
the loop's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from electra import Electra, ElectraConfig  # noqa: E402
from mtop import MTOP, PromptConfig  # noqa: E402


def timed(fn, device: str) -> float:
    """Seconds that fn() takes, waiting for the GPU to finish when there is one."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="1,8,64", help="comma-separated task counts N for table 1")
    parser.add_argument("--growth", default="1,8,64,256",
                        help="comma-separated task counts N for tables 2 and 3")
    parser.add_argument("--task-prompt-len", type=int, default=4, help="prompt tokens per task L (paper: 4)")
    parser.add_argument("--shared-prompt-len", type=int, default=32,
                        help="shared prompt tokens S (paper: 32)")
    parser.add_argument("--batch", type=int, default=16, help="documents per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per document")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ELECTRA-small: 12)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per row for one-pass modes")
    parser.add_argument("--separate-repeats", type=int, default=3,
                        help="timed batches per row for 'separate' (N passes each: slow at large N)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ElectraConfig(vocab_size=30522, embedding_size=128, hidden_size=256,
                           num_hidden_layers=args.layers,
                           num_attention_heads=4, intermediate_size=1024)  # ELECTRA-small's shape
    encoder = Electra(config).to(args.device).eval()
    ids = torch.randint(1000, 30000, (args.batch, args.length), device=args.device)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def model_for(mode: str, n: int) -> MTOP:
        tasks = [(f"task{i}", 2) for i in range(n)]
        prompts = PromptConfig(mode, args.task_prompt_len, args.shared_prompt_len)
        return MTOP(encoder, tasks, prompts).to(args.device).eval()

    def median_seconds(models: dict[str, MTOP], repeats: dict[str, int]) -> dict[str, float]:
        """Time the models batch by batch in alternation, so that machine noise hits them alike."""
        times = {name: [] for name in models}
        with torch.inference_mode(), autocast:
            for model in models.values():  # warm-up: first-call allocations and kernel choices
                model(ids, mask, types)
            for r in range(max(repeats.values())):
                for name, model in models.items():
                    if r < repeats[name]:
                        times[name].append(timed(lambda: model(ids, mask, types), args.device))
        return {name: statistics.median(t) for name, t in times.items()}

    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, threads {threads}, "
          f"batch {args.batch} x {args.length} tokens, {args.layers} layers E=128 D=256, "
          f"L={args.task_prompt_len} S={args.shared_prompt_len}\n")

    print("| N tasks | mtop: positions | mtop docs/s | separate: passes | separate docs/s | speedup |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in args.tasks.split(",")]:
        seconds = median_seconds({"mtop": model_for("mtop", n), "separate": model_for("separate", n)},
                                 {"mtop": args.repeats, "separate": args.separate_repeats})
        positions = n * args.task_prompt_len + args.shared_prompt_len + args.length
        print(f"| {n} | {positions} | {args.batch / seconds['mtop']:.1f} | "
              f"{n} x {args.task_prompt_len + args.length} | {args.batch / seconds['separate']:.1f} | "
              f"{seconds['separate'] / seconds['mtop']:.1f}x |",
              flush=True)

    print("\n| N tasks | mtop: positions | mtop ms/batch | none ms/batch | mtop / none |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in args.growth.split(",")]:
        seconds = median_seconds({"mtop": model_for("mtop", n), "none": model_for("none", n)},
                                 {"mtop": args.repeats, "none": args.repeats})
        positions = n * args.task_prompt_len + args.shared_prompt_len + args.length
        print(f"| {n} | {positions} | {1000 * seconds['mtop']:.0f} | {1000 * seconds['none']:.0f} "
              f"| {seconds['mtop'] / seconds['none']:.2f} |", flush=True)

    print("\n| N tasks | documents/s (all tasks) | encoder share | heads share | heads, loop ms "
          "| heads, batched ms | batched = loop |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.growth.split(",")]:
        model = model_for("mtop", n)
        L = args.task_prompt_len
        with torch.inference_mode(), autocast:
            rows = slice(0, n * L)
            encode = lambda: model.encode(ids, mask, types, model.prompt_pool(), rows)  # noqa: E731
            features = encode().unflatten(1, (n, L)).mean(dim=2)  # (B, N, D)
            loop = lambda: {name: head(features[:, i]) for i, (name, head) in  # noqa: E731
                            enumerate(zip(model.task_names, model.heads))}
            batched = lambda: model.all_heads(features)  # noqa: E731
            same = all(torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4)
                       for a, b in zip(loop().values(), batched().values()))
            whole = lambda: model(ids, mask, types)  # noqa: E731
            for fn in (encode, loop, batched, whole):  # warm-up
                fn()
            times = {name: [] for name in ("encode", "loop", "batched", "whole")}
            for _ in range(args.repeats):
                for name, fn in (("encode", encode), ("loop", loop), ("batched", batched), ("whole", whole)):
                    times[name].append(timed(fn, args.device))
        t = {name: statistics.median(v) for name, v in times.items()}
        print(f"| {n} | {args.batch / t['whole']:.1f} | {t['encode'] / t['whole']:.0%} | "
              f"{t['batched'] / t['whole']:.1%} | {1000 * t['loop']:.1f} | {1000 * t['batched']:.1f} | "
              f"{'yes' if same else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
