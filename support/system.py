"""The machine under train.py: torchrun processes, devices and dtypes, and CPU memory.

    setup_distributed(device)   (rank, world size, this process's device) under torchrun, else (0, 1, device)
    broadcast(obj, world)       rank 0's value on every rank
    log(message, rank)          a progress line, from rank 0 only
    autocast(device, dtype)     bf16 autocast when dtype is "bf16", a no-op context for "fp32"
    pad_multiple(device)        what batch lengths are rounded up to on this device
    cpu_has_bf16()              whether bf16 matrix products run natively on this CPU
    limit_heap_growth()         CPU training: large tensors get their own mappings (glibc)
    release_memory()            give freed memory back to the operating system (glibc)
    StopSignals, exit_on_sigterm()   SIGTERM and Ctrl-C: a clean stop (training), a clean-up (--predict)
    code_version()              the git commit of the code, for args.json

BENCHMARKS.md measures the two glibc settings (peak memory against step time) and the padding.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import signal
import subprocess
import threading
from pathlib import Path

import torch
import torch.distributed as dist


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device) under torchrun; (0, 1, device) otherwise."""
    if "RANK" not in os.environ:
        return 0, 1, device
    # Rank 0 evaluates and writes alone while the others wait in the next collective: allow it an hour.
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(hours=1))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # the GPU of this process on its own node
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def broadcast(obj, world: int):
    """Rank 0's value on every rank (probe metrics, so every rank's scheduler agrees)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def log(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, flush=True)


def autocast(device: str, dtype: str):
    """The context every forward pass runs in: bf16 autocast for dtype "bf16" (CPU or CUDA), else none."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")


def pad_multiple(device: str) -> int:
    """Batches are padded to their longest text; on a GPU that length is rounded up to a multiple of 8.
    Every new (B, T) shape can cost a kernel plan there (cuDNN attention builds one per shape), and
    tensor cores prefer multiples of 8 (BENCHMARKS.md)."""
    return 8 if device.startswith("cuda") else 1


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them bf16 matrix products
    are emulated: tens of times slower than fp32. Unknown (no /proc/cpuinfo): assume it has."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16"})


MMAP_THRESHOLD = 4 << 20  # bytes; see limit_heap_growth


def limit_heap_growth() -> None:
    """CPU training: a fixed glibc mmap threshold of 4 MiB. By default glibc raises that threshold to the
    size of each large block freed (up to 32 MiB), so the activations of later steps, whose shapes change
    with every bucketed batch, land in a heap that fragments and is mostly not given back. With a fixed
    threshold a tensor above 4 MiB normally gets its own mapping, returned to the system when freed.
    The setting is the whole process's, for the rest of its life. benchmarks/bench_allocator.py
    measures the trade (peak memory against step time). No-op off glibc."""
    if libc := glibc():
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


def glibc():
    """The C library when it is glibc (mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_memory() -> None:
    """Give freed memory back to the operating system. glibc's malloc keeps the memory of freed tensors
    for reuse; with a new batch shape at every step its heap fragments, and the process holds far more
    than its tensors need (benchmarks/peak_memory.py). No-op off glibc."""
    gc.collect()
    if libc := glibc():
        libc.malloc_trim(0)


class StopSignals:
    """SIGTERM (what batch schedulers send before they kill a job) and SIGINT (Ctrl-C) as a request to
    stop cleanly: `received` is set, and the training loop finishes its step, writes a checkpoint and
    leaves (train.py). A second SIGINT interrupts at once. A context manager: the previous handlers come
    back on exit."""

    def __init__(self):
        self.received = 0

    def __enter__(self) -> StopSignals:
        main = threading.current_thread() is threading.main_thread()  # handlers: the main thread's only
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)} if main \
            else {}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.received and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number

    def requested(self, world: int, device: str) -> int:
        """The signal received by any process (0: none); every rank must ask at the same step."""
        if world == 1:
            return self.received
        flag = torch.tensor([self.received], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


@contextlib.contextmanager
def exit_on_sigterm():
    """SIGTERM raises SystemExit in the main thread, so that `finally` and `except BaseException` clean-ups
    run (--predict removes its temporary output); the previous handler comes back on exit."""
    def stop(number, frame):
        raise SystemExit(f"error: stopped by {signal.Signals(number).name}; nothing was written")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def code_version() -> str:
    """The code that runs, for a run's records: the git commit of this checkout ('+changes' when its .py
    files differ from it), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], cwd=root, capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return f"git {head.stdout.strip()}" + ("+changes" if dirty.stdout.strip() else "")
