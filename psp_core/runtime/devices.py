"""Device-side performance switches: memory format, precision (and its `auto` rule), compilation
(and its `auto` rule, and its persistent cache), for CPU and CUDA alike; and the CPU allocator's
treatment of freed memory."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Literal

import torch
from torch import nn

from psp_core.errors import InputError
from psp_core.options import CompileSwitch, Precision

ComputePrecision = Literal["fp32", "bf16", "fp16"]
"""A precision a forward runs in: what `resolve_precision` turns a `Precision` choice into."""

COMPILE_CACHE_ENV = "PSP_COMPILE_CACHE_DIR"
"""Environment variable naming the persistent compile cache folder (when no folder is configured)."""


M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
"""glibc's `mallopt` parameters (malloc.h)."""
NEVER_TRIM = 2**31 - 1
"""The largest M_TRIM_THRESHOLD `mallopt` takes (an int): free heap above it is returned to the OS."""


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a batch frees for the next batch, instead of returning it to the OS
    and page-faulting it back in. By default glibc maps each block of 32 MB or more on its own and unmaps it when
    freed, and trims the heap after large frees: an inversion batch (1024 px, bf16, batch 2) took ~1M page faults
    and 1.49x the time (its activations are such blocks), a 256 px training step ~500k page faults
    (benchmarks/bench_allocator.py). Here every block comes from the main heap (no mapping of its own), which is
    not trimmed below 2 GB free, and threads started from now on share it (a thread's own arena is trimmed
    regardless: threads that exist already need MALLOC_ARENA_MAX=1 in their process's environment, as the
    pipelines give Ray's workers). Call it before the process builds or loads its models: called after, the
    inversion batches still page-faulted (~288k a batch, measured when it kept blocks under 32 MB only). The
    process's resident memory stays near its peak.
    Process-wide, once; returns whether it applied (False where libc is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM)))


def to_channels_last(module: nn.Module) -> nn.Module:
    """Put every 4-D parameter and buffer in channels-last layout (5-D modulated weights stay)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.ndim == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def inference_channels_last(device: torch.device | str, precision: ComputePrecision, compiled: bool) -> bool:
    """Whether an inference model runs its weights in channels-last layout: only eager bf16 on a CPU, where oneDNN's
    channels-last convolutions measured 1.39x at 1024 px and 1.16x at 256 px (batch 2; fp32 1.03-1.04x, compiled
    bf16 0.93x: benchmarks/README.md, "Forward throughput"). Elsewhere the layout stays contiguous."""
    return torch.device(device).type == "cpu" and precision == "bf16" and not compiled


def autocast(device: torch.device | str, precision: ComputePrecision) -> ContextManager:
    """Autocast for `precision` on `device`: bf16 on CPU or GPU, fp16 on GPU only, fp32 = no-op."""
    device_type = torch.device(device).type
    if precision == "auto":
        raise ValueError("precision 'auto' must be resolved first (psp_core.runtime.devices.resolve_precision)")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


def has_fast_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 natively: a CPU with AVX-512 BF16 or AMX (torch's own CPU
    capability query), or a CUDA device with bf16 tensor cores (not emulation)."""
    device = torch.device(device)
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_precision(choice: Precision, device: torch.device | str) -> ComputePrecision:
    """The precision to run in: `auto` is bf16 where the hardware has it (see `has_fast_bf16`), fp32
    otherwise; an explicit choice stands, except fp16, which only CUDA autocasts."""
    device = torch.device(device)
    if choice == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise InputError(f"precision fp16 needs a CUDA device, this run is on {device.type}; use bf16 or auto")
    if choice not in ("fp32", "bf16", "fp16"):
        raise InputError(f"unknown precision {choice!r}; one of auto, fp32, bf16, fp16")
    return choice


