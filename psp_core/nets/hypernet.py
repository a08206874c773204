"""HyperStyle's hypernetwork: the target beside the last output -> a ResNet-34 body -> for each tuned generator layer,
per-sample offsets of that layer's convolution weight [N, out, in, k, k].

The 512->512 3x3 layers share one hypernetwork (`SharedHypernet`) behind a code head of their own; every other
tuned layer has its own head. Module names are the reference checkpoints' keys (`SharedWeightsHyperNetResNet`,
`SharedWeightsHyperNetResNetSeparable`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from psp_core.nets.encoders import ResNet34Features
from psp_core.nets.stylegan2 import EqualLinear

FEATURES = 512                  # channels of the body's last map
BODY_STRIDE = 16                # its side is the input's over 16: 16 for the reference's 256 px (its `spatial`)
SHARED_LAYERS = (0, 2, 3, 5, 6, 8, 9, 11, 12)
"""The generator layers (the 512->512 3x3 convolutions of config-f) whose offsets come from the shared hypernetwork.
In a generator of channel multiplier 1, layers 11 and 12 (64 px) are narrower: they get heads of their own."""


class LayerShape(NamedTuple):
    """A modulated convolution's weight, [out_channels, in_channels, kernel_size, kernel_size] per sample."""

    out_channels: int
    in_channels: int
    kernel_size: int


def conv_stack(in_c: int, inner_c: int, out_c: int, strides: Sequence[int]) -> nn.Sequential:
    """3x3 convolutions, each followed by a leaky ReLU (slope 0.01): in_c -> inner_c -> ... -> out_c, one per stride
    (keys 0, 2, 4, ...)."""
    widths = [in_c] + [inner_c] * (len(strides) - 1) + [out_c]
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip(widths, widths[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.LeakyReLU()]
    return nn.Sequential(*layers)


def reference_init(*shape: int) -> nn.Parameter:
    """The reference's initialisation of the shared hypernetwork: N(0, 1/40^2), folded into (-2, 2)."""
    return nn.Parameter(torch.fmod(torch.randn(*shape) / 40, 2))


class SharedHypernet(nn.Module):
    """The hypernetwork the 512->512 3x3 layers share: a code [N, z] -> a [channels, z] matrix per sample (`w2`,
    `b2`), each of whose rows maps to channels * k * k values (`w1`, `b1`) -> offsets [N, channels, channels, k, k]."""

    def __init__(self, channels: int = FEATURES, z_dim: int = FEATURES, kernel_size: int = 3):
        super().__init__()
        self.channels, self.z_dim, self.kernel_size = channels, z_dim, kernel_size
        self.w1 = reference_init(z_dim, channels * kernel_size**2)
        self.b1 = reference_init(channels * kernel_size**2)
        self.w2 = reference_init(z_dim, channels * z_dim)
        self.b2 = reference_init(channels * z_dim)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        n, k = code.shape[0], self.kernel_size
        rows = (code @ self.w2 + self.b2).view(n, self.channels, self.z_dim)   # [N, channels, z]
        kernel = rows @ self.w1 + self.b1                                        # [N, channels, channels * k * k]
        # read as [N, out, in, k, k] by reshaping, not transposing, as the reference does
        return kernel.view(n, self.channels, self.channels, k, k)


class SharedCodeHead(nn.Module):
    """A shared layer's own head (the reference's HyperRefinementBlock, whose `hypernet.*` keys are aliases of the
    shared hypernetwork's): features [N, 512, side, side] -> a 3x3 conv to `inner` channels, stride-2 convs down to
    [N, 512, 1, 1], an equalised linear layer -> the shared hypernetwork's code [N, 512]."""

    def __init__(self, feature_side: int, features: int = FEATURES, inner: int = 128):
        super().__init__()
        self.convs = conv_stack(features, inner, FEATURES, [1] + [2] * int(math.log2(feature_side)))
        self.linear = EqualLinear(FEATURES, FEATURES, lr_mul=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(features).flatten(1))


class SeparableKernel(nn.Module):
    """A [out, in, k, k] offset from a code [N, features]: per kernel tap the outer product of an out-vector and an
    in-vector (`make_kernel_out`, `make_kernel_in`), then a linear mix of the in- and of the out-channels."""

    def __init__(self, features: int, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.shape = LayerShape(out_channels, in_channels, kernel_size)
        self.make_kernel_in = nn.Linear(features, kernel_size**2 * in_channels)
        self.make_kernel_out = nn.Linear(features, kernel_size**2 * out_channels)
        self.kernel_linear_in = nn.Linear(in_channels, in_channels)
        self.kernel_linear_out = nn.Linear(out_channels, out_channels)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        out_c, in_c, k = self.shape
        code = code.flatten(1)
        k_in = self.make_kernel_in(code).view(-1, k, k, 1, in_c)
        k_out = self.make_kernel_out(code).view(-1, k, k, out_c, 1)
        kernel = self.kernel_linear_in(k_out @ k_in).transpose(3, 4)   # [N, k, k, in, out], in-channels mixed
        return self.kernel_linear_out(kernel).permute(0, 4, 3, 1, 2)    # [N, out, in, k, k], out-channels mixed


class LayerHead(nn.Module):
    """A non-shared layer's own head (the reference's RefinementBlock): stride-2 3x3 convs over the features [N, 512,
    side, side], then a 1x1 conv to out * in values. A 3x3 layer's map (2x2) is averaged first and each value repeated
    over the kernel taps; a toRGB (1x1) layer's convs go down to 1x1."""

    def __init__(self, shape: LayerShape, feature_side: int, features: int = FEATURES, inner: int = 256):
        super().__init__()
        self.shape = LayerShape(*shape)
        self.convs = conv_stack(features, inner, FEATURES, [2] * self.n_convs(feature_side))
        self.output = self.make_output()

    def n_convs(self, feature_side: int) -> int:
        halvings = int(math.log2(feature_side))
        return halvings if self.shape.kernel_size == 1 else halvings - 1

    def make_output(self) -> nn.Sequential:
        project = nn.Conv2d(FEATURES, self.shape.out_channels * self.shape.in_channels, 1)
        if self.shape.kernel_size == 1:
            return nn.Sequential(project)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), project)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out_c, in_c, k = self.shape
        offsets = self.output(self.convs(features)).view(-1, out_c, in_c, 1, 1)   # [N, out, in, 1, 1]
        return offsets.repeat(1, 1, 1, k, k)


