"""StyleGAN2-ADA's generator (`G_ema` of a network pickle, read as data by `psp_core.nets.ada_pickle`) as the
project's rosinality-layout `Generator`, computing the same function.

NVIDIA's modules map one to one: `mapping.fc{i}` -> `style.{i+1}`, `synthesis.b4.const` -> `input.input`,
`b4.conv1` / `b4.torgb` -> `conv1` / `to_rgb1`, `b{R}.conv0`, `b{R}.conv1`, `b{R}.torgb` -> `convs.{2k}`,
`convs.{2k+1}`, `to_rgbs.{k}` (k = log2 R - 3), each layer's `affine` -> `modulation`, `noise_strength` /
`noise_const` -> `noise.weight` / `noises.noise_{i}`, `resample_filter` -> the blur and upsample kernels,
`mapping.w_avg` -> `latent_avg`. NVIDIA's run-time gains (`weight_gain`, `bias_gain`) are read from each
layer and folded into the weights where they differ from the rosinality scales (for NVIDIA's own code they
are equal, so the weights are copied exactly); a demodulated convolution's weight scale cancels in both.
`conv_clamp` becomes the generator's clamp. Supported: `architecture='skip'`, channels of `channel_base`
16384 or 32768 with `channel_max` 512, 64-1024 px, unconditional; anything else is one line naming it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from psp_core.errors import CheckpointError
from psp_core.nets.ada_pickle import PickledModule, read_network_pickle
from psp_core.nets.stylegan2 import Generator, channels_for

NETWORKS = ("G_ema", "G")
RESOLUTIONS = (64, 128, 256, 512, 1024)
CHANNEL_BASES = {1: 16384, 2: 32768}          # rosinality channel multiplier -> NVIDIA channel_base (channel_max 512)
STYLEGAN3_CLASSES = ("SynthesisInput",)
LR_MLP = 0.01   # the mapping's learning-rate multiplier a rosinality file implies (not stored in it): others fold in


@dataclass(frozen=True)
class AdaGeneratorConfig:
    """What a StyleGAN2-ADA generator is, read from its modules and tensors (written to the import's sidecar)."""

    resolution: int
    z_dim: int
    w_dim: int
    mapping_layers: int
    lr_multiplier: float
    channel_base: int
    channel_max: int
    channel_multiplier: int
    num_fp16_res: int
    conv_clamp: float | None
    architecture: str
    resample_taps: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values."""
        return {**asdict(self), "resample_taps": list(self.resample_taps)}


@dataclass(frozen=True)
class AdaGenerator:
    """A converted StyleGAN2-ADA generator: the network (eval mode), `w_avg` as `latent_avg` [w_dim], what it was."""

    generator: Generator
    latent_avg: torch.Tensor
    config: AdaGeneratorConfig
    network: str


def snapshot_network(snapshot: Any, network: str, source: str) -> PickledModule:
    """`snapshot[network]` of a network pickle's dict, checked to be one NVIDIA module record."""
    if network not in NETWORKS:
        raise CheckpointError(f"{source}: network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if not isinstance(snapshot, dict) or network not in snapshot:
        found = sorted(map(str, snapshot))[:6] if isinstance(snapshot, dict) else type(snapshot).__name__
        raise CheckpointError(f"{source}: not a StyleGAN2-ADA network pickle: no {network!r} entry (found {found})")
    module = snapshot[network]
    if not isinstance(module, PickledModule):
        raise CheckpointError(f"{source}: {network} is a {type(module).__name__}, not a network module")
    return module


def _attribute(module: PickledModule, name: str, where: str, kinds: tuple[type, ...] = (int,)) -> Any:
    value = module.attributes.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise CheckpointError(f"{where}: no usable {name!r} attribute (found {value!r})")
    return value


def _refuse_other_generators(g: PickledModule, source: str) -> PickledModule:
    """The synthesis network of a StyleGAN2-ADA generator; StyleGAN3, conditional and odd ones refused by name."""
    if g.class_name != "Generator" or not g.has("synthesis") or not g.has("mapping"):
        raise CheckpointError(f"{source}: a {g.class_name} module, not a StyleGAN2-ADA Generator with mapping and "
                              "synthesis networks")
    synthesis = g.child("synthesis")
    children = {name: child.class_name for name, child in synthesis.modules.items() if child is not None}
    if any(kind in STYLEGAN3_CLASSES for kind in children.values()) or "b4" not in children:
        layers = ", ".join(sorted(children)[:4])
        raise CheckpointError(f"{source}: a StyleGAN3 (or other non-StyleGAN2) generator: synthesis holds {layers}; "
                              "only StyleGAN2-ADA generators (blocks b4, b8, ...) convert to this generator")
    c_dim = _attribute(g, "c_dim", f"{source} Generator")
    if c_dim != 0:
        raise CheckpointError(f"{source}: a conditional generator (c_dim={c_dim}, class labels as input); only "
                              "unconditional generators (c_dim=0) convert")
    if _attribute(g, "img_channels", f"{source} Generator") != 3:
        raise CheckpointError(f"{source}: a generator of {g.attributes['img_channels']} image channels; only RGB (3)")
    return synthesis


def _filter_taps(blocks: list[PickledModule], source: str) -> tuple[tuple[float, ...], torch.Tensor]:
    """The one 4-tap separable resample filter all blocks use: (taps, the normalised 2-D filter [4, 4])."""
    f = blocks[0].tensor("resample_filter").float()
    taps = f.sum(1)
    if f.shape != (4, 4) or not torch.allclose(torch.outer(taps, taps), f, atol=1e-6):
        raise CheckpointError(f"{source}: a resample filter of shape {tuple(f.shape)} that is not a separable 4-tap "
                              "filter (StyleGAN2's is [1, 3, 3, 1])")
    for block in blocks:
        for layer in [block, *(block.child(n) for n in ("conv0", "conv1") if block.has(n))]:
            if not torch.equal(layer.tensor("resample_filter").float(), f):
                raise CheckpointError(f"{source}: blocks with different resample filters")
    return tuple(round(float(t) * 8, 6) for t in taps), f      # taps in eighths: (1, 3, 3, 1) for StyleGAN2's


def read_config(g: PickledModule, source: str) -> AdaGeneratorConfig:
    """The generator's configuration, from its attributes and tensors; CheckpointError naming what does not fit."""
    synthesis = _refuse_other_generators(g, source)
    z_dim, w_dim = _attribute(g, "z_dim", source), _attribute(g, "w_dim", source)
    resolution = _attribute(g, "img_resolution", source)
    if resolution not in RESOLUTIONS:
        raise CheckpointError(f"{source}: a {resolution} px generator; supported: {', '.join(map(str, RESOLUTIONS))}")
    if z_dim != w_dim:
        raise CheckpointError(f"{source}: z_dim {z_dim} differs from w_dim {w_dim}; this generator needs them equal")
    mapping = g.child("mapping")
    n_mlp = _attribute(mapping, "num_layers", f"{source} mapping")
    layers = [mapping.child(f"fc{i}") for i in range(n_mlp)]
    if mapping.has("embed") or any(fc.attributes.get("activation") != "lrelu" for fc in layers):
        raise CheckpointError(f"{source}: a mapping network with a label embedding or an activation other than lrelu")
    lr_mul = _attribute(layers[0], "bias_gain", f"{source} mapping.fc0", (int, float))
    blocks = [synthesis.child(f"b{2 ** i}") for i in range(2, int(math.log2(resolution)) + 1)]
    architectures = {str(block.attributes.get("architecture")) for block in blocks}
    if architectures != {"skip"}:
        raise CheckpointError(f"{source}: synthesis architecture {', '.join(sorted(architectures))!s}; only 'skip' "
                              "(StyleGAN2-ADA's default) converts ('orig' and 'resnet' synthesis have no counterpart)")
    channels = {2 ** (i + 2): block.child("conv1").tensor("weight").shape[0] for i, block in enumerate(blocks)}
    multiplier = next((m for m in CHANNEL_BASES
                       if all(channels_for(resolution, m)[r] == c for r, c in channels.items())), None)
    if multiplier is None:
        raise CheckpointError(f"{source}: channels per resolution {channels} are neither channel_base 16384 nor 32768 "
                              "with channel_max 512")
    layer_list = [layer for block in blocks for layer in _block_layers(block)]
    clamps = {layer.attributes.get("conv_clamp") for layer in layer_list}
    if len(clamps) != 1 or not all(c is None or isinstance(c, (int, float)) and c > 0 for c in clamps):
        raise CheckpointError(f"{source}: layers with different or unusable conv_clamp values {sorted(map(str, clamps))}")
    taps, _ = _filter_taps(blocks, source)
    kwargs = g.init_kwargs.get("synthesis_kwargs") or {}
    fp16 = sum(1 for block in blocks if block.attributes.get("use_fp16") is True)
    clamp = clamps.pop()
    num_fp16_res = kwargs.get("num_fp16_res", fp16)
    return AdaGeneratorConfig(
        resolution=resolution, z_dim=z_dim, w_dim=w_dim, mapping_layers=n_mlp, lr_multiplier=float(lr_mul),
        channel_base=CHANNEL_BASES[multiplier], channel_max=int(kwargs.get("channel_max", 512)),
        channel_multiplier=multiplier, num_fp16_res=int(num_fp16_res), conv_clamp=None if clamp is None else float(clamp),
        architecture="skip", resample_taps=taps)


def _block_layers(block: PickledModule) -> list[PickledModule]:
    """A synthesis block's layers in the order their styles come: conv0 (not in b4), conv1, torgb."""
    return [block.child(name) for name in ("conv0", "conv1", "torgb") if name != "conv0" or block.has("conv0")]


class _StateBuilder:
    """The rosinality state dict, entry by entry, each checked against the generator's own shape."""

    def __init__(self, generator: Generator, source: str):
        self.expected = generator.state_dict()
        self.state: dict[str, torch.Tensor] = {}
        self.source = source

    def put(self, key: str, value: torch.Tensor, origin: str) -> None:
        """Set `key` from `value`, whose shape must be the generator's up to singleton dimensions."""
        want = self.expected[key]
        if [d for d in value.shape if d != 1] != [d for d in want.shape if d != 1]:
            raise CheckpointError(f"{self.source}: {origin} has shape {tuple(value.shape)}, the generator's {key} "
                                  f"needs {tuple(want.shape)}")
        self.state[key] = value.detach().to(torch.float32).reshape(want.shape).clone()

    def linear(self, prefix: str, fc: PickledModule, origin: str, scale: float, lr_mul: float) -> None:
        """An `EqualLinear` (weight * scale, bias * lr_mul) computing what NVIDIA's FullyConnectedLayer computes
        (weight * weight_gain, bias * bias_gain)."""
        gain = float(_attribute(fc, "weight_gain", origin, (int, float)))
        bias_gain = float(_attribute(fc, "bias_gain", origin, (int, float)))
        if fc.attributes.get("activation") not in ("linear", "lrelu"):
            raise CheckpointError(f"{self.source}: {origin} has activation {fc.attributes.get('activation')!r}")
        weight, bias = fc.tensor("weight").float(), fc.tensor("bias").float()
        self.put(f"{prefix}.weight", weight if gain == scale else weight * (gain / scale), f"{origin}.weight")
        self.put(f"{prefix}.bias", bias if bias_gain == lr_mul else bias * (bias_gain / lr_mul), f"{origin}.bias")

    def styled_conv(self, prefix: str, layer: PickledModule, origin: str, noise_key: str, w_dim: int) -> None:
        """A StyledConv from NVIDIA's SynthesisLayer (modulated conv, noise, bias, lrelu * sqrt 2)."""
        if layer.attributes.get("activation") != "lrelu" or layer.attributes.get("act_gain") not in (None, math.sqrt(2)):
            raise CheckpointError(f"{self.source}: {origin} is not a leaky-ReLU layer with gain sqrt(2)")
        self.linear(f"{prefix}.conv.modulation", layer.child("affine"), f"{origin}.affine", 1 / math.sqrt(w_dim), 1.0)
        self.put(f"{prefix}.conv.weight", layer.tensor("weight").float().unsqueeze(0), f"{origin}.weight")
        self.put(f"{prefix}.activate.bias", layer.tensor("bias"), f"{origin}.bias")
        resolution = self.expected[noise_key].shape[-1]
        if layer.attributes.get("use_noise", True):
            self.put(f"{prefix}.noise.weight", layer.tensor("noise_strength"), f"{origin}.noise_strength")
            self.put(noise_key, layer.tensor("noise_const"), f"{origin}.noise_const")
        else:
            self.put(f"{prefix}.noise.weight", torch.zeros(1), f"{origin} (no noise)")
            self.put(noise_key, torch.zeros(resolution, resolution), f"{origin} (no noise)")

    def to_rgb(self, prefix: str, layer: PickledModule, origin: str, w_dim: int) -> None:
        """A ToRGB from NVIDIA's ToRGBLayer: styles * weight_gain, no demodulation, bias; the gain folds into the
        weight where it differs from the rosinality scale 1/sqrt(in_channels)."""
        weight = layer.tensor("weight").float()
        gain = float(_attribute(layer, "weight_gain", origin, (int, float)))
        scale = 1 / math.sqrt(weight.shape[1] * weight.shape[2] * weight.shape[3])
        self.linear(f"{prefix}.conv.modulation", layer.child("affine"), f"{origin}.affine", 1 / math.sqrt(w_dim), 1.0)
        self.put(f"{prefix}.conv.weight", (weight if gain == scale else weight * (gain / scale)).unsqueeze(0),
                 f"{origin}.weight")
        self.put(f"{prefix}.bias", layer.tensor("bias"), f"{origin}.bias")


def convert_generator(g: PickledModule, config: AdaGeneratorConfig, source: str) -> Generator:
    """The project's generator holding `g`'s weights (eval mode), computing what `g.mapping(z, None)` and
    `g.synthesis(ws, noise_mode='const')` compute."""
    generator = Generator(config.resolution, style_dim=config.w_dim, n_mlp=config.mapping_layers,
                          channel_multiplier=config.channel_multiplier, lr_mlp=LR_MLP,
                          blur_taps=config.resample_taps, conv_clamp=config.conv_clamp)
    build = _StateBuilder(generator, source)
    mapping, synthesis = g.child("mapping"), g.child("synthesis")
    for i in range(config.mapping_layers):
        scale = LR_MLP / math.sqrt(config.z_dim if i == 0 else config.w_dim)
        build.linear(f"style.{i + 1}", mapping.child(f"fc{i}"), f"mapping.fc{i}", scale, LR_MLP)
    b4 = synthesis.child("b4")
    build.put("input.input", b4.tensor("const").unsqueeze(0), "synthesis.b4.const")
    build.styled_conv("conv1", b4.child("conv1"), "synthesis.b4.conv1", "noises.noise_0", config.w_dim)
    build.to_rgb("to_rgb1", b4.child("torgb"), "synthesis.b4.torgb", config.w_dim)
    _, f = _filter_taps([b4], source)
    for k in range(int(math.log2(config.resolution)) - 2):
        res = 2 ** (k + 3)
        block, origin = synthesis.child(f"b{res}"), f"synthesis.b{res}"
        build.styled_conv(f"convs.{2 * k}", block.child("conv0"), f"{origin}.conv0", f"noises.noise_{2 * k + 1}",
                          config.w_dim)
        build.styled_conv(f"convs.{2 * k + 1}", block.child("conv1"), f"{origin}.conv1", f"noises.noise_{2 * k + 2}",
                          config.w_dim)
        build.to_rgb(f"to_rgbs.{k}", block.child("torgb"), f"{origin}.torgb", config.w_dim)
        build.put(f"convs.{2 * k}.conv.blur.kernel", f * 4, f"{origin}.conv0.resample_filter")
        build.put(f"to_rgbs.{k}.upsample.kernel", f * 4, f"{origin}.resample_filter")
    missing = sorted(set(build.expected) - set(build.state))
    if missing:
        raise CheckpointError(f"{source}: no weights for {missing[:3]}")
    generator.load_state_dict(build.state, strict=True)
    return generator.eval()


def read_ada_generator(path: str | Path, network: str = "G_ema") -> AdaGenerator:
    """A StyleGAN2-ADA network pickle's `G_ema` (or `G`) as the project's generator, read without running any of
    the pickle's code; CheckpointError with one line for anything unsafe, damaged or unsupported."""
    source = str(path)
    g = snapshot_network(read_network_pickle(path), network, source)
    try:
        config = read_config(g, source)
        w_avg = g.child("mapping").buffers.get("w_avg")
        if not isinstance(w_avg, torch.Tensor) or tuple(w_avg.shape) != (config.w_dim,):
            raise CheckpointError(f"{source}: mapping has no w_avg of shape ({config.w_dim},)")
        return AdaGenerator(convert_generator(g, config, source), w_avg.float().clone(), config, network)
    except CheckpointError as err:   # a record's own complaint ("SynthesisBlock has no submodule ...") gets the file
        message = str(err)
        raise CheckpointError(message if message.startswith(source) else f"{source}: {network}: {message}") from None
