"""The inference model: everything between a checkpoint and W+ codes, images and scores, for every stage.

`InferenceModel` loads any supported checkpoint onto a device and precision, turns decoded images into
encoder input with the preset's transform, runs the encoder (one pass for pSp, e4e and the W encoder, ReStyle's
iterative `refine` for the ReStyle families, `hyperstyle_steps` for HyperStyle), pools outputs to 256 for scoring,
and makes style-mixed variants. `psp evaluate`, `psp invert`, `psp edit` and the MLflow pyfunc all call it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psp_core.data.presets import PresetTransform, get_preset
from psp_core.errors import InputError
from psp_core.inference.hyperstyle import hyperstyle_steps
from psp_core.inference.refine import refine
from psp_core.nets.checkpoints import load_psp
from psp_core.nets.hyperstyle import HyperStyle, WeightOffsets
from psp_core.nets.psp import POOLED_SIZE, PSP, mix_styles
from psp_core.nets.stylegan2 import Generator
from psp_core.options import MAX_REFINE_ITERS, REFINED_CHANNELS, REFINING_FAMILIES, CompileSwitch, Precision
from psp_core.runtime.devices import (
    autocast,
    compile_model,
    inference_channels_last,
    keep_freed_memory,
    resolve_compile,
    resolve_precision,
    to_channels_last,
)

DEFAULT_REFINE_ITERS = 5
"""ReStyle's refinement steps at inference when none are asked for (the papers' and reference's 5)."""


def refine_iterations(n_iters: Any) -> int:
    """The refinement steps to run for a requested `n_iters`: None asks for DEFAULT_REFINE_ITERS; anything else
    must be an integer in 1..MAX_REFINE_ITERS (the bounds of the stages' settings), else one InputError."""
    if n_iters is None:
        return DEFAULT_REFINE_ITERS
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or not 1 <= n_iters <= MAX_REFINE_ITERS:
        raise InputError(f"n_iters must be an integer in 1..{MAX_REFINE_ITERS}, got {n_iters!r}")
    return int(n_iters)

FINE_LAYERS_FROM = 8
"""Multi-modal synthesis mixes the W+ layers from this one up (the reference's latent_mask 8-17)."""


def choose_device(choice: str = "auto") -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; `cuda` without one is an InputError."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(choice).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {choice} asked for, but no CUDA device is available")
    return torch.device(choice)


def image_channels(net: PSP | HyperStyle) -> int:
    """The channels of the images the caller gives (a ReStyle encoder or HyperStyle's hypernetwork also sees its
    last output: 3 more)."""
    refined = REFINED_CHANNELS if net.arch.family in REFINING_FAMILIES else 0
    return net.arch.input_nc - refined


