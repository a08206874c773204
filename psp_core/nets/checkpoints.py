"""Reading and writing the public checkpoint formats, strictly and without unpickling code.

- StyleGAN2 generator: `{'g_ema': state_dict, 'latent_avg': [512] (optional), 'conv_clamp' (optional), ...}`,
  or NVIDIA's StyleGAN2-ADA network pickle, read as data (`psp_core.nets.ada_pickle`, `ada_generator`)
- ArcFace IR-SE50: a bare state dict (`model_ir_se50.pth`)
- pSp: `{'state_dict': encoder.* + decoder.*, 'opts': dict, 'latent_avg': [512] or [n_styles, 512]}`,
  and the same layout for ReStyle-pSp, ReStyle-e4e, e4e and the W encoder (family read from `opts`; entries
  beside these three, such as `optimizer` or e4e's `discriminator_state_dict`, are not part of the model)
- HyperStyle: `{'state_dict': hypernet.* + decoder.*, 'opts', 'latent_avg'}` and its W encoder file
  (`psp_core.nets.hyperstyle_checkpoints`)
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from psp_core.errors import CheckpointError
from psp_core.nets.ada_generator import read_ada_generator
from psp_core.nets.ada_pickle import is_network_pickle
from psp_core.nets.checkpoint_io import (
    assign_strict,
    atomic_torch_save,
    check_state_dict,
    conv_clamp_entry,
    load_strict,
    read_checkpoint,
    require_entry,
    sub_state,
)
from psp_core.nets.hyperstyle import HyperStyle
from psp_core.nets.hyperstyle_checkpoints import load_hyperstyle, read_w_encoder
from psp_core.nets.irse import UNITS_PER_STAGE, IRSEBackbone
from psp_core.nets.psp import PSP, PSPArchitecture
from psp_core.nets.stylegan2 import Generator, generator_architecture
from psp_core.options import HYPERSTYLE, RESTYLE_FAMILIES, W_ENCODER, HyperStyleArchitecture, family_of

log = logging.getLogger(__name__)

MEAN_LATENT_SAMPLES = 10_000   # w samples averaged for latent_avg when the generator file has none
MEAN_LATENT_SEED = 0
STEM_WEIGHT = "input_layer.0.weight"   # IR-SE50's first convolution, [64, 3, 3, 3]


@dataclass
class GeneratorCheckpoint:
    """A generator and the average latent stored beside it (None when the file has none)."""

    generator: Generator
    latent_avg: torch.Tensor | None


def read_generator_checkpoint(path: str | Path, network: str = "G_ema") -> GeneratorCheckpoint:
    """Load a rosinality-layout generator checkpoint (the architecture read from the tensors), or convert a
    StyleGAN2-ADA network pickle's `network` (`G_ema`, or `G`) without running any of its code."""
    if is_network_pickle(path):
        converted = read_ada_generator(path, network)
        return GeneratorCheckpoint(converted.generator, converted.latent_avg)
    ckpt = read_checkpoint(path)
    state = require_entry(ckpt, "g_ema", path)
    with torch.device("meta"):
        generator = Generator(**generator_architecture(state), conv_clamp=conv_clamp_entry(ckpt, path))
    assign_strict(generator, state, f"{path} g_ema")
    latent_avg = ckpt.get("latent_avg")
    return GeneratorCheckpoint(generator.eval(), None if latent_avg is None else latent_avg.float())


def save_generator(generator: Generator, latent_avg: torch.Tensor | None, path: str | Path) -> Path:
    """Write a generator in the public layout `{'g_ema', 'latent_avg'}` (plus `conv_clamp` when the generator
    clamps, which other readers ignore), atomically."""
    ckpt: dict[str, Any] = {"g_ema": {k: v.detach().cpu() for k, v in generator.state_dict().items()}}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg.detach().cpu()
    if generator.conv_clamp is not None:
        ckpt["conv_clamp"] = generator.conv_clamp
    return atomic_torch_save(ckpt, path)


