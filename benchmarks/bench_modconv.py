"""StyleGAN2 modulated convolution: the reference's grouped form against the fused form, in one process.

float32 inference runs the grouped form (`ModulatedConv2d.exact`: the reference's order of operations, needed
for ReStyle's iterated parity); float32 training (the trainer turns `exact` off) and bf16 autocast run the fused
form. This measures what each choice costs, on the whole generator, per batch size (the grouped form's cost grows
with the batch: one weight per image).
Run: python benchmarks/bench_modconv.py [--size 256] [--batch 8 [16 ...]] [--iters 2] [--forward-only]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, time_per_call  # noqa: E402

from psp_core.nets.stylegan2 import Generator, ModulatedConv2d  # noqa: E402


def generate(g: Generator, w: torch.Tensor, form: str, precision: str, train: bool) -> None:
    """One generator pass (and backward when `train`) with every modulated convolution in `form`."""
    original = ModulatedConv2d.forward
    ModulatedConv2d.forward = lambda self, x, style, offset=None: getattr(self, form)(x, self.modulation(style))
    try:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"), torch.set_grad_enabled(train):
            image, _ = g([w], input_is_latent=True, randomize_noise=False)
            if train:
                image.float().mean().backward()
    finally:
        ModulatedConv2d.forward = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes, one row each")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--forward-only", action="store_true", help="only the forward rows (no fwd+bwd)")
    args = parser.parse_args()
    print(f"# {hardware()}\n# {command_line()}")
    torch.manual_seed(0)
    g = Generator(args.size).eval()
    passes = ((False, ("fp32", "bf16")),) if args.forward_only else ((False, ("fp32", "bf16")), (True, ("fp32",)))
    print("size  batch  pass      precision  fused img/s  grouped img/s  grouped/fused")
    for batch in args.batch:
        w = torch.randn(batch, g.n_latent, 512)
        for train, precisions in passes:
            for precision in precisions:
                speed = {form: batch / time_per_call(lambda: generate(g, w, form, precision, train), args.iters)
                         for form in ("fused", "grouped")}
                print(f"{args.size:4d}  {batch:5d}  {'fwd+bwd' if train else 'forward':8}  {precision:9}  "
                      f"{speed['fused']:11.2f}  {speed['grouped']:13.2f}  {speed['grouped'] / speed['fused']:12.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
