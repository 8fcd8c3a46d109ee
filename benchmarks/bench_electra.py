"""Side-by-side speed of electra.py and Hugging Face's ElectraModel (sdpa) with the same weights.

    python benchmarks/bench_electra.py                      # ELECTRA-base shape, B=16 x T=128, CPU
    python benchmarks/bench_electra.py --device cuda --repeats 20

Rows: inference forward (fp32, bf16 autocast) and one training step (forward + backward + fused
AdamW, the same optimizer for both; fp32 and bf16 autocast). Each row times both models in
alternation, in one process, and reports the median; the ratio column is transformers' time / ours
(> 1 means electra.py is faster). The input has padding (a quarter of the rows are half length), as
batches in training do.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from electra import Electra  # noqa: E402


def timed(fn, device: str) -> float:
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
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (base: 12)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model and row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    import transformers  # the reference; a test-time / benchmark dependency only

    torch.manual_seed(0)
    config = transformers.ElectraConfig(embedding_size=768, hidden_size=768, num_hidden_layers=args.layers,
                                        num_attention_heads=12, intermediate_size=3072)
    with tempfile.TemporaryDirectory() as folder:
        transformers.ElectraModel(config).save_pretrained(folder)
        models = {"transformers": transformers.ElectraModel.from_pretrained(folder,
                                                                            attn_implementation="sdpa"),
                  "electra.py": Electra.from_pretrained(folder)}
    ids = torch.randint(1000, 30000, (args.batch, args.length), device=args.device)
    mask = torch.ones_like(ids)
    mask[: args.batch // 4, args.length // 2:] = 0
    types = torch.zeros_like(ids)

    def run(name):
        model = models[name]
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return out.last_hidden_state if name == "transformers" else out

    rows = []
    for dtype in ("fp32", "bf16"):
        for step in ("forward", "train step"):
            times = {name: [] for name in models}
            optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-5,
                                              fused=True) for name, m in models.items()}
            for name, m in models.items():
                m.to(args.device).train(step == "train step")

            def one(name):
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    if step == "forward":
                        with torch.inference_mode():
                            run(name)
                        return
                    loss = run(name)[:, 0].float().pow(2).mean()
                loss.backward()
                optims[name].step()
                optims[name].zero_grad(set_to_none=True)

            for name in models:  # warm-up
                one(name)
            for _ in range(args.repeats):
                for name in models:
                    times[name].append(timed(lambda: one(name), args.device))
            med = {name: statistics.median(t) * 1000 for name, t in times.items()}
            rows.append((f"{step} {dtype}", med["transformers"], med["electra.py"]))
            print(f"  measured {step} {dtype}", file=sys.stderr, flush=True)

    threads = f"CPU, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if args.device == "cuda" else threads
    print(f"ELECTRA-base shape ({args.layers} layers), B={args.batch} x T={args.length}, {device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, median of {args.repeats}")
    print("| row | transformers ms | electra.py ms | speed-up (transformers / ours) |")
    print("|---|---|---|---|")
    for label, hf_ms, our_ms in rows:
        print(f"| {label} | {hf_ms:.1f} | {our_ms:.1f} | {hf_ms / our_ms:.2f}x |")
    hf_fp32_forward = rows[0][1]
    ours_bf16_forward = rows[2][2]
    print("\nelectra.py bf16 forward vs transformers fp32 forward: "
          f"{hf_fp32_forward / ours_bf16_forward:.2f}x")


if __name__ == "__main__":
    main()
