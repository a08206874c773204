"""The encoders of the pSp family (pSp, ReStyle-pSp, ReStyle-e4e, e4e, W encoder): image -> W+ (or W) codes.

Most are a body (`IRSEFeatures` for faces, `ResNet34Features` for other domains) mixed with heads
(`PyramidHeads`, `LastMapHeads`); the e4e ones read their heads' outputs as w plus deltas. Module
names are the reference checkpoints' keys.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34

from psp_core.nets.irse import input_layer, residual_body
from psp_core.nets.stylegan2 import EqualLinear

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


def check_input_size(input_size: int) -> None:
    """The map2style heads pool maps of input_size/16..input_size/4 down to 1x1: a power of two >= 32."""
    if input_size < 32 or input_size & (input_size - 1):
        raise ValueError(f"encoder input size must be a power of two >= 32, got {input_size}")


class BodyFeatures(nn.Module, abc.ABC):
    """A backbone that yields the pyramid's three maps: [N, C, H, H] -> c1 [N,128,H/4], c2 [N,256,H/8],
    c3 [N,512,H/16], the outputs of its 2nd, 3rd and 4th stages (units `taps` of `self.body`)."""

    body: nn.Sequential
    taps: list[int]

    @abc.abstractmethod
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before the residual units."""

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                maps.append(x)
        return maps


