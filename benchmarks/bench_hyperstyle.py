"""HyperStyle's inference cost on the inference core (`InferenceModel`, what invert, edit and the pyfunc run), beside
ReStyle-pSp's at the same sizes: seconds per image at 1, 3 and 5 iterations, what `psp edit` pays per image to
recompute the weight offsets it does not store and per edited image to decode with them, bf16's error against fp32,
and the peak memory of an inversion at several batch sizes (each in its own process: the peak resident set while
inverting, Linux's VmHWM reset after the model is loaded). With `--compile`, each eager row is followed by the same
network compiled (`InferenceModel(compile=True)`: W encoder or encoder, hypernetwork, generator; the untimed warm-up
call compiles, into a fresh cache so that nothing is read from an earlier run).

Both networks have the released architectures (HyperStyle: SharedWeightsHyperNetResNet, the default 17 tuned layers
of a 1024 px generator, the IR-SE50 W encoder; ReStyle-pSp: BackboneEncoder) with random weights: the cost of a
forward pass does not depend on the values.
Run: python benchmarks/bench_hyperstyle.py [--sizes 256 1024] [--batch 1] [--iters 1 3 5] [--precisions fp32 bf16]
     [--compile] [--memory-batches 1 2 4] [--memory-size 1024] [--memory-iters 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware  # noqa: E402

from psp_core import PSP, HyperStyle, HyperStyleArchitecture, PSPArchitecture  # noqa: E402
from psp_core.inference import InferenceModel  # noqa: E402
from psp_core.runtime.devices import keep_freed_memory  # noqa: E402


def hyperstyle(size: int, precision: str, compile_cache: Path | None = None) -> InferenceModel:
    """The released HyperStyle architecture at `size` px, random weights, on the inference core (compiled into
    `compile_cache` when one is given)."""
    torch.manual_seed(0)
    net = HyperStyle(HyperStyleArchitecture(output_size=size))
    net.set_latent_avg(torch.randn(512) * 0.1)
    return InferenceModel(net, "encode", "cpu", precision, compile_cache is not None, compile_cache)


def restyle(size: int, precision: str, compile_cache: Path | None = None) -> InferenceModel:
    """ReStyle-pSp (BackboneEncoder, target + last output in) at `size` px, random weights, on the inference core
    (compiled into `compile_cache` when one is given)."""
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(encoder_type="BackboneEncoder", family="restyle_psp", input_nc=6, output_size=size))
    net.set_latent_avg(torch.randn(net.n_styles, 512) * 0.1)
    return InferenceModel(net, "encode", "cpu", precision, compile_cache is not None, compile_cache)


def seconds(fn, repeats: int) -> float:
    """Median wall seconds of `fn` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timing_row(name: str, model: InferenceModel, images: torch.Tensor, args: argparse.Namespace) -> str:
    """One table row: seconds per image at each iteration count, of a plain decode and of a decode with offsets."""
    final = model.invert(images, 1)[-1]   # untimed: oneDNN primitives and the allocator warm up (compiled: compiles)
    model.decode(final.latents, final.offsets)
    model.decode(final.latents)
    per_iter = [seconds(lambda n=n: model.invert(images, n), args.repeats) / len(images) for n in args.iters]
    plain = seconds(lambda: model.decode(final.latents), args.repeats) / len(images)
    with_offsets = "" if final.offsets is None else \
        f"{seconds(lambda: model.decode(final.latents, final.offsets), args.repeats) / len(images):.2f}"
    label = f"{name}, compiled" if model.compiled else name
    return (f"| {model.net.arch.output_size} | {model.precision} | {label} | "
            + " | ".join(f"{s:.2f}" for s in per_iter) + f" | {plain:.2f} | {with_offsets} |")


def timing_rows(args: argparse.Namespace) -> None:
    """Seconds per image of each encoder at each size, precision and iteration count; HyperStyle's edit costs."""
    print("| size | precision | encoder | " + " | ".join(f"{n} iter s/image" for n in args.iters)
          + " | decode s/image | decode with offsets s/image |")
    print("|---" * (5 + len(args.iters)) + "|")
    images = torch.rand(args.batch, 3, 256, 256) * 2 - 1
    for size in args.sizes:
        for precision in args.precisions:
            for name, build in (("HyperStyle", hyperstyle), ("ReStyle-pSp", restyle)):
                print(timing_row(name, build(size, precision), images, args), flush=True)
                if args.compile:
                    with tempfile.TemporaryDirectory(prefix="psp-bench-compile-") as cache:
                        print(timing_row(name, build(size, precision, Path(cache)), images, args), flush=True)
                    torch.compiler.reset()


def bf16_error(args: argparse.Namespace) -> None:
    """HyperStyle's images in bf16 against fp32 (the same weights and inputs), at each iteration."""
    size, n_iters = min(args.sizes), max(args.iters)
    images = torch.rand(args.batch, 3, 256, 256) * 2 - 1
    reference = [step.images.float() for step in hyperstyle(size, "fp32").invert(images, n_iters)]
    ours = [step.images.float() for step in hyperstyle(size, "bf16").invert(images, n_iters)]
    errors = ", ".join(f"iteration {t + 1}: mean {(a - b).abs().mean():.4f} max {(a - b).abs().max():.3f}"
                       for t, (a, b) in enumerate(zip(reference, ours)))
    print(f"bf16 against fp32, HyperStyle {size} px images in [-1, 1]: {errors}")


def peak_memory(args: argparse.Namespace) -> None:
    """Peak resident memory of a HyperStyle inversion per batch size, each in a fresh process."""
    for batch in args.memory_batches:
        out = subprocess.run([sys.executable, __file__, "--child-batch", str(batch), "--memory-size",
                              str(args.memory_size), "--memory-iters", str(args.memory_iters)],
                             capture_output=True, text=True, check=True).stdout.split()
        loaded, peak = float(out[0]), float(out[1])
        print(f"HyperStyle {args.memory_size} px fp32, batch {batch}, {args.memory_iters} iterations: peak "
              f"{peak:.2f} GiB resident while inverting ({loaded:.2f} GiB with the model loaded)", flush=True)


def child(args: argparse.Namespace) -> None:
    """Load, then invert one batch: prints the resident set with the model loaded and the peak while inverting (the
    peak counter is reset after loading, so building the random weights does not count), in GiB."""
    model = hyperstyle(args.memory_size, "fp32")
    loaded = resident_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM, the peak, to the current resident set
    model.invert(torch.rand(args.child_batch, 3, 256, 256) * 2 - 1, args.memory_iters)
    print(loaded, resident_gib("VmHWM"))


def resident_gib(field: str) -> float:
    """A resident-memory field of /proc/self/status (VmRSS: now; VmHWM: the peak) in GiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024], help="generator output sizes to time")
    parser.add_argument("--batch", type=int, default=1, help="images per call in the timing rows")
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 3, 5], help="iteration counts to time")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per figure (median)")
    parser.add_argument("--compile", action="store_true", help="also time each network compiled, after its eager row")
    parser.add_argument("--memory-batches", type=int, nargs="*", default=[1, 2, 4], help="none: skip the memory rows")
    parser.add_argument("--memory-size", type=int, default=1024)
    parser.add_argument("--memory-iters", type=int, default=2,
                        help="iterations of the memory runs (the peak is reached once old and new offsets coexist)")
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep_freed_memory()   # as the stages' processes have it before their first model
    if args.child_batch:
        child(args)
        return
    print(f"# {hardware()}\n# {command_line()}")
    timing_rows(args)
    bf16_error(args)
    peak_memory(args)


if __name__ == "__main__":
    main()
