"""A convolution with a weight per image against one shared weight, at the StyleGAN2 generator's layer shapes.

HyperStyle decodes every image with its own weight offsets, and the float32 modulated convolution of the
reference's order of operations has a weight per image too: both run as one grouped convolution (`groups=N`,
`ModulatedConv2d.grouped`). This times, per layer shape and batch, that grouped convolution, the other correct
way to apply per-image weights (a loop of ordinary convolutions, one image each, concatenated) and an ordinary
convolution with one weight for the whole batch (what a shared weight costs, the bound), and checks that the two
per-image forms give the same output. With `--compile` every form runs through `torch.compile` (Inductor; the
cache of compiled graphs emptied before each row, so that no row reuses another's or falls back to eager), and the
seconds its first calls spent compiling are printed beside the row.
Run: python benchmarks/bench_per_sample_conv.py [--layers 512x64 256x128 128x256 64x512] [--batch 1 4 8]
         [--precisions fp32 bf16] [--iters 3] [--compile]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, time_per_call  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def forms(x: torch.Tensor, weights: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The three ways to convolve x [N, C, H, W] (3x3, padding 1): per-image weights [N, C, C, 3, 3] as one grouped
    convolution or as a loop, and the first image's weight shared by the batch."""
    batch, channels, height, width = x.shape
    return {
        "grouped": lambda: F.conv2d(x.reshape(1, batch * channels, height, width),
                                    weights.reshape(batch * channels, channels, 3, 3), padding=1,
                                    groups=batch).view(batch, channels, height, width),
        "loop": lambda: torch.cat([F.conv2d(x[i:i + 1], weights[i], padding=1) for i in range(batch)]),
        "shared": lambda: F.conv2d(x, weights[0], padding=1),
    }


def compiled(calls: dict[str, Callable[[], torch.Tensor]]) -> tuple[dict[str, Callable[[], torch.Tensor]], float]:
    """Each form through `torch.compile`, compiled by one call here: (the compiled forms, seconds spent compiling).
    Dynamo's cache is emptied first: the forms are the same code for every row, and a code object recompiled past
    its cache limit would run eager without a word."""
    torch._dynamo.reset()
    ready = {name: torch.compile(call, dynamic=False) for name, call in calls.items()}
    started = time.perf_counter()
    for call in ready.values():
        call()
    return ready, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["512x64", "256x128", "128x256", "64x512"],
                        help="CHANNELSxSIDE of each layer (the 1024 px generator's 3x3 layers by default)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="time every form compiled by torch.compile (Inductor)")
    args = parser.parse_args()
    print(f"# {hardware()}\n# {command_line()}")
    print(f"{'compiled' if args.compile else 'eager'}; time ratios: grouped/shared (the per-image weights' cost), "
          "loop/grouped (the other form against it)")
    print("layer     batch  precision  grouped ms  loop ms  shared ms  grouped/shared  loop/grouped  same output"
          + ("  compile s" if args.compile else ""))
    for layer in args.layers:
        channels, side = (int(v) for v in layer.split("x"))
        for batch in args.batch:
            for precision in args.precisions:
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(batch, channels, side, side, generator=generator).to(DTYPES[precision])
                weights = torch.randn(batch, channels, channels, 3, 3, generator=generator).to(DTYPES[precision])
                with torch.inference_mode():
                    calls = forms(x, weights)
                    compile_s = None
                    if args.compile:
                        calls, compile_s = compiled(calls)
                    ms = {name: 1000 * time_per_call(call, args.iters) for name, call in calls.items()}
                    same = torch.equal(calls["grouped"](), calls["loop"]())
                print(f"{layer:8s}  {batch:5d}  {precision:9s}  {ms['grouped']:10.1f}  {ms['loop']:7.1f}  "
                      f"{ms['shared']:9.1f}  {ms['grouped'] / ms['shared']:13.2f}x  {ms['loop'] / ms['grouped']:11.2f}x"
                      f"  {str(same):11s}" + (f"  {compile_s:9.1f}" if compile_s is not None else ""), flush=True)


if __name__ == "__main__":
    main()
