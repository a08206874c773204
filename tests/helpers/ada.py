"""StyleGAN2-ADA network pickles in NVIDIA's format, written by our own code, and the function they hold computed
the NVIDIA way, for the importer's tests (NVIDIA's code is not part of the project).

Each module below is an `nn.Module` with the attributes, parameters and buffers of its namesake in NVIDIA's
`training/networks.py`, and pickles the way `torch_utils.persistence` pickles one: the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, `meta = dict(type='class', version=6,
module_src=..., class_name=..., state=<the module's __dict__>)`, tensors pickled the plain torch way. The
`module_src` is a program that would create a file if anyone ran it. Its `forward`s follow NVIDIA's code
(fully connected layers with `weight_gain` / `bias_gain`, modulated convolution with demodulation as one
grouped convolution, transposed-convolution upsampling then the [1, 3, 3, 1] filter, `noise_const *
noise_strength`, `bias_act` with lrelu * sqrt(2) and `conv_clamp`, skip ToRGB), written independently of
`psp_core`'s ops: the reference the conversion must match.
"""
from __future__ import annotations

import copy
import math
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PERSISTENCE_VERSION = 6
EXECUTED_MARKER = "ada-module-src-was-executed"


def module_src(marker_dir: Path | None = None) -> str:
    """The module source a record carries: a program that creates a marker file when executed."""
    where = repr(str((marker_dir or Path("/tmp")) / EXECUTED_MARKER))
    return f"import pathlib\npathlib.Path({where}).write_text('ran')\n"


