"""pSp forward throughput (encoder + generator, images/s): output size x batch x precision x memory format.

Also reports how far bf16 autocast output is from fp32 on the same inputs.
Run: python benchmarks/bench_forward.py [--sizes 256 1024] [--batches 1 8] [--iters 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, time_per_call  # noqa: E402

from psp_core import PSP, PSPArchitecture  # noqa: E402
from psp_core.devices import autocast, to_channels_last  # noqa: E402


def build(size: int, device: torch.device) -> PSP:
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(output_size=size))
    net.set_latent_avg(torch.randn(512) * 0.1)
    return net.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# {hardware()}\n# {command_line()}")
    print("output  batch  precision  channels_last  images/s  vs fp32")
    for size in args.sizes:
        net = build(size, device)
        for batch in args.batches:
            x = torch.randn(batch, 3, 256, 256, device=device)
            baseline = None
            for channels_last in (False, True):
                model = to_channels_last(copy.deepcopy(net)) if channels_last else net
                inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                for precision in ("fp32", "bf16"):

                    def step() -> torch.Tensor:
                        with torch.inference_mode(), autocast(device, precision):
                            return model(inp, resize=False, randomize_noise=False)

                    seconds = time_per_call(step, args.iters)
                    rate = batch / seconds
                    baseline = baseline or rate
                    print(f"{size:6d}  {batch:5d}  {precision:9s}  {str(channels_last):13s}  {rate:8.2f}  {rate / baseline:6.2f}x",
                          flush=True)
            with torch.inference_mode():
                ref = net(x[:1], resize=False, randomize_noise=False).float()
                with autocast(device, "bf16"):
                    low = net(x[:1], resize=False, randomize_noise=False).float()
            err = (ref - low).abs()
            print(f"# output {size}: bf16 vs fp32 image difference: max {err.max():.4f}, mean {err.mean():.4f} "
                  f"(image range [{ref.min():.2f}, {ref.max():.2f}])", flush=True)


if __name__ == "__main__":
    main()
