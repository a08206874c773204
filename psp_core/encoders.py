"""The three pSp encoders: an IR-SE body mapping an image to W+ (or W) codes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from psp_core.irse import input_layer, residual_body
from psp_core.stylegan2 import EqualLinear

COARSE_STYLES = 3   # styles [0, 3) come from the coarsest feature map
MIDDLE_STYLES = 7   # styles [3, 7) from the middle one; the rest from the finest


class GradualStyleBlock(nn.Module):
    """map2style: strided 3x3 convs shrink a `spatial` x `spatial` map to 1x1, then a linear layer."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        layers: list[nn.Module] = [nn.Conv2d(in_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(math.log2(spatial)) - 1):
            layers += [nn.Conv2d(out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_c))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-down pathway of the feature pyramid: bilinear-resize `x` to `y` and add."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class GradualStyleEncoder(nn.Module):
    """pSp's feature-pyramid encoder: coarse styles from the 1/16 map, medium from the 1/8
    pyramid level, fine from the 1/4 level (16/32/64 px at the reference input of 256)."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3,
                 n_styles: int = 18, input_size: int = 256):
        super().__init__()
        if input_size < 32 or input_size & (input_size - 1):
            raise ValueError(f"encoder input size must be a power of two >= 32, got {input_size}")
        self.input_layer = input_layer(input_nc)
        self.body, stage_ends = residual_body(num_layers, mode)
        self.taps = stage_ends[1:]   # outputs at 1/4 (128 ch), 1/8 (256 ch), 1/16 (512 ch)
        self.styles = nn.ModuleList()
        for i in range(n_styles):
            spatial = input_size // (16 if i < COARSE_STYLES else 8 if i < MIDDLE_STYLES else 4)
            self.styles.append(GradualStyleBlock(512, 512, spatial))
        self.latlayer1 = nn.Conv2d(256, 512, 1)
        self.latlayer2 = nn.Conv2d(128, 512, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        features = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                features.append(x)
        c1, c2, c3 = features
        styles = [style(c3) for style in self.styles[:COARSE_STYLES]]
        if len(self.styles) > COARSE_STYLES:
            p2 = upsample_add(c3, self.latlayer1(c2))
            styles += [style(p2) for style in self.styles[COARSE_STYLES:MIDDLE_STYLES]]
        if len(self.styles) > MIDDLE_STYLES:
            p1 = upsample_add(p2, self.latlayer2(c1))
            styles += [style(p1) for style in self.styles[MIDDLE_STYLES:]]
        return torch.stack(styles, dim=1)

    def unused_parameters(self) -> bool:
        """True when small generators leave pyramid levels unused (DDP must then look for unused parameters)."""
        return len(self.styles) <= MIDDLE_STYLES


class BackboneEncoderUsingLastLayerIntoW(nn.Module):
    """Global-average-pooled last feature map -> one w [N, 512] (used with `learn_in_w`)."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3,
                 n_styles: int = 18, input_size: int = 256):
        super().__init__()
        self.input_layer = input_layer(input_nc)
        self.output_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = EqualLinear(512, 512, lr_mul=1)
        self.body, _ = residual_body(num_layers, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_pool(self.body(self.input_layer(x)))
        return self.linear(x.reshape(-1, 512))


class BackboneEncoderUsingLastLayerIntoWPlus(nn.Module):
    """Last feature map pooled to 7x7 -> linear -> all W+ styles at once [N, n_styles, 512]."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3,
                 n_styles: int = 18, input_size: int = 256):
        super().__init__()
        self.n_styles = n_styles
        self.input_layer = input_layer(input_nc)
        self.output_layer_2 = nn.Sequential(
            nn.BatchNorm2d(512), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(512 * 7 * 7, 512))
        self.linear = EqualLinear(512, 512 * n_styles, lr_mul=1)
        self.body, _ = residual_body(num_layers, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer_2(self.body(self.input_layer(x)))
        return self.linear(x).view(-1, self.n_styles, 512)


ENCODERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (GradualStyleEncoder, BackboneEncoderUsingLastLayerIntoW, BackboneEncoderUsingLastLayerIntoWPlus)
}