class SeparableLayerHead(LayerHead):
    """A non-shared layer's head in the separable hypernetwork (the reference's RefinementBlockSeparable): stride-2
    3x3 convs down to 1x1, then a `SeparableKernel` for a 3x3 layer, or LayerHead's 1x1 conv for a toRGB."""

    def n_convs(self, feature_side: int) -> int:
        return int(math.log2(feature_side))

    def make_output(self) -> nn.Sequential:
        if self.shape.kernel_size == 1:
            return super().make_output()
        out_c, in_c, k = self.shape
        return nn.Sequential(SeparableKernel(FEATURES, in_c, out_c, k))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.shape.kernel_size == 1:
            return super().forward(features)
        return self.output(self.convs(features))


class HyperNetwork(ResNet34Features):
    """HyperStyle's hypernetwork (`SharedWeightsHyperNetResNet`): target and last output [N, 6, E, E] -> ResNet-34
    body [N, 512, E/16, E/16] -> one offset [N, out, in, k, k] per generator layer in `layers_to_tune`, None for the
    rest. `layer_shapes` are the generator's modulated convolutions in order (`Generator.modulated_convs`); E is
    `input_side` (256 in the reference)."""

    head_type: type[LayerHead] = LayerHead

    def __init__(self, input_nc: int, layer_shapes: Sequence[LayerShape], layers_to_tune: Sequence[int],
                 input_side: int):
        super().__init__(input_nc=input_nc)
        self.input_nc, self.input_side = input_nc, input_side
        feature_side = input_side // BODY_STRIDE
        self.layer_shapes = [LayerShape(*shape) for shape in layer_shapes]
        self.shared_layers = tuple(layer for layer in SHARED_LAYERS if layer < len(self.layer_shapes)
                                   and self.layer_shapes[layer] == (FEATURES, FEATURES, 3))
        self.shared_weight_hypernet = SharedHypernet()
        self.refinement_blocks = nn.ModuleDict()
        for layer in layers_to_tune:
            if layer in self.shared_layers:
                self.refinement_blocks[str(layer)] = SharedCodeHead(feature_side)
            else:
                self.refinement_blocks[str(layer)] = self.head_type(self.layer_shapes[layer], feature_side)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        side = self.input_side
        assert x.shape[1:] == (self.input_nc, side, side), \
            f"hypernetwork input {list(x.shape)}, expected [N, {self.input_nc}, {side}, {side}]"
        features = self.body(self.stem(x))                                      # [N, 512, side / 16, side / 16]
        offsets: list[torch.Tensor | None] = [None] * len(self.layer_shapes)
        for name, head in self.refinement_blocks.items():
            layer = int(name)
            out = head(features)
            offsets[layer] = self.shared_weight_hypernet(out) if layer in self.shared_layers else out
        return offsets

    def shared_alias_prefixes(self) -> list[str]:
        """Where a released file repeats the shared hypernetwork's tensors: `refinement_blocks.N.hypernet.` for every
        tuned shared layer N (the reference registers the one module under each of its heads too)."""
        return [f"refinement_blocks.{name}.hypernet." for name in self.refinement_blocks
                if int(name) in self.shared_layers]


class SeparableHyperNetwork(HyperNetwork):
    """HyperStyle's separable hypernetwork (`SharedWeightsHyperNetResNetSeparable`): HyperNetwork with
    `SeparableLayerHead`s for the non-shared layers."""

    head_type = SeparableLayerHead


HYPERNETS: dict[str, type[HyperNetwork]] = {"SharedWeightsHyperNetResNet": HyperNetwork,
                                            "SharedWeightsHyperNetResNetSeparable": SeparableHyperNetwork}
"""Hypernetwork classes by the checkpoint's `encoder_type` (the `hyperstyle` family of `options.FAMILY_ENCODERS`)."""
