"""Helpers shared by the benchmark scripts: the hardware line, a wall-clock timer and the JSON output. They need
nothing beyond psp_core's own dependencies, so that the benchmarks run where only those are installed (the GPU
check's machine: `gpu_check.sh`)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from machine import cpu_model  # a benchmark puts this folder on sys.path before it imports common


def hardware() -> str:
    """One line naming the processor (or GPU), core count, torch version and threads."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs{gpu}; torch {torch.__version__}, "
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


def write_json(path: str | Path, value: Any) -> None:
    """Write `value` as JSON to `path` through a temporary file renamed over it, so that a benchmark stopped while
    writing leaves the rows it wrote before, never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
