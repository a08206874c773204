"""The options of a pSp network and of its training, as frozen dataclasses that import no torch.

They are the one definition (type, default, one-line doc in `metadata["doc"]`) of each option:
checkpoints store the architecture, the engine reads the training options, and the pipeline's
params schema is derived from both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Mapping

from psp_core.errors import InputError

Family = Literal["psp", "restyle_psp", "restyle_e4e", "e4e", "w_encoder", "hyperstyle"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
CompileSwitch = Literal["auto"] | bool
PresetName = Literal["encode", "frontalize", "sketch_to_face", "seg_to_face", "super_resolution", "toonify",
                     "restyle_encode", "e4e_encode", "w_encode", "hyperstyle_encode"]
OptimizerName = Literal["ranger", "adam"]

FAMILY_ENCODERS = {
    # pSp: one pass, image -> W+ (Richardson et al.)
    "psp": ("GradualStyleEncoder",                      # feature pyramid, one map2style per style
            "BackboneEncoderUsingLastLayerIntoW",       # one W code for every style
            "BackboneEncoderUsingLastLayerIntoWPlus"),  # W+ from the last backbone layer
    # ReStyle-pSp: iterative refinement, the encoder sees target + last output and adds a residual
    "restyle_psp": ("GradualStyleEncoder", "BackboneEncoder",          # IR-SE body (faces)
                    "ResNetGradualStyleEncoder", "ResNetBackboneEncoder"),  # ResNet-34 body (other domains)
    # ReStyle-e4e: as ReStyle-pSp, with e4e's W + per-style deltas
    "restyle_e4e": ("ProgressiveBackboneEncoder", "ResNetProgressiveBackboneEncoder"),
    # e4e: one pass, W plus per-style deltas from a feature pyramid (the editable one)
    "e4e": ("Encoder4Editing",),
    # W encoder: one pass, one W code repeated on every style (HyperStyle's initial inversion)
    "w_encoder": ("WEncoder",),
    # HyperStyle: a W encoder's code, decoded with per-image offsets of the generator's convolution weights that a
    # hypernetwork (ResNet-34 body) predicts from the target and the last output, refined over iterations
    "hyperstyle": ("SharedWeightsHyperNetResNet",             # one linear head per non-shared layer
                   "SharedWeightsHyperNetResNetSeparable"),   # separable (outer-product) heads
}
"""Encoder families and the encoder types each builds; the family decides how the model is run."""
HYPERSTYLE = "hyperstyle"
PSP_FAMILIES = tuple(family for family in FAMILY_ENCODERS if family != HYPERSTYLE)
"""The families a `PSP` (encoder + generator) holds; HyperStyle is its own network (`HyperStyleArchitecture`)."""
ENCODER_TYPES = tuple(dict.fromkeys(t for family in PSP_FAMILIES for t in FAMILY_ENCODERS[family]))
"""The encoder types a `PSP` builds (`psp_core.nets.encoders.ENCODERS`)."""
RESTYLE_FAMILIES = ("restyle_psp", "restyle_e4e")
REFINING_FAMILIES = RESTYLE_FAMILIES + (HYPERSTYLE,)
"""The families whose network sees the target beside its own last output and runs several iterations."""
E4E_OBJECTIVE_FAMILIES = ("e4e", "w_encoder")
"""The families trained with e4e's latent discriminator (a W encoder is "an e4e trained into W": HyperStyle's
README); only e4e has the per-style deltas that progressive stages and the delta regulariser act on."""
FAMILY_NAMES = {"psp": "pSp", "restyle_psp": "ReStyle-pSp", "restyle_e4e": "ReStyle-e4e", "e4e": "e4e",
                "w_encoder": "W encoder", "hyperstyle": "HyperStyle"}
"""Each family as the papers write it, for descriptions people read."""
REFINED_CHANNELS = 3   # ReStyle's extra input channels: the previous output (RGB)
W_ENCODER = "BackboneEncoderUsingLastLayerIntoW"   # pSp's learn_in_w encoder (one code, W+ by the generator)
IRSE_DEPTHS = (50, 100, 152)            # the IR / IR-SE bodies there are (`psp_core.nets.irse.UNITS_PER_STAGE`)
IRSE_MODES = ("ir", "ir_se")
STYLE_WIDTH = 512                       # every encoder head emits 512-d styles: the generator's W must be as wide
MAX_MAPPING_LAYERS = 8                  # StyleGAN2's mapping network (2 in some StyleGAN2-ADA configs)
MAX_CHANNEL_MULTIPLIER = 4              # config-e 1, config-f 2
MAX_ENCODER_INPUT = 1024
MAX_REFINE_ITERS = 20                   # ReStyle refinement steps a stage or a served model runs at most

PRESET_FAMILIES: dict[str, Family] = {"restyle_encode": "restyle_psp", "e4e_encode": "e4e", "w_encode": "w_encoder",
                                      "hyperstyle_encode": "hyperstyle"}
"""The task presets that train another encoder family than pSp, and that family. It lives here, torch-free,
so the params schema checks a preset against its encoder; `psp_core.data.presets.TaskPreset.family` reads it."""


def preset_family(preset: str) -> Family:
    """The encoder family a task preset trains: pSp unless `PRESET_FAMILIES` names another."""
    return PRESET_FAMILIES.get(preset, "psp")


def encoder_input_nc(family: str, image_nc: int) -> int:
    """Encoder input channels for images of `image_nc` channels: a ReStyle encoder (or HyperStyle's hypernetwork)
    also sees its last output."""
    return image_nc + (REFINED_CHANNELS if family in REFINING_FAMILIES else 0)


def n_styles_for(output_size: int) -> int:
    """Number of W+ styles of a generator of this output size (18 at 1024)."""
    return 2 * int(math.log2(output_size)) - 2


def check_sizes(output_size: Any, encoder_input_size: Any) -> None:
    """Refuse a generator output size or an encoder input size no network here is built at, naming the option."""
    for name, value, low, high in (("output_size", output_size, 16, 1024),
                                   ("encoder_input_size", encoder_input_size, 32, MAX_ENCODER_INPUT)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or value & (value - 1):
            raise InputError(f"{name} must be a power of two in {low}..{high}, got {value!r}")


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
    encoder_input_size: int = _doc(256, "side of the encoder's input image (a power of two in 32..1024)")
    encoder_num_layers: int = _doc(50, "IR-SE backbone depth: 50, 100 or 152")
    encoder_mode: str = _doc("ir_se", "IR backbone blocks: ir or ir_se")
    stylegan_channel_multiplier: int = _doc(2, "StyleGAN2 channel multiplier (2 for config-f; 1 for a StyleGAN2-ADA "
                                                "generator of channel_base 16384)")
    style_dim: int = _doc(512, "width of W")
    n_mlp: int = _doc(8, "layers of the generator's mapping network")
    family: Family = _doc("psp", f"encoder family, how the model is run: one of {', '.join(PSP_FAMILIES)}")

    def __post_init__(self) -> None:
        """Refuse values no network of the family can be built from (they may come from an untrusted file's
        opts, so sizes are bounded before anything is allocated), naming the option."""
        for name in ("input_nc", "output_size", "encoder_input_size", "encoder_num_layers", "style_dim", "n_mlp",
                     "stylegan_channel_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("start_from_latent_avg", "learn_in_w"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("encoder_type", "encoder_mode", "family"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"unknown {name} {getattr(self, name)!r}")
        if self.encoder_num_layers not in IRSE_DEPTHS:
            raise InputError(f"encoder_num_layers must be one of {', '.join(map(str, IRSE_DEPTHS))}, "
                             f"got {self.encoder_num_layers}")
        if self.encoder_mode not in IRSE_MODES:
            raise InputError(f"encoder_mode must be one of {', '.join(IRSE_MODES)}, got {self.encoder_mode!r}")
        if self.style_dim != STYLE_WIDTH:
            raise InputError(f"style_dim must be {STYLE_WIDTH} (the width of the encoders' styles), got {self.style_dim}")
        if self.n_mlp > MAX_MAPPING_LAYERS:
            raise InputError(f"n_mlp must be in 1..{MAX_MAPPING_LAYERS}, got {self.n_mlp}")
        if self.stylegan_channel_multiplier > MAX_CHANNEL_MULTIPLIER:
            raise InputError(f"stylegan_channel_multiplier must be in 1..{MAX_CHANNEL_MULTIPLIER}, "
                             f"got {self.stylegan_channel_multiplier}")
        if self.encoder_type not in ENCODER_TYPES:
            raise InputError(f"unknown encoder_type {self.encoder_type!r}; one of {', '.join(ENCODER_TYPES)}")
        if self.family == HYPERSTYLE:
            raise InputError("a HyperStyle network is not an encoder + generator pair: HyperStyleArchitecture "
                             "describes it")
        if self.family not in PSP_FAMILIES:
            raise InputError(f"unknown family {self.family!r}; one of {', '.join(PSP_FAMILIES)}")
        if self.encoder_type not in FAMILY_ENCODERS[self.family]:
            raise InputError(f"encoder_type {self.encoder_type} is not a {self.family} encoder; "
                             f"one of {', '.join(FAMILY_ENCODERS[self.family])}")
        if self.family in RESTYLE_FAMILIES and not (self.start_from_latent_avg and self.input_nc > REFINED_CHANNELS):
            raise InputError(f"a {self.family} encoder starts from latent_avg and sees the target plus the last "
                             f"output (input_nc > {REFINED_CHANNELS}), got start_from_latent_avg="
                             f"{self.start_from_latent_avg}, input_nc={self.input_nc}")
        if self.learn_in_w != (self.encoder_type == W_ENCODER):
            raise InputError(f"learn_in_w goes with encoder_type {W_ENCODER} and only with it")
        check_sizes(self.output_size, self.encoder_input_size)

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any], has_latent_avg: bool = True) -> "PSPArchitecture":
        """Read the architecture from a (reference or our) `opts` dict; absent keys take the
        reference defaults, and `start_from_latent_avg` defaults to whether a latent_avg is stored.
        e4e's `stylegan_size` is the output size; the family is read with `family_of`; ReStyle and
        the W encoder always start from latent_avg (their references ignore the option)."""
        if not isinstance(opts, Mapping):
            raise InputError(f"'opts' must be a dict of options, got {type(opts).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in opts.items() if k in known and v is not None}
        if "output_size" not in values and opts.get("stylegan_size") is not None:
            values["output_size"] = opts["stylegan_size"]
        values["family"] = family_of(opts)
        if values["family"] in RESTYLE_FAMILIES + ("w_encoder",):
            values["start_from_latent_avg"] = True
        values.setdefault("start_from_latent_avg", has_latent_avg)
        values.setdefault("learn_in_w", values.get("encoder_type") == W_ENCODER)
        return cls(**values)

    @property
    def n_styles(self) -> int:
        return n_styles_for(self.output_size)


def family_of(opts: Mapping[str, Any]) -> str:
    """The encoder family of an `opts` dict: its `family` (ours), else what its encoder type builds;
    a GradualStyleEncoder is ReStyle's when the opts carry ReStyle's `n_iters_per_batch`."""
    if opts.get("family") is not None:
        return opts["family"]
    encoder_type = opts.get("encoder_type") or PSPArchitecture.encoder_type
    if encoder_type in FAMILY_ENCODERS["psp"] and "n_iters_per_batch" not in opts:
        return "psp"
    return next((family for family, types in FAMILY_ENCODERS.items() if family != "psp" and encoder_type in types),
                "psp")   # an unknown encoder type: PSPArchitecture names it


HYPERSTYLE_W_ENCODER = "faces_w_encoder.pt"   # the reference's W encoder file when the opts name none
HYPERSTYLE_DEFAULT_LAYERS = (0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24)
"""The reference's default `layers_to_tune`: every layer but the toRGBs (of a 1024 px generator)."""


def parse_layers_to_tune(value: Any, n_outputs: int) -> tuple[int, ...]:
    """The reference's `layers_to_tune` (a comma list, or a list of ints) as increasing layer indices: an empty list
    means every layer, and indices past the generator's last layer are ignored, as the reference does."""
    bad = InputError(f"layers_to_tune must be a comma-separated list of layer indices, got {value!r}")
    items = (value.split(",") if value.strip() else []) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, (int, str)) for i in items):
        raise bad
    try:
        layers = {int(item) for item in items}
    except ValueError:
        raise bad from None
    if any(layer < 0 for layer in layers):
        raise InputError(f"layers_to_tune holds a negative layer index: {value!r}")
    return tuple(sorted(layer for layer in layers if layer < n_outputs)) if layers else tuple(range(n_outputs))


