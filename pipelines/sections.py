"""Every section of params.yaml as a frozen, typed schema: one definition, default and one-line
description per key, which `--help` prints and validation enforces.

Importing this module costs pydantic, not torch: each command validates the whole params file
(every section, not only its own) before it starts work. The model and training options of the
`train` section are derived from `psp_core.options`, so each has one definition.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from psp_core.options import PresetName, PSPArchitecture, TrainingConfig


class StageConfig(BaseModel):
    """Base of every stage section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data stages

class SampleConfig(StageConfig):
    """`sample`: the embedded sample photo folder."""

    output_dir: str = Field("data/raw", description="folder the sample is written to (replaced as a whole)")
    seed: int = Field(0, description="seed of the augmentations")
    augmented_copies: int = Field(10, ge=0, le=200, description="seeded augmentations of each of the 2 base photos")
    lfw_faces: int = Field(20, ge=0, le=50, description="real faces of different people from scikit-image's lfw_subset()")


class AlignConfig(StageConfig):
    """`align`: FFHQ alignment of a photo folder."""

    input_dir: str = Field("data/raw", description="the photo folder (any tree; symlinked folders are not followed)")
    output_dir: str = Field("data/aligned", description="aligned faces, index.parquet, rejects.csv (a new or own folder)")
    report: str = Field("reports/align.json", description="counts by outcome (a DVC metric)")
    output_size: int = Field(256, ge=16, le=4096, description="side of the aligned image")
    supersample: int = Field(1, ge=1, le=8, description="resample at output_size x this, then downscale (FFHQ: 4)")
    faces: Literal["largest", "all"] = Field("largest", description="largest (box area x score) or all faces of a photo")
    upsample: int = Field(1, ge=0, le=3, description="dlib detector upsampling (finds smaller faces, slower)")
    threshold: float = Field(0.4, ge=-1.0, le=3.0, allow_inf_nan=False,
                             description="minimum dlib detector score, -1..3 (real faces score >= 0.5)")
    min_face_size: int = Field(48, ge=1, description="detector box width in pixels; smaller faces are too_small")
    detect_max_side: int = Field(1024, ge=64, description="detection runs on a copy no larger than this")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are rejected as too_large (decompression bombs)")
    skip_alignment: bool = Field(False, description="already aligned data: centre-crop and resize only")
    workers: int = Field(0, ge=0, description="processes; 0 = all usable cores")

    def output_key(self) -> str:
        """Hash of the settings that change the aligned output (records made under others are redone)."""
        import hashlib
        import json

        fields = self.model_dump(exclude={"input_dir", "output_dir", "report", "workers"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class ShardConfig(StageConfig):
    """`shard`: Parquet shards with a train/test split."""

    input_dir: str = Field("data/aligned", description="aligned images (align's output, or any image folder)")
    source_dir: str | None = Field(None, description="paired translation inputs with the same file names, or null")
    output_dir: str = Field("data/shards", description="shard folder (replaced as a whole; must be new or a shard folder)")
    report: str = Field("reports/shard.json", description="row counts (a DVC metric)")
    image_format: Literal["png", "jpeg"] = Field("png", description="stored format; files already in it are kept as is")
    jpeg_quality: int = Field(95, ge=50, le=100, description="quality when re-encoding to jpeg")
    rows_per_shard: int = Field(1000, ge=1, description="rows per Parquet file")
    row_group_size: int = Field(100, ge=1, description="rows per Parquet row group")
    test_fraction: float = Field(0.1, ge=0.0, le=1.0, description="share of groups in the test split")
    split_by: Literal["photo", "folder"] = Field(
        "photo", description="split groups: photo (all faces of one source photo) or folder (one identity per folder)")


# ----------------------------------------------------------------------------- training

ARCHITECTURE_KEYS = ("encoder_type", "output_size", "encoder_input_size", "start_from_latent_avg")
"""The `PSPArchitecture` options params.yaml sets (input_nc comes from the preset, learn_in_w from encoder_type)."""


def core_options(cls: type, names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """Pydantic field definitions (type, default, description) of a psp_core options dataclass."""
    hints = typing.get_type_hints(cls)
    wanted = None if names is None else set(names)
    return {f.name: (hints[f.name], Field(f.default, description=f.metadata.get("doc")))
            for f in dataclasses.fields(cls) if wanted is None or f.name in wanted}


class TrainSection(StageConfig):
    """`train`: pSp training on Ray Train, tracked in MLflow (model and optimiser keys from psp_core.options)."""

    preset: PresetName = Field("encode", description="task preset: input kind, augmentation, loss weights")
    loss: dict[str, float] = Field(default_factory=dict, description="loss weights replacing the preset's")
    shards: Path = Field(Path("data/shards"), description="shard folder (manifest.json)")
    generator: Path = Field(Path("pretrained_models/stylegan2-ffhq-config-f.pt"),
                            description="StyleGAN2 checkpoint (g_ema); absent: random weights, logged and tagged")
    irse50: Path = Field(Path("pretrained_models/model_ir_se50.pth"),
                         description="ArcFace IR-SE50 weights: encoder init and identity loss")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="AlexNet of LPIPS: pretrained (torch hub cache) or random (not LPIPS)")
    batch_size: int = Field(8, ge=1, description="images per worker per step")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker reserves")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are placed on nodes")
    storage_path: str = Field("ray_results", description="Ray Train checkpoints: a folder or URI every node sees")
    run_name: str = Field("auto", description="'auto': derived from the params and data, so an unchanged rerun resumes")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (from the last checkpoint)")
    num_to_keep: int = Field(2, ge=1, description="Ray checkpoints kept")
    experiment: str = Field("psp", description="MLflow experiment")
    registered_model: str = Field("psp-encoder", description="MLflow registered model the encoder is added to")
    alias: str = Field("candidate", description="alias set on the new version")
    report: Path = Field(Path("reports/train.json"), description="run id, registered version (models:/NAME/N), metrics")

    @model_validator(mode="after")
    def _core_accepts(self) -> "TrainSection":
        self.training()
        PSPArchitecture(**self._architecture_values())
        return self

    def _architecture_values(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in ARCHITECTURE_KEYS}
        return values | {"learn_in_w": values["encoder_type"] == "BackboneEncoderUsingLastLayerIntoW"}

    def architecture(self, input_nc: int) -> PSPArchitecture:
        """The pSp architecture these params describe, for the preset's `input_nc` input channels."""
        return PSPArchitecture(input_nc=input_nc, **self._architecture_values())

    def training(self) -> TrainingConfig:
        """The engine's options."""
        return TrainingConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingConfig)})


