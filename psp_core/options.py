"""The options of a pSp network and of its training, as frozen dataclasses that import no torch.

They are the one definition (type, default, one-line doc in `metadata["doc"]`) of each option:
checkpoints store the architecture, the engine reads the training options, and the pipeline's
params schema is derived from both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping

from psp_core.errors import InputError

Precision = Literal["fp32", "bf16", "fp16"]
PresetName = Literal["encode", "frontalize", "sketch_to_face", "seg_to_face", "super_resolution", "toonify"]
OptimizerName = Literal["ranger", "adam"]

ENCODER_TYPES = (
    "GradualStyleEncoder",                       # pSp: feature pyramid, one map2style per style
    "BackboneEncoderUsingLastLayerIntoW",        # one W code for every style
    "BackboneEncoderUsingLastLayerIntoWPlus",    # W+ from the last backbone layer
)
W_ENCODER = "BackboneEncoderUsingLastLayerIntoW"


def n_styles_for(output_size: int) -> int:
    """Number of W+ styles of a generator of this output size (18 at 1024)."""
    return 2 * int(math.log2(output_size)) - 2


def _doc(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class PSPArchitecture:
    """Everything that fixes the tensors of a pSp checkpoint; stored in the checkpoint's `opts`.

    The first five fields are the reference pSp options; the rest are ours, with the reference
    values as defaults, so a released checkpoint without them reads correctly.
    """

    encoder_type: str = _doc("GradualStyleEncoder", f"encoder network: one of {', '.join(ENCODER_TYPES)}")
    input_nc: int = _doc(3, "encoder input channels (3 RGB, 1 sketch, classes for segmentation)")
    output_size: int = _doc(1024, "generator output size in pixels (a power of two, 16..1024)")
    start_from_latent_avg: bool = _doc(True, "the encoder predicts codes relative to the generator's average latent")
    learn_in_w: bool = _doc(False, "one W code for every style (set by encoder_type)")
    encoder_input_size: int = _doc(256, "side of the encoder's input image (a power of two >= 32)")
    encoder_num_layers: int = _doc(50, "IR-SE backbone depth: 50, 100 or 152")
    encoder_mode: str = _doc("ir_se", "IR backbone blocks: ir or ir_se")
    stylegan_channel_multiplier: int = _doc(2, "StyleGAN2 channel multiplier (2 for config-f)")
    style_dim: int = _doc(512, "width of W")
    n_mlp: int = _doc(8, "layers of the generator's mapping network")

    def __post_init__(self) -> None:
        """Refuse values no network can be built from, naming the option."""
        for name in ("input_nc", "output_size", "encoder_input_size", "encoder_num_layers", "style_dim", "n_mlp",
                     "stylegan_channel_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.encoder_type not in ENCODER_TYPES:
            raise InputError(f"unknown encoder_type {self.encoder_type!r}; one of {', '.join(ENCODER_TYPES)}")
        if self.learn_in_w != (self.encoder_type == W_ENCODER):
            raise InputError(f"learn_in_w goes with encoder_type {W_ENCODER} and only with it")
        if not 16 <= self.output_size <= 1024 or self.output_size & (self.output_size - 1):
            raise InputError(f"output_size must be a power of two in 16..1024, got {self.output_size}")
        if self.encoder_input_size < 32 or self.encoder_input_size & (self.encoder_input_size - 1):
            raise InputError(f"encoder_input_size must be a power of two >= 32, got {self.encoder_input_size}")

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any], has_latent_avg: bool = True) -> "PSPArchitecture":
        """Read the architecture from a (reference or our) `opts` dict; absent keys take the
        reference defaults, and `start_from_latent_avg` defaults to whether a latent_avg is stored."""
        if not isinstance(opts, Mapping):
            raise InputError(f"'opts' must be a dict of options, got {type(opts).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in opts.items() if k in known and v is not None}
        values.setdefault("start_from_latent_avg", has_latent_avg)
        values.setdefault("learn_in_w", values.get("encoder_type") == W_ENCODER)
        return cls(**values)

    @property
    def n_styles(self) -> int:
        return n_styles_for(self.output_size)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and bookkeeping options of a pSp training run (reference defaults where it has them)."""

    max_steps: int = _doc(500_000, "optimiser steps to train for")
    optimizer: OptimizerName = _doc("ranger", "ranger (the reference's) or adam")
    learning_rate: float = _doc(1e-4, "optimiser learning rate")
    train_decoder: bool = _doc(False, "also train the generator's synthesis network")
    precision: Precision = _doc("fp32", "fp32, bf16 (autocast; CPUs with AVX-512 BF16 or AMX, GPUs) or fp16 (GPUs)")
    log_interval: int = _doc(50, "steps between logged training losses")
    image_interval: int = _doc(100, "steps between logged image grids")
    val_interval: int = _doc(1000, "steps between validations (and best-model selection)")
    save_interval: int = _doc(1000, "steps between resumable checkpoints")
    max_val_batches: int | None = _doc(None, "validation batches per validation (null: the whole test split)")
    seed: int = _doc(0, "seed of weights, data order and augmentation")

    def __post_init__(self) -> None:
        """Reject non-positive step counts and intervals."""
        for name in ("max_steps", "log_interval", "image_interval", "val_interval", "save_interval"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
