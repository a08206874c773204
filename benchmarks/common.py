"""Helpers shared by the benchmark scripts: the hardware line and a wall-clock timer."""
from __future__ import annotations

import platform
import shlex
import sys
import time
from typing import Callable

import torch


def hardware() -> str:
    """One line naming the processor (or GPU), core count, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}")


def command_line() -> str:
    """The exact command that ran this script, to print beside its figures."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def time_per_call(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Median seconds per call of `fn` over `iters` timed calls after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