def default_mix_layers(n_styles: int) -> list[int]:
    """The W+ layers style mixing replaces by default: 8 and up, or the upper half for smaller generators."""
    return list(range(FINE_LAYERS_FROM, n_styles)) or list(range(n_styles // 2, n_styles))


def scored(images: Tensor) -> Tensor:
    """Generator images [N, 3, S, S] as they are scored, shown and saved: float32, clamped to [-1, 1],
    pooled to 256x256 (the size the losses and the reference's metrics use)."""
    return F.adaptive_avg_pool2d(images.float(), (POOLED_SIZE, POOLED_SIZE)).clamp(-1, 1)


def compile_networks(net: PSP | HyperStyle, compile_cache: str | Path | None = None) -> None:
    """Compile each network `net` runs at inference, in place: the encoder and generator, or HyperStyle's W encoder,
    hypernetwork and generator; so the one-pass call, the iterations and `decode` all run compiled."""
    for name in ("w_encoder", "hypernet", "decoder") if isinstance(net, HyperStyle) else ("encoder", "decoder"):
        setattr(net, name, compile_model(getattr(net, name), compile_cache))


def should_compile(net: PSP | HyperStyle, device: torch.device, choice: CompileSwitch, n_images: int,
                   n_iters: int | None = None) -> bool:
    """The compile decision for `n_images` images through this model (`auto`: when the forward passes,
    ReStyle's steps included, repay the compile at this generator size; see `resolve_compile`)."""

    passes = n_images * ((n_iters or DEFAULT_REFINE_ITERS) if net.arch.family in REFINING_FAMILIES else 1)
    return resolve_compile(choice, passes, device, net.arch.output_size)


@dataclass(frozen=True)
class Inversion:
    """One pass of the encoder: generator images [N, 3, S, S] and W+ codes [N, n_styles, 512]; for HyperStyle also
    the generator's weight offsets the images were decoded with (`WeightOffsets`; `decode` takes them back)."""

    images: Tensor
    latents: Tensor
    offsets: WeightOffsets | None = None


class InferenceModel:
    """A loaded encoder ready for inference: the network on its device, the forward precision (`auto`
    resolved for the hardware), optionally compiled, and the preset's input transform (the same one
    evaluation and training validation use)."""

    def __init__(self, net: PSP | HyperStyle, preset: str | None = "encode", device: torch.device | str = "cpu",
                 precision: Precision = "fp32", compile: bool = False, compile_cache: str | Path | None = None,
                 channels_last: bool | None = None) -> None:
        """`preset` None: only the generator is used (`decode`, e.g. for editing codes), no images are encoded.
        On a CPU it sets `keep_freed_memory`, which is fully effective only when set before the process
        allocated its models, as `load` does. `channels_last` None: the layout the device, precision and compile
        choice measured fastest (`inference_channels_last`), except for HyperStyle, whose generator runs the grouped
        form at every layer (its reshape would copy a channels-last input back; not measured): contiguous. True /
        False stand."""

        task = get_preset(preset or "encode")
        if preset is not None and image_channels(net) != task.input_nc:
            raise InputError(f"the model takes {image_channels(net)}-channel images; preset {preset} gives "
                             f"{task.input_nc} channels")
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.net = net.to(self.device).eval()
        self.precision = resolve_precision(precision, self.device)
        self.compiled, self.compile_cache = compile, compile_cache
        self.channels_last = (inference_channels_last(self.device, self.precision, compile)
                              and not isinstance(self.net, HyperStyle) if channels_last is None else channels_last)
        if self.channels_last:
            to_channels_last(self.net)
        if compile:
            compile_networks(self.net, compile_cache)
        self.input_kind = task.input_kind
        self.transform = PresetTransform(task, net.arch.encoder_input_size, train=False)

    @classmethod
    def load(cls, checkpoint: str | Path, preset: str = "encode", device: str = "auto",
             precision: Precision = "fp32", compile: CompileSwitch = False,
             compile_cache: str | Path | None = None, n_images: int = 0,
             n_iters: int | None = None, w_encoder: str | Path | None = None,
             channels_last: bool | None = None) -> "InferenceModel":
        """Load any supported checkpoint (pSp, ReStyle-pSp, ReStyle-e4e, e4e, W encoder, HyperStyle with its W
        encoder: `w_encoder`, else found as `load_psp` says) strictly, weights only.
        `compile="auto"` compiles when `n_images` forward passes (times the ReStyle steps) repay it. On a CPU
        the process keeps freed memory (`keep_freed_memory`), set before the weights are read: set after a
        process has allocated its models, glibc still trims what the batches free."""

        chosen = choose_device(device)
        if chosen.type == "cpu":
            keep_freed_memory()
        net = load_psp(checkpoint, chosen, w_encoder=w_encoder)
        return cls(net, preset, chosen, precision, should_compile(net, chosen, compile, n_images, n_iters),
                   compile_cache, channels_last)

    @property
    def iterative(self) -> bool:
        """Whether the encoder refines its own output (ReStyle, HyperStyle) rather than encoding in one pass."""
        return self.net.arch.family in REFINING_FAMILIES

    @property
    def n_styles(self) -> int:
        return self.net.n_styles

    def prepare(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded (source, target) NCHW (uint8 / label maps) -> encoder input [N, C, E, E] and target
        [N, 3, 256, 256] in [-1, 1], on the model's device. Deterministic: evaluation draws nothing."""
        source, target = self.transform(source, target, torch.Generator().manual_seed(0))
        return source.to(self.device), target.to(self.device)

    @torch.inference_mode()
    def invert(self, source: Tensor, n_iters: int | None = None) -> list[Inversion]:
        """Encoder input [N, C, E, E] -> one Inversion per refinement step (`n_iters`, default 5; HyperStyle's
        carry their weight offsets), or a single one for pSp, e4e and the W encoder, which run in one pass whatever
        `n_iters` says; stored noise, as the reference's inference. The input takes the weights' layout."""

        n_steps = refine_iterations(n_iters)
        if self.channels_last:
            source = source.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            if isinstance(self.net, HyperStyle):
                return [Inversion(step.images, step.latents, step.offsets)
                        for step in hyperstyle_steps(self.net, source, n_steps)]
            if self.iterative:
                steps = refine(self.net, source, n_steps)
                return [Inversion(images, latents) for images, latents in steps]
            images, latents = self.net(source, resize=False, randomize_noise=False, return_latents=True)
        return [Inversion(images, latents)]

    def prepared_generator(self, generator: Generator) -> nn.Module:
        """A generator to `decode` with instead of the model's own (domain adaptation), made ready as the model's is:
        on its device, in eval mode, in its weight layout, and compiled when the model is (same compile cache)."""
        generator = generator.to(self.device).eval()
        if self.channels_last:
            to_channels_last(generator)
        return compile_model(generator, self.compile_cache) if self.compiled else generator

    @torch.inference_mode()
    def decode(self, latents: Tensor, offsets: WeightOffsets | None = None,
               generator: nn.Module | None = None) -> Tensor:
        """W+ codes [N, n_styles, 512] -> generator images [N, 3, S, S] (stored noise); a HyperStyle model's with
        the weight offsets of its inversion (`Inversion.offsets`; none: the plain generator). `generator`: decode
        with this generator of the same architecture instead of the model's own (domain adaptation: the offsets
        predicted for the model's generator applied to another's weights; see `prepared_generator`)."""

        if offsets is not None:
            offsets = [None if o is None else o.to(self.device) for o in offsets]
        decoder = self.net.decoder if generator is None else generator
        with autocast(self.device, self.precision):
            images, _ = decoder([latents.to(self.device)], input_is_latent=True, randomize_noise=False,
                                weight_offsets=offsets)
        return images

    @torch.inference_mode()
    def style_mix(self, latents: Tensor, seeds: Sequence[int], layers: Sequence[int] | None = None,
                  alpha: float | None = None, offsets: WeightOffsets | None = None) -> Inversion:
        """Multi-modal synthesis: the `layers` of each code [N, n_styles, 512] replaced by (or blended by
        `alpha` toward) the W code of a random z drawn from that image's seed, then decoded (a HyperStyle model's
        with the weight offsets of the codes' inversion)."""

        z = torch.stack([torch.randn(self.net.arch.style_dim, generator=torch.Generator().manual_seed(seed))
                         for seed in seeds]).to(self.device)
        with autocast(self.device, self.precision):
            inject = self.net.decoder.get_latent(z).unsqueeze(1).expand_as(latents)
            codes = mix_styles(latents, layers if layers is not None else default_mix_layers(self.n_styles),
                               inject, alpha)
        return Inversion(self.decode(codes, offsets), codes, offsets)