class IRSEFeatures(BodyFeatures):
    """The face encoders' body: IR-SE stem (3x3 conv, stride 1) and residual units, keys
    `input_layer.*`, `body.*` (initialised from ArcFace's IR-SE50)."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3):
        super().__init__()
        self.input_layer = input_layer(input_nc)
        self.body, stage_ends = residual_body(num_layers, mode)
        self.taps = stage_ends[1:]   # outputs at 1/4 (128 ch), 1/8 (256 ch), 1/16 (512 ch)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_layer(x)


class ResNet34Features(BodyFeatures):
    """ReStyle's body for non-face domains: a 7x7 stride-2 stem with PReLU (keys `conv1`, `bn1`, `relu`)
    and torchvision's 16 ResNet-34 basic blocks (`body.*`), built untrained: weights come from the
    checkpoint. `num_layers` and `mode` describe IR-SE bodies and are not used."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(input_nc, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.PReLU(64)
        resnet = resnet34(weights=None)
        stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]   # 3, 4, 6, 3 blocks
        self.body = nn.Sequential(*(block for stage in stages for block in stage))
        stage_ends = [sum(len(s) for s in stages[:i + 1]) - 1 for i in range(4)]
        self.taps = stage_ends[1:]   # [6, 12, 15]: 1/4 (128 ch), 1/8 (256 ch), 1/16 (512 ch)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class PyramidHeads(nn.Module):
    """pSp's heads on a feature pyramid (mixed into a `BodyFeatures`, whose constructor it calls):
    styles [0, 3) from c3 (1/16), [3, 7) from p2 = up(c3) + latlayer1(c2) (1/8), the rest from
    p1 = up(p2) + latlayer2(c1) (1/4); one map2style each -> [N, n_styles, 512]."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3,
                 n_styles: int = 18, input_size: int = 256):
        check_input_size(input_size)
        super().__init__(num_layers, mode, input_nc)
        self.styles = nn.ModuleList()
        for i in range(n_styles):
            spatial = input_size // (16 if i < COARSE_STYLES else 8 if i < MIDDLE_STYLES else 4)
            self.styles.append(GradualStyleBlock(512, 512, spatial))
        self.latlayer1 = nn.Conv2d(256, 512, 1)   # c2 [N,256,H/8] -> [N,512,H/8]
        self.latlayer2 = nn.Conv2d(128, 512, 1)   # c1 [N,128,H/4] -> [N,512,H/4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.features(x)
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


class LastMapHeads(nn.Module):
    """ReStyle's simpler heads (mixed into a `BodyFeatures`, whose constructor it calls): every
    style from the last map c3 [N,512,H/16], one map2style each -> [N, n_styles, 512]."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3,
                 n_styles: int = 18, input_size: int = 256):
        check_input_size(input_size)
        super().__init__(num_layers, mode, input_nc)
        self.styles = nn.ModuleList(GradualStyleBlock(512, 512, input_size // 16) for _ in range(n_styles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.features(x)[-1]
        return torch.stack([style(c3) for style in self.styles], dim=1)


def w_plus_deltas(styles: torch.Tensor) -> torch.Tensor:
    """e4e's code from per-style outputs [N, n, 512]: style 0 is w, repeated on every layer, and
    style i >= 1 a delta added to layer i (the inference stage of progressive training: all deltas)."""
    codes = styles[:, :1].repeat(1, styles.shape[1], 1)
    codes[:, 1:] += styles[:, 1:]
    return codes


class GradualStyleEncoder(PyramidHeads, IRSEFeatures):
    """pSp's encoder (ReStyle-pSp's with `input_nc=6`): IR-SE body, feature-pyramid heads."""


class ResNetGradualStyleEncoder(PyramidHeads, ResNet34Features):
    """pSp's feature-pyramid encoder on a ResNet-34 body (ReStyle, non-face domains)."""


class BackboneEncoder(LastMapHeads, IRSEFeatures):
    """ReStyle-pSp's encoder: IR-SE body, every style from its last map."""


class ResNetBackboneEncoder(LastMapHeads, ResNet34Features):
    """ReStyle-pSp's encoder on a ResNet-34 body (non-face domains)."""


class ProgressiveBackboneEncoder(BackboneEncoder):
    """ReStyle-e4e's encoder: BackboneEncoder's styles read as e4e's w plus per-layer deltas."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w_plus_deltas(super().forward(x))


class ResNetProgressiveBackboneEncoder(ResNetBackboneEncoder):
    """ReStyle-e4e's encoder on a ResNet-34 body (non-face domains)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w_plus_deltas(super().forward(x))


class Encoder4Editing(GradualStyleEncoder):
    """e4e's encoder: GradualStyleEncoder's heads read as w (head 0, from the coarse map) repeated on every
    layer plus per-layer deltas (heads 1..). Progressive training: at stage s only the deltas of layers
    1..s are added (the layers above stay copies of w, their heads are not run); stage None, the
    inference stage, adds them all."""

    progressive_stage: int | None = None

    def set_progressive_stage(self, stage: int | None) -> None:
        """Add the deltas of layers 1..stage (0: w alone on every layer; None: every delta, as trained models run)."""
        if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or stage < 0):
            raise ValueError(f"progressive stage must be an integer >= 0 or None (inference), got {stage!r}")
        self.progressive_stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.features(x)
        n_styles = len(self.styles)
        last = n_styles - 1 if self.progressive_stage is None else min(self.progressive_stage, n_styles - 1)
        codes = self.styles[0](c3)[:, None].repeat(1, n_styles, 1)   # [N, n_styles, 512]
        features = c3
        for i in range(1, last + 1):
            if i == COARSE_STYLES:
                features = p2 = upsample_add(c3, self.latlayer1(c2))
            elif i == MIDDLE_STYLES:
                features = upsample_add(p2, self.latlayer2(c1))
            codes[:, i] += self.styles[i](features)
        return codes

    def unused_parameters(self) -> bool:
        """Always True: below the last progressive stage the heads above it get no gradient."""
        return True


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


class WEncoder(BackboneEncoderUsingLastLayerIntoW):
    """HyperStyle's W encoder (an e4e trained in W): the pooled last map's one w, repeated on every style
    -> [N, n_styles, 512]."""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", input_nc: int = 3,
                 n_styles: int = 18, input_size: int = 256):
        super().__init__(num_layers, mode, input_nc, n_styles, input_size)
        self.n_styles = n_styles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).unsqueeze(1).repeat(1, self.n_styles, 1)


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
    for cls in (GradualStyleEncoder, BackboneEncoderUsingLastLayerIntoW, BackboneEncoderUsingLastLayerIntoWPlus,
                BackboneEncoder, ResNetGradualStyleEncoder, ResNetBackboneEncoder,
                ProgressiveBackboneEncoder, ResNetProgressiveBackboneEncoder, Encoder4Editing, WEncoder)
}
"""Encoder classes by `encoder_type` (the keys are `options.ENCODER_TYPES`)."""