def load_generator(path: str | Path) -> Generator:
    """StyleGAN2 generator (`g_ema`) from a public checkpoint, in eval mode."""
    return read_generator_checkpoint(path).generator


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for networks used only as fixed functions."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_irse50(path: str | Path) -> IRSEBackbone:
    """Frozen ArcFace IR-SE50 identity network from `model_ir_se50.pth`: [N,3,112,112] -> [N,512], unit norm."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "input_layer.0.weight" not in state:
        raise CheckpointError(f"{path}: not an IR-SE50 state dict (no 'input_layer.0.weight')")
    with torch.device("meta"):
        net = IRSEBackbone(112, 50, "ir_se")
    assign_strict(net, state, str(path))
    return freeze(net)


def load_psp(path: str | Path, device: str | torch.device = "cpu",
             w_encoder: str | Path | None = None) -> PSP | HyperStyle:
    """A pSp, ReStyle, e4e, W encoder or HyperStyle checkpoint (released or ours) -> model in eval mode, architecture
    and family read from its `opts`; only `state_dict`, `opts` and `latent_avg` are read. A HyperStyle model also
    reads its W encoder: the file `w_encoder`, else the one its opts name (`find_w_encoder`)."""
    ckpt = read_checkpoint(path)
    state = require_entry(ckpt, "state_dict", path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' must be a dict of tensors, got {type(state).__name__}")
    opts = ckpt.get("opts", {})
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"{path}: 'latent_avg' must be a tensor, got {type(latent_avg).__name__}")
    if isinstance(opts, Mapping) and family_of(opts) == HYPERSTYLE:
        return load_hyperstyle(path, state, opts, latent_avg, w_encoder).to(device)
    if w_encoder is not None:
        raise CheckpointError(f"{path}: a W encoder file is given, but this is not a HyperStyle checkpoint")
    try:
        arch = PSPArchitecture.from_opts(opts, has_latent_avg=latent_avg is not None)
        check_declared_architecture(arch, opts, state)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable 'opts': {err}") from None
    if latent_avg is None and arch.start_from_latent_avg:
        raise CheckpointError(f"{path}: a {arch.family} model that starts from latent_avg, but the file has no "
                              "'latent_avg'")
    extra = [k for k in state if not k.startswith(("encoder.", "decoder."))]
    if extra:
        raise CheckpointError(f"{path}: state_dict has keys outside encoder/decoder: {extra[:3]}")
    with torch.device("meta"):   # shapes only: the file's tensors become the network's once they fit it
        net = PSP(arch)
    assign_strict(net.encoder, sub_state(state, "encoder"), f"{path} encoder")
    assign_strict(net.decoder, sub_state(state, "decoder"), f"{path} decoder")
    net.decoder.set_conv_clamp(conv_clamp_entry(opts, path))
    try:
        net.set_latent_avg(latent_avg)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return net.to(device).eval()


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def check_declared_architecture(arch: PSPArchitecture, opts: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """The architecture a file's `opts` declare, checked against the tensors its state dict holds (names and
    shapes only) before any module is built: a contradiction is one error naming the option."""
    def refuse(name: str, value: Any, found: str) -> None:
        raise CheckpointError(f"{name} {value}: {found}")

    if opts.get("n_styles") is not None and opts["n_styles"] != arch.n_styles:
        refuse("n_styles", opts["n_styles"], f"a {arch.output_size} px generator takes {arch.n_styles} styles")
    decoder = sub_state(state, "decoder")
    if "to_rgb1.bias" in decoder:
        size = 2 ** (_count(decoder, r"to_rgbs\.(\d+)\.bias") + 2)
        if size != arch.output_size:
            refuse("output_size", arch.output_size, f"the file's generator makes {size} px images")
        found = generator_architecture(decoder)
        if found["n_mlp"] != arch.n_mlp:
            refuse("n_mlp", arch.n_mlp, f"the file's generator has {found['n_mlp']} mapping layers")
        if found["style_dim"] != arch.style_dim:
            refuse("style_dim", arch.style_dim, f"the file's generator has {found['style_dim']}-d styles")
        if "convs.6.conv.weight" in decoder and found["channel_multiplier"] != arch.stylegan_channel_multiplier:
            refuse("stylegan_channel_multiplier", arch.stylegan_channel_multiplier,
                   f"the file's generator has multiplier {found['channel_multiplier']}")
    encoder = sub_state(state, "encoder")
    stem = encoder.get("input_layer.0.weight", encoder.get("conv1.weight"))
    if isinstance(stem, torch.Tensor) and stem.dim() == 4 and stem.shape[1] != arch.input_nc:
        refuse("input_nc", arch.input_nc, f"the file's encoder stem takes {stem.shape[1]} channels")
    if "input_layer.0.weight" in encoder and "body.0.res_layer.0.weight" in encoder:   # an IR / IR-SE body
        units = _count(encoder, r"body\.(\d+)\..*")
        if units != sum(UNITS_PER_STAGE[arch.encoder_num_layers]):
            refuse("encoder_num_layers", arch.encoder_num_layers, f"the file's encoder body has {units} residual "
                   f"units ({', '.join(f'{n}: {sum(u)}' for n, u in UNITS_PER_STAGE.items())})")
        se = any(re.fullmatch(r"body\.\d+\.res_layer\.5\.fc1\.weight", k) for k in encoder)
        if se != (arch.encoder_mode == "ir_se"):
            refuse("encoder_mode", arch.encoder_mode, "the file's encoder body has "
                   f"{'squeeze-and-excitation units (ir_se)' if se else 'no squeeze-and-excitation units (ir)'}")
    heads = _count(encoder, r"styles\.(\d+)\.linear\.weight")
    if heads:
        if heads != arch.n_styles:
            refuse("output_size", arch.output_size, f"the file's encoder has {heads} style heads, a "
                   f"{arch.output_size} px generator takes {arch.n_styles}")
        side = 16 * 2 ** _count(encoder, r"styles\.0\.convs\.(\d+)\.weight")   # style 0 pools input/16 to 1x1
        if arch.encoder_type != W_ENCODER and side != arch.encoder_input_size:
            refuse("encoder_input_size", arch.encoder_input_size, f"the file's style heads pool a {side} px input")


def psp_checkpoint(net: PSP, **extra: Any) -> dict[str, Any]:
    """The reference layout of a pSp checkpoint (plus any `extra` entries, e.g. training state)."""
    ckpt: dict[str, Any] = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                            "opts": net.opts}
    if net.latent_avg is not None:
        ckpt["latent_avg"] = net.latent_avg.detach().cpu()
    ckpt.update(extra)
    return ckpt


def save_psp(net: PSP, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `net` in the layout `load_psp` (and the reference code) reads, atomically."""
    return atomic_torch_save(psp_checkpoint(net, **dict(extra or {})), path)


