"""Peak resident memory of a command (and its children), with its resident memory over time.

    python benchmarks/peak_memory.py -- python train.py --data-dir GLUE_DIR --model MINILM \
        --tasks RTE,MRPC,STS-B,CoLA,SST-2 --lr 1e-4 --max-steps 300 --eval-every 150 --output-dir /tmp/run

Samples the resident set size (VmRSS, Linux /proc) of the process tree every 0.2 s and prints the peak,
the time it was reached and the last line the command printed before it, which tells the phase (data,
training steps, evaluation, test predictions). The kernel's own high-water mark (ru_maxrss of the
children) is printed too, as a check on the sampling.
"""

import argparse
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def tree_rss_kib(pid: int) -> int:
    """Resident memory of pid and all its descendants, in KiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            todo += [int(c) for t in Path(f"/proc/{current}/task").iterdir()
                     for c in (t / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    options = parser.parse_args()
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1)
    last_line, peak, samples = "", (0, 0.0, ""), []

    def read_output():
        nonlocal last_line
        for line in process.stdout:
            sys.stdout.write(line)
            last_line = line.strip()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    while process.poll() is None:
        rss = tree_rss_kib(process.pid)
        now = time.perf_counter() - start
        samples.append((now, rss))
        if rss > peak[0]:
            peak = (rss, now, last_line)
        time.sleep(0.2)
    reader.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(f"\npeak resident memory {peak[0] / 1024 ** 2:.2f} GiB at {peak[1]:.0f} s, after the line: "
          f"{peak[2]!r}")
    print(f"kernel high-water mark of the largest child: {children / 1024 ** 2:.2f} GiB; "
          f"exit status {process.returncode}; {time.perf_counter() - start:.0f} s")
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        t, rss = samples[min(len(samples) - 1, int(fraction * (len(samples) - 1)))]
        print(f"  at {t:6.0f} s: {rss / 1024 ** 2:.2f} GiB")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
