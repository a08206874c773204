"""The pSp tasks as named presets: input kind, augmentation, encoder family and the loss weights of the papers'
released training commands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from psp_core.data.transforms import (
    degrade_resolution,
    flip_where,
    one_hot_labels,
    random_hflip,
    resize_images,
    resize_labels,
    sketch_from_photo,
    to_signed,
    to_unit_float,
)
from psp_core.errors import InputError
from psp_core.options import Family, LossWeights, encoder_input_nc, preset_family

InputKind = Literal["rgb", "sketch", "segmentation"]
FlipMode = Literal["none", "joint", "independent"]

TARGET_SIZE = 256
"""Targets (and the pooled outputs the losses compare them with) are 256x256, as in the reference."""

SEGMENTATION_CLASSES = 19
"""CelebAMask-HQ label count used by the reference seg-to-face model."""


@dataclass(frozen=True)
class TaskPreset:
    """One pSp task: what the encoder sees, how batches are augmented, the loss weights, and (by its name,
    from `psp_core.options.PRESET_FAMILIES`) the encoder family it trains."""

    name: str
    description: str
    input_kind: InputKind
    flip: FlipMode
    loss: LossWeights
    resize_factors: tuple[int, ...] = ()

    @property
    def input_nc(self) -> int:
        """Channels of the images the transform gives: 3 (RGB), 1 (sketch) or 19 (one-hot segmentation)."""
        return {"rgb": 3, "sketch": 1, "segmentation": SEGMENTATION_CLASSES}[self.input_kind]

    @property
    def family(self) -> Family:
        """The encoder family this preset trains (psp; restyle_psp for restyle_encode, e4e for e4e_encode, w_encoder
        for w_encode, hyperstyle for hyperstyle_encode)."""
        return preset_family(self.name)

    @property
    def encoder_input_nc(self) -> int:
        """Channels the encoder sees: `input_nc`, plus the last output's for ReStyle and HyperStyle (3 + 3 = 6)."""
        return encoder_input_nc(self.family, self.input_nc)

    def with_loss(self, **overrides: float) -> "TaskPreset":
        """The preset with some loss weights replaced (e.g. from params.yaml)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(LossWeights)}
        if unknown:
            raise InputError(f"unknown loss weights {sorted(unknown)}")
        return dataclasses.replace(self, loss=dataclasses.replace(self.loss, **overrides))


PRESETS: dict[str, TaskPreset] = {
    preset.name: preset
    for preset in (
        TaskPreset("encode", "StyleGAN inversion: reconstruct the input face", "rgb", "joint",
                   LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.1)),
        TaskPreset("frontalize", "profile face in, frontal face out (source and target flipped independently)",
                   "rgb", "independent",
                   LossWeights(l2_lambda=0.001, lpips_lambda=0.08, id_lambda=1.0, w_norm_lambda=0.005,
                               l2_lambda_crop=0.01, lpips_lambda_crop=0.8)),
        TaskPreset("sketch_to_face", "1-channel sketch in (an edge drawing of the photo when given a photo), face out",
                   "sketch", "none", LossWeights(l2_lambda=1.0, lpips_lambda=0.8, w_norm_lambda=0.005)),
        TaskPreset("seg_to_face", "19-class segmentation map in (one-hot), face out", "segmentation", "none",
                   LossWeights(l2_lambda=1.0, lpips_lambda=0.8, w_norm_lambda=0.005)),
        TaskPreset("super_resolution", "face downsampled by a random factor in, full-resolution face out",
                   "rgb", "none", LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.1, w_norm_lambda=0.005),
                   resize_factors=(1, 2, 4, 8, 16, 32)),
        TaskPreset("toonify", "face in, toon out: encode trained against a toonified generator checkpoint",
                   "rgb", "joint", LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=1.0, w_norm_lambda=0.025)),
        TaskPreset("restyle_encode", "StyleGAN inversion by ReStyle-pSp: the encoder refines its own last output "
                   "(the released model: encoder_type BackboneEncoder)", "rgb", "joint",
                   LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.1)),
        TaskPreset("e4e_encode", "StyleGAN inversion by e4e: codes kept near W by progressive deltas, the delta "
                   "regulariser and a latent discriminator (encoder_type Encoder4Editing; the released run also sets "
                   "progressive_start 20000)", "rgb", "joint",
                   LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.5, w_discriminator_lambda=0.1,
                               delta_norm_lambda=2e-4)),
        TaskPreset("w_encode", "StyleGAN inversion into W by a W encoder, trained as HyperStyle's were: e4e's "
                   "objective with one code for every style, so the latent discriminator alone keeps it in W "
                   "(encoder_type WEncoder; the codes hyperstyle_encode refines)", "rgb", "joint",
                   LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.5, w_discriminator_lambda=0.1)),
        TaskPreset("hyperstyle_encode", "StyleGAN inversion by HyperStyle: a trained W encoder's code, decoded with "
                   "per-image offsets of the generator's weights that a hypernetwork refines (the paper's FFHQ command: "
                   "encoder_type SharedWeightsHyperNetResNet, n_iters_per_batch 5, output_size 1024)", "rgb", "joint",
                   LossWeights(l2_lambda=1.0, lpips_lambda=0.8, id_lambda=0.1)),
    )
}


def get_preset(name: str) -> TaskPreset:
    """The preset of this name, or a ValueError listing the known ones."""
    if name not in PRESETS:
        raise InputError(f"unknown task preset {name!r}; one of {sorted(PRESETS)}")
    return PRESETS[name]


class PresetTransform:
    """Turn a decoded batch (source, target) into encoder input and [-1, 1] target for a preset, all on tensors.

    Images come as uint8 or [0, 1] float [N, C, H, W]; segmentation sources as integer label maps
    [N, 1, H, W]; sketch sources as 1-channel drawings or RGB photos (then drawn by an edge filter).
    Random choices come only from the generator passed in, so the caller can make them resumable.
    """

    def __init__(self, preset: TaskPreset, encoder_size: int, train: bool = True) -> None:
        self.preset = preset
        self.encoder_size = encoder_size
        self.train = train

    def __call__(self, source: Tensor, target: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(source, target) -> (encoder input [N, input_nc, S, S], target [N, 3, 256, 256] in [-1, 1])."""
        target = resize_images(to_unit_float(target), TARGET_SIZE)
        if self.preset.input_kind == "segmentation":
            source = one_hot_labels(resize_labels(source, self.encoder_size), SEGMENTATION_CLASSES)
        else:
            source = to_unit_float(source)
            if self.preset.resize_factors:
                source = degrade_resolution(resize_images(source, TARGET_SIZE), self.preset.resize_factors, generator)
            source = resize_images(source, self.encoder_size)
            if self.preset.input_kind == "sketch":
                source = sketch_from_photo(source) if source.shape[1] == 3 else source
            else:
                source = to_signed(source)
        if self.train and self.preset.flip == "joint":
            target, mask = random_hflip(target, generator)
            source = flip_where(source, mask)
        elif self.train and self.preset.flip == "independent":
            source, _ = random_hflip(source, generator)
            target, _ = random_hflip(target, generator)
        return source, to_signed(target)