def check_generator_fits(arch: PSPArchitecture | HyperStyleArchitecture, generator: Generator, path: str | Path) -> None:
    """A generator read from `path` has the size and channel multiplier `arch` builds: else one line naming the
    option to set."""
    if generator.size != arch.output_size:
        raise CheckpointError(f"{path}: generator outputs {generator.size}px, the model wants "
                              f"output_size={arch.output_size}")
    multiplier = generator_architecture(generator.state_dict())["channel_multiplier"]
    if multiplier != arch.stylegan_channel_multiplier and arch.output_size >= 64:
        raise CheckpointError(f"{path}: generator has channel multiplier {multiplier} (StyleGAN2-ADA channel_base "
                              f"{16384 * multiplier}), the model wants stylegan_channel_multiplier="
                              f"{arch.stylegan_channel_multiplier}")


def check_same_generator(generator: Generator, model_generator: Generator, path: str | Path) -> None:
    """A generator read from `path` can decode in place of `model_generator` (domain adaptation: the same codes and
    weight offsets through another generator's weights): the same layers of the same shapes; else one line."""
    ours = {k: tuple(v.shape) for k, v in model_generator.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    if ours == theirs:
        return
    key = next((k for k in ours if ours[k] != theirs.get(k)), None) or next(k for k in theirs if k not in ours)
    raise CheckpointError(f"{path}: a {generator.size} px generator whose {key} is {list(theirs.get(key, ()))}, the "
                          f"model's {model_generator.size} px generator has {list(ours.get(key, ()))}: it must be the "
                          "model generator's architecture (a fine-tuned copy of it)")


def build_psp(arch: PSPArchitecture, generator_path: str | Path | None = None,
              irse50_path: str | Path | None = None, mean_latent_samples: int = MEAN_LATENT_SAMPLES) -> PSP:
    """A fresh pSp for training: encoder body from IR-SE50 (its stem too for RGB input, and widened for
    ReStyle's target + last output), generator and latent_avg from the generator checkpoint (latent_avg
    from `mean_latent` with a fixed seed when the file has none). A None path leaves that network at random init."""
    net = PSP(arch)
    if irse50_path is not None:
        with_stem = arch.input_nc == 3 or arch.family in RESTYLE_FAMILIES
        init_encoder_from_irse50(net.encoder, read_checkpoint(irse50_path), irse50_path, with_stem)
    net.set_latent_avg(start_generator(net.decoder, arch, generator_path, mean_latent_samples))
    return net


def start_generator(decoder: Generator, arch: PSPArchitecture | HyperStyleArchitecture,
                    generator_path: str | Path | None, mean_latent_samples: int) -> torch.Tensor | None:
    """A training run's generator: the checkpoint's weights loaded into `decoder` (checked to fit `arch`; None leaves
    it at random init), and the latent_avg to start from: the file's, else `mean_latent` with a fixed seed (None
    for an architecture that does not start from latent_avg)."""
    latent_avg = None
    if generator_path is not None:
        ckpt = read_generator_checkpoint(generator_path)
        check_generator_fits(arch, ckpt.generator, generator_path)
        load_strict(decoder, ckpt.generator.state_dict(), f"{generator_path} g_ema")
        decoder.set_conv_clamp(ckpt.generator.conv_clamp)
        latent_avg = ckpt.latent_avg
    if latent_avg is None and arch.start_from_latent_avg:
        latent_avg = decoder.mean_latent(mean_latent_samples, generator=torch.Generator().manual_seed(MEAN_LATENT_SEED))
    return latent_avg


def build_hyperstyle(arch: HyperStyleArchitecture, w_encoder_path: str | Path, generator_path: str | Path | None = None,
                     resnet34_path: str | Path | None = None,
                     mean_latent_samples: int = MEAN_LATENT_SAMPLES) -> HyperStyle:
    """A fresh HyperStyle for training, as the reference coach starts it: the W encoder from its file (`encoder.*`
    of a trained W encoder; it stays frozen), generator and latent_avg from the generator checkpoint (latent_avg from
    `mean_latent` with a fixed seed when the file has none), the hypernetwork's body from torchvision's ResNet-34
    when `resnet34_path` is given. A None generator or ResNet-34 path leaves that network at random init."""
    net = HyperStyle(arch)
    load_strict(net.w_encoder, read_w_encoder(Path(w_encoder_path)), f"{w_encoder_path} encoder (the W encoder)")
    net.w_encoder_file = Path(w_encoder_path).name
    if resnet34_path is not None:
        init_hypernet_from_resnet34(net, read_checkpoint(resnet34_path), resnet34_path)
    net.set_latent_avg(start_generator(net.decoder, arch, generator_path, mean_latent_samples))
    return net


def init_encoder_from_irse50(encoder: nn.Module, state: Any, path: str | Path, with_stem: bool) -> None:
    """Copy the IR-SE50 body (and the stem when `with_stem`) into an encoder; the encoder's own heads
    stay at their initialisation. A stem wider than RGB gets `widened_stem` (the ReStyle reference's)."""
    if not isinstance(state, dict) or "input_layer.0.weight" not in state:
        raise CheckpointError(f"{path}: not an IR-SE50 state dict (no 'input_layer.0.weight')")
    prefixes = ("body.", "input_layer.") if with_stem else ("body.",)
    wanted = {k: v for k, v in encoder.state_dict().items() if k.startswith(prefixes)}
    source = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if with_stem and STEM_WEIGHT in wanted:
        source[STEM_WEIGHT] = widened_stem(source[STEM_WEIGHT], wanted[STEM_WEIGHT].shape[1])
    check_state_dict(wanted, source, f"{path} (as encoder body)")
    encoder.load_state_dict(source, strict=False)


def widened_stem(weight: torch.Tensor, input_nc: int) -> torch.Tensor:
    """IR-SE50's RGB stem convolution [64, 3, k, k] for `input_nc` >= 3 input channels, as the ReStyle
    reference initialises it: the released filters on the first 3 channels, N(0, 1) draws (global torch
    RNG) on the others."""
    if input_nc <= weight.shape[1]:
        return weight
    widened = torch.randn(weight.shape[0], input_nc, *weight.shape[2:], dtype=weight.dtype)
    widened[:, :weight.shape[1]] = weight
    return widened


def init_hypernet_from_resnet34(net: HyperStyle, state: Any, path: str | Path) -> None:
    """The hypernetwork's body from torchvision's ImageNet ResNet-34 (`resnet34-333f7ec4.pth`): its stem convolution
    on the first 3 input channels (the others N(0, 1) draws: `widened_stem`, as the reference), `bn1`, and blocks `layerS.B` as
    `body.K` in order; the heads, the shared hypernetwork and the stem's PReLU stay at their initialisation. (The
    reference maps the block names too but then loads the unmapped dict non-strictly, so its body starts random;
    this is what its code means to do.)"""
    if not isinstance(state, dict) or "layer1.0.conv1.weight" not in state:
        raise CheckpointError(f"{path}: not a torchvision ResNet-34 state dict (no 'layer1.0.conv1.weight')")
    names = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("layer")},
                   key=lambda name: (int(name[5]), int(name.split(".")[1])))
    mapped = {}
    for index, block in enumerate(names):
        for key, tensor in state.items():
            if key.startswith(block + "."):
                mapped[f"body.{index}.{key[len(block) + 1:]}"] = tensor
    mapped.update({k: v for k, v in state.items() if k.startswith("bn1.")})
    mapped["conv1.weight"] = widened_stem(require_entry(state, "conv1.weight", path), net.arch.input_nc)
    wanted = {k: v for k, v in net.hypernet.state_dict().items() if k in mapped}
    check_state_dict(wanted, mapped, f"{path} (as the hypernetwork's ResNet-34 body)")
    net.hypernet.load_state_dict(mapped, strict=False)
