"""The reference pSp (eladrich/pixel2style2pixel) on this machine: the baseline of bench_forward's `--reference`.

The reference is imported from a clone the user names; nothing of it is copied here. Its StyleGAN2 ops build CUDA
kernels when imported, so on a CPU this harness imports them with the kernel build stubbed out and runs the two
ops on the CPU: upfirdn2d through the reference's own `upfirdn2d_native` (given the `F` it calls, which its file
never imports), and the fused leaky ReLU by its definition (add the bias, leaky ReLU with slope 0.2, times
sqrt(2): psp_core's `fused_leaky_relu`, elementwise), as the reference's successors do on a CPU.
The pSp forward is the reference's `pSp.forward` at `resize=False`, stored noise: the GradualStyleEncoder's codes
plus `latent_avg`, then the generator. Before timing, the same weights loaded into psp_core's PSP must give the
same images (within the parity tolerance), so the harness is checked to compute the reference's function.

    python benchmarks/bench_reference.py --reference PATH [--sizes 1024] [--batches 2] [--iters 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import ENCODER_INPUT  # noqa: E402
from common import command_line, hardware, time_per_call  # noqa: E402

from psp_core import PSP, PSPArchitecture  # noqa: E402
from psp_core.nets.ops import fused_leaky_relu  # noqa: E402
from psp_core.options import n_styles_for  # noqa: E402


def import_reference(root: Path) -> SimpleNamespace:
    """The reference's encoder and generator classes, imported from the clone at `root` with its ops on the CPU."""
    if not (root / "models" / "stylegan2" / "op" / "upfirdn2d.py").is_file():
        raise SystemExit(f"bench_reference: error: {root} is not a clone of eladrich/pixel2style2pixel "
                         "(no models/stylegan2/op/upfirdn2d.py)")
    sys.path.insert(0, str(root))
    import torch.utils.cpp_extension as cpp_extension

    build = cpp_extension.load
    cpp_extension.load = lambda *args, **kwargs: None   # the CUDA kernels: not built, their callers replaced below
    try:
        import models.stylegan2.op as op
    finally:
        cpp_extension.load = build
    upfirdn_module = sys.modules["models.stylegan2.op.upfirdn2d"]
    upfirdn_module.F = F   # its `upfirdn2d_native` calls F.pad, a name that file never imports (it never ran there)
    native = upfirdn_module.upfirdn2d_native

    def upfirdn2d(input: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
                  pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
        batch, channels, height, width = input.shape   # the reference's kernel call: every channel a plane
        out = native(input.reshape(-1, height, width, 1), kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])
        return out.reshape(batch, channels, out.shape[1], out.shape[2])

    sys.modules["models.stylegan2.op.fused_act"].fused_leaky_relu = fused_leaky_relu   # FusedLeakyReLU's call
    op.fused_leaky_relu, op.upfirdn2d = fused_leaky_relu, upfirdn2d
    from models.encoders.psp_encoders import GradualStyleEncoder
    from models.stylegan2.model import Generator
    return SimpleNamespace(GradualStyleEncoder=GradualStyleEncoder, Generator=Generator)


class ReferencePSP(nn.Module):
    """The reference pSp's inference forward (`pSp.forward(x, resize=False, randomize_noise=False)`), built from
    its own encoder and generator classes with seeded random weights."""

    def __init__(self, reference: SimpleNamespace, size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        opts = SimpleNamespace(input_nc=3, n_styles=n_styles_for(size))
        self.encoder = reference.GradualStyleEncoder(50, "ir_se", opts)
        self.decoder = reference.Generator(size, 512, 8)
        self.latent_avg = torch.randn(512) * 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encoder(x) + self.latent_avg.repeat(x.shape[0], self.encoder.style_count, 1)
        images, _ = self.decoder([codes], input_is_latent=True, randomize_noise=False)
        return images


def same_network_in_psp_core(reference: ReferencePSP, size: int) -> PSP:
    """psp_core's PSP with the reference network's weights, loaded strictly."""
    net = PSP(PSPArchitecture(output_size=size))
    net.load_state_dict(reference.state_dict(), strict=True)
    net.set_latent_avg(reference.latent_avg)
    return net.eval()


def check_against_psp_core(reference: ReferencePSP, size: int) -> float:
    """The largest difference between the reference's images and psp_core's on the same weights and input, as a
    fraction of the parity tolerance (1e-4 x the image's magnitude); above 1 the harness is refused."""
    ours = same_network_in_psp_core(reference, size)
    x = torch.randn(1, 3, ENCODER_INPUT, ENCODER_INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        images = ours(x, resize=False, randomize_noise=False)
    error = float((images - expected).abs().max()) / (1e-4 * max(1.0, float(expected.abs().max())))
    if error > 1:
        raise SystemExit(f"bench_reference: error: psp_core and the reference differ by {error:.1f}x the parity "
                         f"tolerance at {size} px: the harness does not run the reference's function")
    return error


def reference_step(net: ReferencePSP, batch: int) -> Callable[[], torch.Tensor]:
    """One reference forward of a `batch` of 256 px inputs (fp32, no grad, as its inference script), ready to time."""
    x = torch.randn(batch, 3, ENCODER_INPUT, ENCODER_INPUT, generator=torch.Generator().manual_seed(0))

    def step() -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a clone of eladrich/pixel2style2pixel")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[2])
    parser.add_argument("--iters", type=int, default=3, help="timed calls (median) after one warm-up")
    args = parser.parse_args()
    print(f"# {hardware()}\n# {command_line()}")
    print("output  batch  reference images/s  psp_core check (x parity tolerance)")
    for size in args.sizes:
        net = ReferencePSP(import_reference(args.reference), size).eval()
        check = check_against_psp_core(net, size)
        for batch in args.batches:
            step = reference_step(net, batch)
            print(f"{size:6d}  {batch:5d}  {batch / time_per_call(step, args.iters):18.3f}  {check:.3f}", flush=True)


if __name__ == "__main__":
    main()
