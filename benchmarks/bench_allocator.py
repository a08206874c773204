"""glibc's default treatment of freed memory against `keep_freed_memory` (what the inference core and the
trainer set on a CPU): seconds and page faults per batch of the invert stage's actor (in-process, on shard
rows), or with `--workload train` per training step (bench_train_step.py's 256 px encode step).

By default glibc returns large freed blocks to the OS, so each batch page-faults its activations back
in. Each mode runs in its own fresh process (the setting cannot be undone in a process), one after the
other, on the same seeded weights and inputs.
With `--compile` the core compiles (persistent cache, so only the first process compiles cold), as
`compile: true` inference does; the warm-up batch holds the compile.
`--huge-pages` adds a third mode: `keep_freed_memory` plus PyTorch's transparent-huge-page allocation
(`THP_MEM_ALLOC_ENABLE=1` in the child's environment: c10 aligns CPU allocations of 2 MB and more to 2 MB and
madvises them MADV_HUGEPAGE, which a kernel whose THP mode is `madvise` needs before it backs memory with huge pages).
`--rounds N` runs every mode N times, in turn, each in a fresh process, and prints each run and each mode's median:
one process's figure moves with where the kernel placed its memory.
Run: python benchmarks/bench_allocator.py [--workload invert|train] [--size 1024] [--encoder-size 256] [--batch 2]
     [--precision bf16] [--iters 4] [--compile] [--huge-pages] [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_invert import make_inputs  # noqa: E402
from common import command_line, hardware  # noqa: E402

from pipelines.params.schema import InvertConfig  # noqa: E402
from pipelines.stages.invert_actor import Inverter, read_unit  # noqa: E402
from psp_core import PSP, PSPArchitecture, save_psp  # noqa: E402
from psp_core.inference import model as inference_model  # noqa: E402
from psp_core.runtime import devices  # noqa: E402
from psp_core.training import engine  # noqa: E402


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds and mean minor page faults per batch of the invert stage's `Inverter` (decode, the
    inference core's `invert`, L2 / LPIPS / MS-SSIM, PNG encode) after one warm-up batch, in this process."""
    with tempfile.TemporaryDirectory(prefix="psp-bench-allocator-") as folder:
        root = Path(folder)
        torch.manual_seed(0)
        net = PSP(PSPArchitecture(output_size=args.size, encoder_input_size=args.encoder_size))
        net.set_latent_avg(torch.randn(512) * 0.1)
        checkpoint = save_psp(net, root / "model.pt")
        cfg = InvertConfig(model=str(checkpoint), input=make_inputs(root, args.batch * (args.iters + 1), 1000),
                           output_dir=root / "out", batch_size=args.batch, cpus_per_actor=torch.get_num_threads(),
                           lpips_backbone="random", precision=args.precision, compile=args.compile)
        inverter = Inverter(str(checkpoint), cfg.model_dump(mode="json"), "bench")
        shard = next(cfg.input.glob("*.parquet"))
        rows = read_unit(pa.table({"unit": [shard.stem], "paths": [[str(shard)]]}), shards=True, split=None,
                         columns=["id", "image", "source_path", "split"])
        return timed(lambda index: inverter(rows.slice(index * args.batch, args.batch)), args.iters)


def timed(step: Callable[[int], object], iters: int) -> dict[str, float]:
    """Median seconds and mean minor page faults of `step(i)` over `iters` calls after one warm-up call."""
    seconds, faults = [], []
    for index in range(iters + 1):
        start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step(index)
        if index:
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    return {"seconds": statistics.median(seconds), "faults": statistics.mean(faults)}


def measure_train(args: argparse.Namespace) -> dict[str, float]:
    """The same for bench_train_step.py's training step (encoder input 256, generator 256 px, eager)."""
    from bench_train_step import step_functions

    step = step_functions("full", args.precision, False, args.batch, torch.device("cpu"))["step_s"]
    return timed(lambda index: step(), args.iters)


def run_child(args: argparse.Namespace, keep: bool) -> dict[str, float]:
    """This process's figures for one mode; `keep` False stops the core and the trainer from changing glibc's
    settings (the benchmark's only departure from the product's code path)."""
    if keep:
        assert devices.keep_freed_memory(), "glibc's mallopt is not available here"
    else:
        devices.keep_freed_memory = engine.keep_freed_memory = inference_model.keep_freed_memory = lambda: False
    figures = measure_train(args) if args.workload == "train" else measure(args)
    return {**figures, "huge_mb": huge_page_megabytes()}


def huge_page_megabytes() -> float:
    """This process's anonymous memory backed by transparent huge pages now, in MB (0 where Linux does not say)."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("AnonHugePages:")), 0.0)


MODES = {"default": "glibc default", "keep": "keep_freed_memory", "huge": "keep_freed_memory + THP"}


def run_mode(mode: str) -> dict[str, float]:
    """One mode's figures from a fresh process (the allocator's settings cannot be undone in a process)."""
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if mode == "huge" else "0"}
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode], env=env,
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("invert", "train"), default="invert")
    parser.add_argument("--size", type=int, default=1024, help="generator output size (invert)")
    parser.add_argument("--encoder-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--iters", type=int, default=4, help="timed batches after one warm-up batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and the generator")
    parser.add_argument("--huge-pages", action="store_true",
                        help="add a mode with PyTorch's transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE=1)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every mode, in turn")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args, keep=args.child != "default")))
        return
    print(f"# {hardware()}; load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}\n# {command_line()}")
    modes = list(MODES) if args.huge_pages else ["default", "keep"]
    what = (f"train step 256 px, batch {args.batch}, {args.precision} eager" if args.workload == "train" else
            f"invert {args.size} px, batch {args.batch}, {args.precision}{' compiled' if args.compile else ' eager'}")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            runs[mode].append(run_mode(mode))
            print(f"{MODES[mode]:<24} {what}: {runs[mode][-1]['seconds']:.3f} s/batch, "
                  f"{runs[mode][-1]['faults']:,.0f} page faults/batch, {runs[mode][-1]['huge_mb']:,.0f} MB in huge pages",
                  flush=True)
    median = {mode: statistics.median(run["seconds"] for run in runs[mode]) for mode in modes}
    if args.rounds > 1:
        print("medians over the rounds: " + ", ".join(f"{MODES[m]} {median[m]:.3f} s/batch" for m in modes))
    print(f"keep / default: {median['default'] / median['keep']:.2f}x the images/s")
    if args.huge_pages:
        print(f"keep + huge pages / keep: {median['keep'] / median['huge']:.2f}x the images/s")


if __name__ == "__main__":
    main()
