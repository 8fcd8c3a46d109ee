"""Correct two fields of the 26 GPU result files of the 70a3c0b session (gpu-table, gpu-ablation), from
that session's own records, and say so in each file. Run once; running it again changes nothing.

    python experiments/fix_gpu_metadata.py

- "threads": 16 -> 1. run.py recorded the machine's cores / jobs before it had --threads; every training
  of that session ran with one thread (gpu_session.sh passes --threads 1, and the session's run.txt
  says "with 1 threads each").
- "resumed": absent -> true for the nine runs whose log says "resumed from" (continued in the second
  call from a checkpoint of the first), false for the others (run.py did not record it then).
- "metadata_note": what was changed, and that "commit" was rewritten by hand from the device copy's
  stale "32bf8c1+changes" to 70a3c0b, the tree those files ran (RESULTS.md section 5 says so too).
No measured value (an evaluation, a step count, a time) is touched.
"""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = RESULTS / "gpu-session" / "logs"
NOTE = ("threads corrected 16 -> 1 and resumed set from this session's logs by "
        "experiments/fix_gpu_metadata.py; commit was rewritten by hand from the device copy's stale "
        "32bf8c1+changes to 70a3c0b, whose tree ran")


def main() -> None:
    changed = 0
    for plan in ("gpu-table", "gpu-ablation"):
        for path in sorted((RESULTS / plan).glob("*.json")):
            result = json.loads(path.read_text(encoding="utf-8"))
            if result.get("metadata_note") == NOTE:
                continue
            logs = list(LOGS.glob(f"{plan}.{path.stem}*.txt"))  # single-task runs have one log per task
            if result.get("threads") != 16 or result.get("commit") != "70a3c0b" or not logs:
                raise SystemExit(f"{path}: not a file of the 70a3c0b GPU session as expected; left alone")
            result["threads"] = 1
            result["resumed"] = any("resumed from" in log.read_text(encoding="utf-8") for log in logs)
            result["metadata_note"] = NOTE
            path.write_text(json.dumps(result, indent=1), encoding="utf-8")  # as run.py writes it
            changed += 1
            print(f"{path.relative_to(RESULTS)}: threads 1, resumed {result['resumed']}")
    print(f"{changed} files corrected")


if __name__ == "__main__":
    main()
