"""The two custom StyleGAN2 operations, as plain differentiable PyTorch ops (no compiled extensions).

`upfirdn2d` (upsample, FIR filter, downsample) and `fused_leaky_relu` (bias + leaky ReLU + gain)
compute the same function as the CUDA kernels of the reference code, on any device and dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2.0)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = LRELU_GAIN) -> torch.Tensor:
    """Add a per-channel bias (channel dim 1), apply leaky ReLU and multiply by `scale`."""
    shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Learned bias followed by the scaled leaky ReLU (state-dict key: `bias`), the result optionally clamped
    to +-`clamp` (StyleGAN2-ADA's `conv_clamp`; not part of the state dict)."""

    def __init__(self, channels: int, clamp: float | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fused_leaky_relu(x, self.bias)
        return out if self.clamp is None else out.clamp(-self.clamp, self.clamp)

    def extra_repr(self) -> str:
        return "" if self.clamp is None else f"clamp={self.clamp:g}"


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Zero-insert upsample by `up`, pad (negative crops), convolve with the 2-D FIR `kernel`
    (true convolution: the kernel is flipped), then keep every `down`-th pixel."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, (0, 1)).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def make_kernel(taps: list[float]) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D kernel (sums to 1)."""
    k = torch.tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()