TrainConfig = create_model(
    "TrainConfig", __base__=TrainSection, __module__=__name__, __doc__=TrainSection.__doc__,
    **core_options(PSPArchitecture, ARCHITECTURE_KEYS), **core_options(TrainingConfig),
)


# ----------------------------------------------------------------------------- using an encoder

MODEL_DESCRIPTION = ("reports/train.json (the version that run registered), models:/NAME/VERSION, "
                     "models:/NAME@ALIAS (moves) or a pSp .pt file")


class EvaluateConfig(StageConfig):
    """`evaluate`: reconstruction quality on a split of the shards."""

    model: str = Field("reports/train.json", description=MODEL_DESCRIPTION)
    shards: Path = Field(Path("data/shards"), description="shard folder (manifest.json)")
    split: Literal["train", "test"] = Field("test", description="which split to score")
    batch_size: int = Field(8, ge=1, description="images per forward pass")
    max_images: int | None = Field(None, ge=1, description="score at most this many (null: the whole split)")
    preset: PresetName = Field("encode", description="task preset: how the encoder input is made from the shard images")
    irse50: Path = Field(Path("pretrained_models/model_ir_se50.pth"),
                         description="ArcFace weights for id_similarity (absent: dlib's face ResNet, not comparable)")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="AlexNet of LPIPS: pretrained (torch hub cache) or random (not LPIPS)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    report: Path = Field(Path("reports/eval.json"), description="mean metrics (a DVC metric)")
    per_image: Path = Field(Path("reports/eval_images.csv"), description="one row per image (DVC plots)")
    grid: Path = Field(Path("reports/eval_grid.png"), description="inputs over reconstructions")
    log_to_mlflow: bool = Field(True, description="for registry models: log to the version's run and eval_* tags")


class InvertConfig(StageConfig):
    """`invert`: batch inversion into W+ with Ray Data."""

    model: str = Field("reports/train.json", description=MODEL_DESCRIPTION)
    input: Path = Field(Path("data/shards"), description="a shard folder (manifest.json) or a folder of images")
    aligned: bool = Field(True, description="for an image folder: already aligned (else aligned first)")
    split: Literal["train", "test"] | None = Field(None, description="shard input: only this split (null: all rows)")
    output_dir: Path = Field(Path("data/latents"), description="latent Parquet files + manifest (a new or own folder)")
    report: Path = Field(Path("reports/invert.json"), description="counts and speed")
    batch_size: int = Field(8, ge=1, description="images per actor call")
    images_per_file: int = Field(256, ge=1, description="image-folder input: rows per output file")
    num_actors: int = Field(1, ge=1, description="Ray Data actors, each holding the model")
    cpus_per_actor: float = Field(2.0, gt=0, description="logical CPUs (and torch threads) per actor")
    use_gpu: bool = Field(False, description="one GPU per actor")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="forward precision (autocast)")
    reconstructions: bool = Field(True, description="store each reconstruction as PNG bytes")
    n_outputs: int = Field(0, ge=0, description="style-mixed variants per image (multi-modal synthesis)")
    latent_mask: list[int] | None = Field(None, description="layers to mix; null: layers 8 and up (upper half if fewer)")
    mix_alpha: float | None = Field(None, ge=0, le=1, description="blend of the mixed layers (null: replace them)")
    seed: int = Field(0, description="seed of the mixing codes (with each image id)")
    preset: PresetName = Field("encode", description="task preset: how the encoder input is made")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="AlexNet of the per-image LPIPS: pretrained or random (not LPIPS)")


SECTIONS: dict[str, type[StageConfig]] = {
    "sample": SampleConfig, "align": AlignConfig, "shard": ShardConfig, "train": TrainConfig,
    "evaluate": EvaluateConfig, "invert": InvertConfig,
}
"""Every section params.yaml may have; any other top-level key is an error."""


def describe(schema: type[BaseModel], section: str) -> list[str]:
    """One line per key: `section.key  type  (default ...)  description`, for `--help`."""
    lines = []
    for name, info in schema.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        kind = _type_name(info.annotation)
        lines.append(f"  {section}.{name} ({kind}, default {shown}): {info.description or ''}".rstrip(": "))
    return lines


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))

