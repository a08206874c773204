"""StyleGAN2 generator in the layout of the public PyTorch checkpoints (`g_ema` of
`stylegan2-ffhq-config-f.pt`): mapping network, modulated convolutions, noise, ToRGB skips."""
from __future__ import annotations

import math
import random
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from psp_core.nets.ops import FusedLeakyReLU, fused_leaky_relu, make_kernel, upfirdn2d

BLUR_TAPS = (1, 3, 3, 1)


class PixelNorm(nn.Module):
    """Normalise each vector to unit root-mean-square (the mapping network's input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2x FIR upsampling of the ToRGB skip path (state-dict key: `kernel`)."""

    def __init__(self, taps: Sequence[float] = BLUR_TAPS, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(list(taps)) * factor**2)
        p = len(taps) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass filter applied after a transposed (upsampling) convolution."""

    def __init__(self, taps: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(list(taps)) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored at N(0, 1/lr_mul), scaled at run time."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled per sample by a style, then (optionally)
    demodulated to unit output variance; optionally with 2x up- or downsampling.

    Two forms of the same function. `exact` (the default: loading, inference, the parity tests) runs float32
    as the reference does, a grouped convolution with the per-sample weight w * s * d, so outputs match the
    reference to its rounding (which matters where outputs are fed back, as in ReStyle's refinement: a 1e-5
    difference grows about tenfold per iteration). Otherwise, and always under bf16/fp16, it runs as
    conv(x * s, w) * d, one ordinary convolution (1.32x faster in bf16 on a 2-core AVX-512 CPU; in float32
    the exact form costs ~9 % at 256 px, but a 16 px generator's forward and backward pass 2.3x at batch 2 and
    6.6x at batch 8: benchmarks/bench_modconv.py). Training needs no reference rounding: the trainer switches its networks
    to the fused form (`use_exact_modulation(net, False)`).

    An `offset` [N, out, in, k, k] (HyperStyle's) scales the weight per sample, w * (1 + offset), before modulation
    and demodulation; a per-sample weight runs in the grouped form whatever `exact` says.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, downsample: bool = False,
                 blur_taps: Sequence[float] = BLUR_TAPS):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.downsample, self.demodulate = upsample, downsample, demodulate
        factor = 2
        if upsample:
            p = (len(blur_taps) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_taps, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            p = (len(blur_taps) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_taps, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.exact = True

    def forward(self, x: torch.Tensor, style: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        style = self.modulation(style)                                  # [N, in_channel]
        if offset is not None or (self.exact and x.dtype == torch.float32
                                  and not torch.is_autocast_enabled(x.device.type)):
            return self.grouped(x, style, offset)
        return self.fused(x, style)

    def grouped(self, x: torch.Tensor, style: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's form: one [out, in, k, k] weight per sample, as a convolution with N groups; with an
        `offset` [N, out, in, k, k], the weight w * (1 + offset) (HyperStyle's order of operations)."""
        batch, k = x.shape[0], self.kernel_size
        style = style.view(batch, 1, self.in_channel, 1, 1)
        if offset is None:
            weight = self.scale * self.weight * style                                        # [N, out, in, k, k]
        else:
            assert offset.shape == (batch, *self.weight.shape[1:]), \
                f"weight offset {list(offset.shape)} for {batch} weights {list(self.weight.shape[1:])}"
            weight = self.scale * (self.weight * (1 + offset) * style)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum((2, 3, 4)) + 1e-8).view(batch, self.out_channel, 1, 1, 1)
        if self.downsample:
            x = self.blur(x)
        x = x.reshape(1, batch * self.in_channel, *x.shape[2:])
        weight = weight.to(x.dtype)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * self.in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=batch)
        else:
            out = F.conv2d(x, weight.reshape(batch * self.out_channel, self.in_channel, k, k),
                           stride=2 if self.downsample else 1, padding=0 if self.downsample else self.padding,
                           groups=batch)
        out = out.view(batch, self.out_channel, *out.shape[2:])
        return self.blur(out) if self.upsample else out

    def fused(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """conv(x * s, w) * d: the same function as one ordinary convolution (the reduced-precision path)."""
        weight = (self.weight[0] * self.scale).to(x.dtype)
        x = x * style.to(x.dtype)[:, :, None, None]
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        elif self.downsample:
            out = F.conv2d(self.blur(x), weight, stride=2)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            energy = (style.float() ** 2) @ (self.weight[0] * self.scale).pow(2).sum((2, 3)).t()
            out = out * torch.rsqrt(energy + 1e-8).to(out.dtype)[:, :, None, None]
        return out


def use_exact_modulation(module: nn.Module, exact: bool) -> nn.Module:
    """Set which form every modulated convolution in `module` runs in float32: the reference's (`exact`) or the
    fused one (see `ModulatedConv2d`); returns `module`."""
    for conv in module.modules():
        if isinstance(conv, ModulatedConv2d):
            conv.exact = exact
    return module


class NoiseInjection(nn.Module):
    """Add per-pixel noise with a learned per-layer strength (state-dict key: `weight`)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            n, _, h, w = image.shape
            noise = image.new_empty(n, 1, h, w).normal_()
        return image + self.weight.to(image.dtype) * noise.to(image.dtype)


class ConstantInput(nn.Module):
    """The learned 4x4 constant the synthesis network starts from (state-dict key: `input`)."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated convolution, noise injection, bias and leaky ReLU (clamped to +-`clamp` if given): one
    synthesis layer."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_taps: Sequence[float] = BLUR_TAPS, clamp: float | None = None):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample, blur_taps=blur_taps)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel, clamp)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style, offset), noise))


class ToRGB(nn.Module):
    """1x1 modulated convolution to RGB (clamped to +-`clamp` if given), added to the upsampled RGB of the
    previous resolution."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_taps: Sequence[float] = BLUR_TAPS, clamp: float | None = None):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_taps)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.clamp = clamp

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style, offset) + self.bias.to(x.dtype)
        if self.clamp is not None:
            out = out.clamp(-self.clamp, self.clamp)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def channels_for(size: int, channel_multiplier: int) -> dict[int, int]:
    """Feature channels per resolution of the config-f generator."""
    wide = {4: 512, 8: 512, 16: 512, 32: 512}
    narrow = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return {**wide, **{r: c * channel_multiplier for r, c in narrow.items()}}


def generator_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Size, style_dim, n_mlp and channel multiplier of a `g_ema` state dict, read from its tensors (the multiplier
    from the width of the first 64 px layer, `convs.6`)."""
    n_rgbs = sum(1 for k in state if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    size = 2 ** (n_rgbs + 2)
    n_mlp = sum(1 for k in state if re.fullmatch(r"style\.\d+\.weight", k))
    style_dim = state["conv1.conv.modulation.weight"].shape[1] if "conv1.conv.modulation.weight" in state else 512
    multiplier = 2
    if size >= 64 and "convs.6.conv.weight" in state:
        multiplier = max(1, state["convs.6.conv.weight"].shape[1] // channels_for(64, 1)[64])
    return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_multiplier": multiplier}


class Generator(nn.Module):
    """StyleGAN2 generator: z -> (mapping) -> W -> (synthesis, one style per layer) -> image.

    `forward(styles, ...)` keeps the reference signature: `styles` is a list of one or two
    codes (z, or w / W+ with `input_is_latent=True`); two codes mix at `inject_index`. `weight_offsets`
    (HyperStyle's) holds one per-sample offset [N, out, in, k, k] or None per modulated convolution, in the
    order of `modulated_convs()`.
    `conv_clamp` (None in the rosinality generators) clamps every synthesis layer's and ToRGB's output
    to +-conv_clamp, as StyleGAN2-ADA's generators do (see `set_conv_clamp`).
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 lr_mlp: float = 0.01, blur_taps: Sequence[float] = BLUR_TAPS, conv_clamp: float | None = None):
        super().__init__()
        if size < 4 or size & (size - 1) or size > 1024:
            raise ValueError(f"generator size must be a power of two in 4..1024, got {size}")
        self.size, self.style_dim = size, style_dim
        self.style = nn.Sequential(
            PixelNorm(), *(EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)))
        self.channels = channels_for(size, channel_multiplier)
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_taps=blur_taps)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer in range(self.num_layers):
            res = 2 ** ((layer + 5) // 2)
            self.noises.register_buffer(f"noise_{layer}", torch.randn(1, 1, res, res))
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_taps=blur_taps))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_taps=blur_taps))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_taps=blur_taps))
            in_channel = out_channel
        self.set_conv_clamp(conv_clamp)

    def set_conv_clamp(self, conv_clamp: float | None) -> None:
        """Clamp each synthesis layer's activation and each ToRGB's output to +-conv_clamp (None: no clamp);
        an attribute, not a state-dict entry, so a generator file records it beside `g_ema`."""
        self.conv_clamp = None if conv_clamp is None else float(conv_clamp)
        for module in self.modules():
            if isinstance(module, (FusedLeakyReLU, ToRGB)):
                module.clamp = self.conv_clamp

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Map z to w through the mapping network."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n_latent: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Average w over `n_latent` random z ([1, style_dim]); pass a seeded `generator` to make it repeatable."""
        device = self.input.input.device
        z = torch.randn(n_latent, self.style_dim, generator=generator).to(device)
        return self.style(z).mean(0, keepdim=True)

    def stored_noise(self) -> list[torch.Tensor]:
        """The fixed per-layer noise maps saved with the checkpoint."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def forward(self, styles: list[torch.Tensor], return_latents: bool = False, inject_index: int | None = None,
                truncation: float = 1.0, truncation_latent: torch.Tensor | None = None,
                input_is_latent: bool = False, noise: list[torch.Tensor | None] | None = None,
                randomize_noise: bool = True, weight_offsets: Sequence[torch.Tensor | None] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.stored_noise()
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        latent = self.broadcast_styles(styles, inject_index)
        n_convs = len(self.convs) + len(self.to_rgbs) + 2
        if weight_offsets is not None and len(weight_offsets) != n_convs:
            raise ValueError(f"weight_offsets has {len(weight_offsets)} entries, the generator {n_convs} "
                             "modulated convolutions")
        offsets = iter(weight_offsets if weight_offsets is not None else [None] * n_convs)

        out = self.input(latent.shape[0])
        out = self.conv1(out, latent[:, 0], noise=noise[0], offset=next(offsets))
        skip = self.to_rgb1(out, latent[:, 1], offset=next(offsets))
        i = 1
        for up_conv, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            out = up_conv(out, latent[:, i], noise=noise[i], offset=next(offsets))
            out = conv(out, latent[:, i + 1], noise=noise[i + 1], offset=next(offsets))
            skip = to_rgb(out, latent[:, i + 2], skip, offset=next(offsets))
            i += 2
        return skip, (latent if return_latents else None)

    def modulated_convs(self) -> list[ModulatedConv2d]:
        """Every modulated convolution in the order the image flows through them (conv1, to_rgb1, then per
        resolution the upsampling conv, the conv and the ToRGB): HyperStyle's layer indices."""
        layers = [self.conv1.conv, self.to_rgb1.conv]
        for up_conv, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            layers += [up_conv.conv, conv.conv, to_rgb.conv]
        return layers

    def broadcast_styles(self, styles: list[torch.Tensor], inject_index: int | None) -> torch.Tensor:
        """One code -> W+ [N, n_latent, dim] (a W+ code passes through); two codes -> style mixing
        with the first driving layers [0, inject_index) (random index when None)."""
        if len(styles) < 2:
            return styles[0] if styles[0].ndim == 3 else styles[0].unsqueeze(1).repeat(1, self.n_latent, 1)
        if inject_index is None:
            inject_index = random.randint(1, self.n_latent - 1)
        first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
        second = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
        return torch.cat([first, second], 1)