@dataclass(frozen=True)
class HyperStyleArchitecture:
    """Everything that fixes the tensors of a HyperStyle checkpoint, under the reference opts' names. The generator
    is StyleGAN2 with 8 mapping layers (config-f, channel multiplier 2, unless the opts say otherwise: an extra key
    the reference ignores) and the hypernetwork and the W encoder see 256x256 images (`encoder_input_size`, ours too:
    a smaller network for experiments and tests; the released files are 256)."""

    encoder_type: str = _doc("SharedWeightsHyperNetResNet",
                             f"hypernetwork: one of {', '.join(FAMILY_ENCODERS[HYPERSTYLE])}")
    input_nc: int = _doc(6, "hypernetwork input channels: the target and the last output, RGB each")
    output_size: int = _doc(1024, "generator output size in pixels (a power of two, 16..1024; released: 256, 512, "
                                  "1024)")
    layers_to_tune: tuple[int, ...] = _doc(HYPERSTYLE_DEFAULT_LAYERS, "generator layers (modulated convolutions in "
                                           "order, toRGBs included) whose weights get offsets; a comma list is read, "
                                           "empty is every layer, indices past the last layer are ignored")
    family: Family = _doc(HYPERSTYLE, "encoder family (always hyperstyle)")
    stylegan_channel_multiplier: int = _doc(2, "StyleGAN2 channel multiplier (2 for config-f, as every released "
                                               "HyperStyle; 1 for a StyleGAN2-ADA generator of channel_base 16384)")
    encoder_input_size: int = _doc(256, "side of the hypernetwork's and the W encoder's input image (a power of two "
                                        "in 32..1024; every released HyperStyle: 256)")

    style_dim: ClassVar[int] = STYLE_WIDTH
    n_mlp: ClassVar[int] = MAX_MAPPING_LAYERS
    start_from_latent_avg: ClassVar[bool] = True   # the W encoder's code is relative to latent_avg
    learn_in_w: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Refuse what no HyperStyle network is built from, naming the option."""
        if self.family != HYPERSTYLE:
            raise InputError(f"a HyperStyleArchitecture's family is {HYPERSTYLE}, got {self.family!r}")
        if not isinstance(self.encoder_type, str) or self.encoder_type not in FAMILY_ENCODERS[HYPERSTYLE]:
            raise InputError(f"unknown HyperStyle encoder_type {self.encoder_type!r}; one of "
                             f"{', '.join(FAMILY_ENCODERS[HYPERSTYLE])}")
        if isinstance(self.input_nc, bool) or self.input_nc != 2 * REFINED_CHANNELS:
            raise InputError(f"input_nc must be {2 * REFINED_CHANNELS} (the target and the last output), "
                             f"got {self.input_nc!r}")
        check_sizes(self.output_size, self.encoder_input_size)
        multiplier = self.stylegan_channel_multiplier
        if (isinstance(multiplier, bool) or not isinstance(multiplier, int)
                or not 1 <= multiplier <= MAX_CHANNEL_MULTIPLIER):
            raise InputError(f"stylegan_channel_multiplier must be in 1..{MAX_CHANNEL_MULTIPLIER}, got {multiplier!r}")
        layers = parse_layers_to_tune(self.layers_to_tune, self.n_hypernet_outputs)
        if not layers:
            raise InputError(f"layers_to_tune {self.layers_to_tune!r}: no layer of a {self.output_size} px generator")
        object.__setattr__(self, "layers_to_tune", layers)   # the normal form: equal networks, equal values

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any]) -> "HyperStyleArchitecture":
        """Read a released HyperStyle checkpoint's `opts` (`layers_to_tune` a comma list, empty for every layer);
        refuses the cars models (they crop their images) and W encoders other than `WEncoder`."""
        if not isinstance(opts, Mapping):
            raise InputError(f"'opts' must be a dict of options, got {type(opts).__name__}")
        if "cars" in str(opts.get("dataset_type") or ""):
            raise InputError(f"dataset_type {opts['dataset_type']}: HyperStyle's cars models crop their images to "
                             "192x256, which this project does not run")
        if opts.get("w_encoder_type", "WEncoder") != "WEncoder":
            raise InputError(f"w_encoder_type {opts['w_encoder_type']!r}: HyperStyle's W encoder is a WEncoder")
        if "layers_to_tune" not in opts:
            raise InputError("the opts name no layers_to_tune (the generator layers the hypernetwork tunes)")
        values = {k: opts[k] for k in ("encoder_type", "input_nc", "output_size", "stylegan_channel_multiplier",
                                       "encoder_input_size") if opts.get(k) is not None}
        arch = cls(**values, layers_to_tune=opts["layers_to_tune"])
        declared = opts.get("n_hypernet_outputs")
        if declared is not None and declared != arch.n_hypernet_outputs:
            raise InputError(f"n_hypernet_outputs {declared}: a {arch.output_size} px generator has "
                             f"{arch.n_hypernet_outputs} modulated convolutions")
        return arch

    @property
    def n_styles(self) -> int:
        return n_styles_for(self.output_size)

    @property
    def n_hypernet_outputs(self) -> int:
        """The generator's modulated convolutions (toRGBs included): the layers an offset can go to."""
        return 3 * int(math.log2(self.output_size)) - 4   # a conv and a toRGB at 4 px, two convs and a toRGB above


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and bookkeeping options of a pSp training run (reference defaults where it has them)."""

    max_steps: int = _doc(500_000, "optimiser steps to train for")
    optimizer: OptimizerName = _doc("ranger", "ranger (the reference's) or adam")
    learning_rate: float = _doc(1e-4, "optimiser learning rate")
    train_decoder: bool = _doc(False, "also train the generator's synthesis network")
    precision: Precision = _doc("fp32", "auto (bf16 where the CPU/GPU computes it natively, else fp32), fp32, bf16 "
                                        "(autocast; CPUs with AVX-512 BF16 or AMX, GPUs) or fp16 (GPUs)")
    compile: CompileSwitch = _doc(False, "torch.compile the training forward (the loss networks stay eager): true, "
                                         "false or auto (when max_steps x batch images repay a compile on this device; never bf16 on a "
                                         "CPU, where inductor's compiled bf16 training went NaN)")
    compile_cache: str | None = _doc(None, "folder of the persistent compile cache (null: $PSP_COMPILE_CACHE_DIR, "
                                           "else psp-pipeline/inductor under the user's cache folder)")
    log_interval: int = _doc(50, "steps between logged training losses")
    image_interval: int = _doc(100, "steps between logged image grids")
    val_interval: int = _doc(1000, "steps between validations (and best-model selection)")
    save_interval: int = _doc(1000, "steps between resumable checkpoints")
    max_val_batches: int | None = _doc(None, "validation batches per validation (null: the whole test split)")
    seed: int = _doc(0, "seed of weights, data order and augmentation")
    n_iters_per_batch: int = _doc(5, "ReStyle encoders: refinement iterations per batch, each loss back-propagated, "
                                     "then one optimiser step (pSp and e4e run one pass)")
    progressive_start: int | None = _doc(None, "e4e: step at which layer 1's delta joins, one more layer every "
                                               "progressive_step_every steps after (w alone before it; the released "
                                               "run: 20000); null: every delta from the start")
    progressive_step_every: int = _doc(2000, "e4e: steps between progressive stages")
    w_discriminator_lr: float = _doc(2e-5, "e4e: Adam learning rate of the latent discriminator")
    r1: float = _doc(10.0, "e4e: weight of the discriminator's R1 penalty")
    d_reg_every: int = _doc(16, "e4e: steps between R1 updates of the discriminator")
    use_w_pool: bool = _doc(True, "e4e: feed the discriminator through pools of earlier codes (the released run's "
                                  "setting; the reference's default is off)")
    w_pool_size: int = _doc(50, "e4e: codes each pool holds")
    delta_norm: float = _doc(2.0, "e4e: p of the delta regulariser's norm ||w_i - w_0||_p")

    def __post_init__(self) -> None:
        """Reject non-positive step counts, intervals and iteration counts."""
        for name in ("max_steps", "log_interval", "image_interval", "val_interval", "save_interval",
                     "n_iters_per_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.compile != "auto" and not isinstance(self.compile, bool):
            raise InputError(f"compile must be auto, true or false, got {self.compile!r}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("progressive_step_every", "d_reg_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.progressive_start is not None and self.progressive_start < 0:
            raise InputError(f"progressive_start must be >= 0 or null, got {self.progressive_start}")
        if self.w_pool_size < 0 or self.r1 < 0:
            raise InputError(f"w_pool_size and r1 must be >= 0, got {self.w_pool_size} and {self.r1}")
        if not (self.w_discriminator_lr > 0 and self.delta_norm > 0):
            raise InputError(f"w_discriminator_lr and delta_norm must be > 0, got {self.w_discriminator_lr} "
                             f"and {self.delta_norm}")


@dataclass(frozen=True)
class LossWeights:
    """The lambdas of the pSp objective, named as in the reference training options."""

    l2_lambda: float = 1.0
    lpips_lambda: float = 0.8
    id_lambda: float = 0.0
    w_norm_lambda: float = 0.0
    l2_lambda_crop: float = 0.0
    lpips_lambda_crop: float = 0.0
    moco_lambda: float = 0.0
    w_discriminator_lambda: float = 0.0   # e4e: the latent discriminator's adversarial term (e4e encoders only)
    delta_norm_lambda: float = 0.0        # e4e: the delta regulariser, while training progressively (e4e's 2e-4)

    def __post_init__(self) -> None:
        """Reject negative weights and the identity/MoCo combination, which the reference also forbids."""
        for name, value in ((f.name, getattr(self, f.name)) for f in fields(self)):
            if value < 0:
                raise InputError(f"loss weight {name} must be >= 0, got {value}")
        if self.id_lambda > 0 and self.moco_lambda > 0:
            raise InputError("id_lambda and moco_lambda are mutually exclusive: set one of them to 0")