def _reconstruct_stub(meta: Any) -> Any:
    raise AssertionError("the test helper's stand-in for _reconstruct_persistent_obj is never called")


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`, pickled under that name."""


@contextmanager
def nvidia_names() -> Iterator[None]:
    """`torch_utils.persistence._reconstruct_persistent_obj` and `dnnlib.util.EasyDict` importable while pickling
    (pickle writes a global by its importable name), removed afterwards."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")
    _reconstruct_stub.__module__, _reconstruct_stub.__qualname__ = persistence.__name__, "_reconstruct_persistent_obj"
    EasyDict.__module__ = util.__name__
    persistence._reconstruct_persistent_obj = _reconstruct_stub
    util.EasyDict = EasyDict
    names = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    assert not set(names) & set(sys.modules), "NVIDIA's packages must not be importable in the tests"
    sys.modules.update(names)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


class Persistent(nn.Module):
    """An nn.Module pickled as NVIDIA's `persistent_class` decorator pickles one (class name: `pickled_name`,
    default the Python class's)."""

    source = module_src()
    pickled_name: str | None = None

    def __init__(self, **init_kwargs: Any):
        super().__init__()
        self._init_args = ()
        self._init_kwargs = EasyDict(init_kwargs)

    def __reduce__(self) -> tuple:
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(type="class", version=PERSISTENCE_VERSION, module_src=self.source,
                    class_name=self.pickled_name or type(self).__name__, state=fields[2])
        return (_reconstruct_stub, (meta,), None)

    def __deepcopy__(self, memo: dict) -> Persistent:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class Discriminator(Persistent):
    """A tiny stand-in for NVIDIA's discriminator (the importer never reads it)."""

    def __init__(self):
        super().__init__(c_dim=0, img_resolution=64, img_channels=3)
        self.b4 = FullyConnectedLayer(8, 1)


class AugmentPipe(Persistent):
    """A tiny stand-in for NVIDIA's augmentation pipeline: float attributes, a list, buffer `p`."""

    def __init__(self):
        super().__init__(xflip=1, rotate90=1)
        self.xflip, self.rotate90, self.imgfilter_bands = 1.0, 1.0, [1, 1, 1, 1]
        self.register_buffer("p", torch.zeros([]))


def bias_act(x: torch.Tensor, b: torch.Tensor | None, act: str = "linear", gain: float = 1.0,
             clamp: float | None = None) -> torch.Tensor:
    """NVIDIA's `bias_act` reference: add bias, activation, gain, clamp."""
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    if gain != 1:
        x = x * gain
    return x if clamp is None else x.clamp(-clamp, clamp)


def setup_filter(taps: list[float]) -> torch.Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = f.ger(f)
    return f / f.sum()


def upfirdn(x: torch.Tensor, f: torch.Tensor, up: int = 1, pad: tuple[int, int, int, int] = (0, 0, 0, 0),
            gain: float = 1.0) -> torch.Tensor:
    """NVIDIA's `upfirdn2d` reference for a 2-D filter: zero-insert, pad, convolve (the filter flipped), gain."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, list(pad))
    weight = (f * gain ** (f.ndim / 2)).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, groups=c)


class FullyConnectedLayer(Persistent):
    def __init__(self, in_features: int, out_features: int, activation: str = "linear", lr_multiplier: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__(in_features=in_features, out_features=out_features, activation=activation,
                         lr_multiplier=lr_multiplier, bias_init=bias_init)
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(bias_init + 0.3 * torch.randn([out_features]))
        self.weight_gain = lr_multiplier / np.sqrt(in_features)     # np.float64, as NVIDIA's
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight * self.weight_gain, self.bias * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation, gain=math.sqrt(2))


class MappingNetwork(Persistent):
    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int = 8,
                 lr_multiplier: float = 0.01):
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=num_ws, num_layers=num_layers)
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        self.w_avg_beta = 0.995
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, w_dim)
        features = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * num_layers
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu",
                                                          lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.randn([w_dim]))

    def forward(self, z: torch.Tensor, c: Any = None) -> torch.Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        return x.unsqueeze(1).repeat([1, self.num_ws, 1])


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: int = 1, padding: int = 0,
                     resample_filter: torch.Tensor | None = None, demodulate: bool = True) -> torch.Tensor:
    """NVIDIA's fused modulated convolution (fp32, eval): one grouped convolution with per-sample weights."""
    batch, (out_channels, in_channels, kh, kw) = x.shape[0], weight.shape
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    if up == 1:
        x = F.conv2d(x, w.reshape(-1, in_channels, kh, kw), padding=padding, groups=batch)
    else:   # conv2d_resample: transposed convolution (stride 2, no padding), then the filter padded [1, 1] with gain 4
        w = w.transpose(1, 2).reshape(batch * in_channels, out_channels, kh, kw)
        x = F.conv_transpose2d(x, w, stride=2, groups=batch)
        x = upfirdn(x, resample_filter, pad=(1, 1, 1, 1), gain=up ** 2)
    return x.reshape(batch, -1, *x.shape[2:])


class SynthesisLayer(Persistent):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 conv_clamp: float | None = None):
        super().__init__(in_channels=in_channels, out_channels=out_channels, w_dim=w_dim, resolution=resolution,
                         up=up, conv_clamp=conv_clamp)
        self.resolution, self.up, self.use_noise, self.activation = resolution, up, True, "lrelu"
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.padding = 1
        self.act_gain = np.sqrt(2)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.noise_strength = nn.Parameter(0.5 * torch.randn([]))
        self.bias = nn.Parameter(0.2 * torch.randn([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter)
        x = x + self.noise_const * self.noise_strength
        return bias_act(x, self.bias, act="lrelu", gain=self.act_gain, clamp=self.conv_clamp)


class ToRGBLayer(Persistent):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__(in_channels=in_channels, out_channels=out_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(0.2 * torch.randn([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(Persistent):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, is_last: bool,
                 architecture: str = "skip", conv_clamp: float | None = None, use_fp16: bool = False):
        super().__init__(in_channels=in_channels, out_channels=out_channels, w_dim=w_dim, resolution=resolution,
                         img_channels=3, is_last=is_last, architecture=architecture, conv_clamp=conv_clamp,
                         use_fp16=use_fp16)
        self.in_channels, self.w_dim, self.resolution, self.img_channels = in_channels, w_dim, resolution, 3
        self.is_last, self.architecture, self.use_fp16, self.channels_last = is_last, architecture, use_fp16, False
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.num_conv = self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, 3, w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor) -> tuple:
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            x = self.conv0(x, next(w_iter))
        x = self.conv1(x, next(w_iter))
        if img is not None:
            img = upfirdn(img, self.resample_filter, up=2, pad=(2, 1, 2, 1), gain=4)
        y = self.torgb(x, next(w_iter))
        return x, (img + y if img is not None else y)


class SynthesisNetwork(Persistent):
    def __init__(self, w_dim: int, img_resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 num_fp16_res: int = 0, conv_clamp: float | None = None, architecture: str = "skip"):
        super().__init__(w_dim=w_dim, img_resolution=img_resolution, img_channels=3, channel_base=channel_base,
                         channel_max=channel_max, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp)
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, 3
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res,
                                   is_last=res == img_resolution, architecture=architecture, conv_clamp=conv_clamp,
                                   use_fp16=res >= fp16_resolution)
            self.num_ws += block.num_conv + (block.num_torgb if res == img_resolution else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        assert noise_mode == "const"
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv
        return img


class Generator(Persistent):
    def __init__(self, z_dim: int = 512, c_dim: int = 0, w_dim: int = 512, img_resolution: int = 64,
                 mapping_kwargs: dict | None = None, synthesis_kwargs: dict | None = None):
        mapping_kwargs, synthesis_kwargs = EasyDict(mapping_kwargs or {}), EasyDict(synthesis_kwargs or {})
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=3,
                         mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)
        self.z_dim, self.c_dim, self.w_dim, self.img_resolution, self.img_channels = z_dim, c_dim, w_dim, img_resolution, 3
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **mapping_kwargs)


class SynthesisInput(Persistent):
    """StyleGAN3's Fourier-feature input (its attributes and tensors, no forward)."""

    def __init__(self, w_dim: int, channels: int, size: int):
        super().__init__(w_dim=w_dim, channels=channels, size=[size, size], sampling_rate=16, bandwidth=2)
        self.affine = FullyConnectedLayer(w_dim, 4)
        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.register_buffer("freqs", torch.randn([channels, 2]))
        self.register_buffer("phases", torch.rand([channels]) - 0.5)


class StyleGAN3Layer(Persistent):
    """StyleGAN3's SynthesisLayer: affine, weight, bias, magnitude_ema, up/down filters."""

    pickled_name = "SynthesisLayer"

    def __init__(self, w_dim: int, channels: int):
        super().__init__(w_dim=w_dim, is_torgb=False, is_critically_sampled=False, use_fp16=False)
        self.is_torgb, self.conv_kernel, self.conv_clamp = False, 3, 256
        self.affine = FullyConnectedLayer(w_dim, channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([channels, channels, 3, 3]))
        self.bias = nn.Parameter(torch.zeros([channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))
        self.register_buffer("up_filter", torch.ones([12]))
        self.register_buffer("down_filter", torch.ones([12]))


def stylegan3_generator(w_dim: int = 8, channels: int = 4) -> Generator:
    """A small generator shaped like StyleGAN3's (`synthesis.input`, layers `L0_36_...`); pickled names as StyleGAN3's."""
    torch.manual_seed(0)
    g = Generator(z_dim=w_dim, w_dim=w_dim, img_resolution=4,
                  synthesis_kwargs=dict(channel_base=4 * channels, channel_max=channels),
                  mapping_kwargs=dict(num_layers=2))
    synthesis = g.synthesis
    del synthesis.b4
    synthesis.input = SynthesisInput(w_dim, channels, 36)
    synthesis.L0_36_4 = StyleGAN3Layer(w_dim, channels)
    return g


def ada_generator(resolution: int = 64, channel_base: int = 16384, seed: int = 0, conv_clamp: float | None = 256,
                  num_fp16_res: int = 2, c_dim: int = 0, architecture: str = "skip", w_dim: int = 512,
                  mapping_layers: int = 8) -> Generator:
    """A StyleGAN2-ADA-shaped generator with non-trivial random weights from `seed` (biases, noise strengths
    and w_avg included), in eval mode without gradients, as NVIDIA's training loop snapshots it."""
    torch.manual_seed(seed)
    g = Generator(z_dim=w_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=resolution,
                  mapping_kwargs=dict(num_layers=mapping_layers),
                  synthesis_kwargs=dict(channel_base=channel_base, channel_max=512, num_fp16_res=num_fp16_res,
                                        conv_clamp=conv_clamp, architecture=architecture))
    return g.eval().requires_grad_(False)


def write_network_pickle(path: Path, g_ema: nn.Module, g: nn.Module | None = None, **extra: Any) -> Path:
    """A `network-snapshot-*.pkl` as NVIDIA's training loop writes it: `pickle.dump` of
    `{'training_set_kwargs', 'G', 'D', 'G_ema', 'augment_pipe'}` (D and augment_pipe tiny stand-ins; G is
    G_ema unless given); `extra` entries replace or add to the dict."""
    snapshot = dict(training_set_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="afhq.zip",
                                             use_labels=False, max_size=1000, xflip=False, resolution=64))
    for name, module in (("G", g), ("D", Discriminator()), ("G_ema", g_ema), ("augment_pipe", AugmentPipe())):
        if module is not None:
            snapshot[name] = copy.deepcopy(module).eval().requires_grad_(False)
    snapshot.setdefault("G", snapshot["G_ema"])   # no G given: the same record twice (pickled once), half the file
    snapshot.update(extra)
    Persistent.source = module_src(path.parent)
    try:
        with nvidia_names(), open(path, "wb") as f:
            pickle.dump(snapshot, f)
    finally:
        Persistent.source = module_src()
    return path


def reference_mapping(g: Generator, z: torch.Tensor) -> torch.Tensor:
    """`G.mapping(z, None)` the NVIDIA way: [N, z_dim] -> W+ [N, num_ws, w_dim]."""
    with torch.no_grad():
        return g.mapping(z)


def reference_synthesis(g: Generator, ws: torch.Tensor) -> torch.Tensor:
    """`G.synthesis(ws, noise_mode='const')` the NVIDIA way: [N, num_ws, w_dim] -> image [N, 3, R, R]."""
    with torch.no_grad():
        return g.synthesis(ws, noise_mode="const")