def use_ieee_fp32() -> None:
    """Run fp32 convolutions and matmuls on CUDA in IEEE fp32, not TF32 (cuDNN's default for
    convolutions), so `precision: fp32` computes what the parity fixtures pin; CPUs are unaffected."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


@dataclass(frozen=True)
class CompilePayoff:
    """What a compile costs and what it saves on one kind of device, measured with a generator of
    `output_size` px: a cold compile (empty cache), and the seconds each image then takes less than
    eagerly."""

    compile_seconds: float
    seconds_saved_per_image: float
    output_size: int

    @property
    def break_even_images(self) -> int:
        """Images after which the compile has paid for itself (at the measured size)."""
        return math.ceil(self.compile_seconds / self.seconds_saved_per_image)


MEASURED_PAYOFF: dict[str, CompilePayoff] = {
    # 2-core AMD EPYC (AVX-512 BF16), torch 2.14.1, the inference core's pSp forward at 1024 px, batch 2,
    # bf16 (benchmarks/bench_forward.py --compile, 2026-12-07, with `keep_freed_memory` keeping blocks of any
    # size): a cold compile of 82.7 s; 1.061 images/s eager (in the channels-last layout
    # `inference_channels_last` gives it), 1.190 compiled, so 1/1.061 - 1/1.190 = 0.102 s saved per image
    # and the compile repays itself after 810 images.
    "cpu": CompilePayoff(compile_seconds=82.7, seconds_saved_per_image=1 / 1.061 - 1 / 1.190, output_size=1024),
}
"""Measured payoff of compiling inference (the pSp forward), per device type; `compile: auto` never
compiles on a device type without a measurement here."""

MEASURED_TRAINING_PAYOFF: dict[str, CompilePayoff] = {
    # the same machine, the encode preset's training step at 256 px (encoder input 256), batch 2, bf16
    # (benchmarks/bench_train_step.py --configs full --precisions bf16 --compile, two runs): a cold
    # compile of the forward and its backward 152 s (~17 GB peak memory, once per machine: from the
    # cache 9 s); steps of 2.98 / 2.96 s eager and 2.86 / 2.90 s compiled, so ~0.043 s saved per image:
    # the loss networks, the backward's own work and the optimiser gain little from compiling.
    "cpu": CompilePayoff(compile_seconds=152.0, seconds_saved_per_image=0.043, output_size=256),
}
"""Measured payoff of compiling a training step, per device type (as `MEASURED_PAYOFF`)."""


def resolve_compile(choice: CompileSwitch, n_images: int, device: torch.device | str, output_size: int,
                    payoffs: dict[str, CompilePayoff] = MEASURED_PAYOFF) -> bool:
    """Whether to compile: an explicit choice stands; `auto` compiles when this process will run at
    least the break-even number of images measured for its device type (in `payoffs`), counting a
    cold compile, as the first process on a machine pays it. The saving per image scales with the
    generator's pixels (its FLOPs), so a generator 4x smaller a side needs 16x the images."""
    if isinstance(choice, bool):
        return choice
    if choice != "auto":
        raise InputError(f"compile must be auto, true or false, got {choice!r}")
    payoff = payoffs.get(torch.device(device).type)
    if payoff is None:
        return False
    saved = payoff.seconds_saved_per_image * (output_size / payoff.output_size) ** 2
    return n_images * saved >= payoff.compile_seconds


def compile_cache_dir(configured: str | Path | None = None) -> Path:
    """The persistent compile cache folder: `configured`, else $PSP_COMPILE_CACHE_DIR, else
    psp-pipeline/inductor under the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if configured is not None:
        return Path(configured).expanduser()
    if os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV]).expanduser()
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return user_cache / "psp-pipeline" / "inductor"


def compile_model(module: nn.Module, cache_dir: str | Path | None = None) -> nn.Module:
    """`module` compiled by torch.compile (inductor), with inductor's on-disk caches (compiled graphs,
    kernels, autograd graphs) in `compile_cache_dir(cache_dir)`, so the next process on this machine
    that compiles the same model reuses them. Shapes are static: each new batch shape compiles once
    (and is cached too). The compile happens at the first call. The cache folder is process-wide."""
    directory = compile_cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory.resolve())
    return torch.compile(module, dynamic=False, options={"fx_graph_cache": True})
