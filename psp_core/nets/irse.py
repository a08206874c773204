"""IR / IR-SE ResNet backbones (ArcFace) in the layout of `model_ir_se50.pth`.

The same residual body serves as the identity network (112x112 face -> unit 512-d embedding)
and as the body of the pSp encoders.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

UNITS_PER_STAGE = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
STAGE_DEPTHS = (64, 128, 256, 512)


class UnitSpec(NamedTuple):
    """One residual unit: input channels, output channels, stride of its second convolution."""

    in_channel: int
    depth: int
    stride: int


def stage_specs(num_layers: int) -> list[list[UnitSpec]]:
    """The four stages of an IR-50/100/152 body; each stage halves the resolution in its first unit."""
    if num_layers not in UNITS_PER_STAGE:
        raise ValueError(f"IR-SE backbones have 50, 100 or 152 layers, not {num_layers}")
    stages, in_channel = [], 64
    for depth, units in zip(STAGE_DEPTHS, UNITS_PER_STAGE[num_layers]):
        stages.append([UnitSpec(in_channel, depth, 2)] + [UnitSpec(depth, depth, 1)] * (units - 1))
        in_channel = depth
    return stages


class SEModule(nn.Module):
    """Squeeze-and-excitation: reweight channels by a gate computed from their global average."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class BottleneckIR(nn.Module):
    """Improved residual unit (BN-conv-PReLU-conv-BN, optional SE) with a strided shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int, se: bool):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        layers = [
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if se:
            layers.append(SEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def input_layer(input_nc: int) -> nn.Sequential:
    """The stem: 3x3 conv to 64 channels, BN, PReLU (keys `input_layer.{0,1,2}`)."""
    return nn.Sequential(nn.Conv2d(input_nc, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


def residual_body(num_layers: int, mode: str) -> tuple[nn.Sequential, list[int]]:
    """The residual units as one Sequential (keys `body.N`) and the index of each stage's last unit."""
    if mode not in ("ir", "ir_se"):
        raise ValueError(f"IR backbone mode must be 'ir' or 'ir_se', not {mode!r}")
    units, stage_ends = [], []
    for stage in stage_specs(num_layers):
        units += [BottleneckIR(*spec, se=mode == "ir_se") for spec in stage]
        stage_ends.append(len(units) - 1)
    return nn.Sequential(*units), stage_ends


class IRSEBackbone(nn.Module):
    """ArcFace identity network: aligned face [N,3,112,112] in [-1,1] -> L2-normalised [N,512]."""

    def __init__(self, input_size: int = 112, num_layers: int = 50, mode: str = "ir_se", drop_ratio: float = 0.4):
        super().__init__()
        if input_size not in (112, 224):
            raise ValueError(f"IR-SE input_size must be 112 or 224, not {input_size}")
        grid = 7 if input_size == 112 else 14
        self.input_layer = input_layer(3)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(drop_ratio), nn.Flatten(),
            nn.Linear(512 * grid * grid, 512), nn.BatchNorm1d(512))
        self.body, _ = residual_body(num_layers, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1, eps=0.0)
