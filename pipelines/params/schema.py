"""Every section of params.yaml as a frozen, typed schema: one definition, default and one-line
description per key, which `--help` prints and validation enforces.

Importing this module costs pydantic, not torch: each command validates the whole params file
(every section, not only its own) before it starts work. The model and training options of the
`train` section are derived from `psp_core.options`, so each has one definition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from pipelines.services.storage.locations import Location, reference_kind
from psp_core.options import (
    HYPERSTYLE,
    MAX_REFINE_ITERS,
    CompileSwitch,
    HyperStyleArchitecture,
    Precision,
    PresetName,
    PSPArchitecture,
    TrainingConfig,
    encoder_input_nc,
    preset_family,
)


def _data_path(value: Any) -> Any:
    """A local path as a `Path`; a URI (`s3://bucket/key`, or an MLflow `models:/` / `runs:/` one) kept as
    text (a Path would fold `//`), with credentials in it refused."""
    text = str(value) if isinstance(value, Path) else value
    if isinstance(text, str) and reference_kind(text) == "registry":
        return text
    if isinstance(text, str) and reference_kind(text) == "uri":
        return Location.of(text).uri
    return Path(text) if isinstance(text, str) else value


def _cache_folder(value: str | None) -> str | None:
    """A compile cache folder made absolute (`~` expanded, a relative one taken from where the command runs):
    Ray Train workers and Ray Data actors run in other working directories. Inductor's cache is local files:
    a URI is refused."""
    if value is not None and reference_kind(value) != "local":
        raise ValueError(f"a local folder (each machine keeps its own compile cache), not a URI: {value}")
    return None if value is None else str(Path(value).expanduser().absolute())


DataPath = Annotated[Path | str, BeforeValidator(_data_path)]
"""A data path setting: a local path, or a URI of an object store (see pipelines.services.storage.objects)."""

CacheFolder = Annotated[str | None, AfterValidator(_cache_folder)]
"""A local folder setting every process of a stage uses alike, wherever it runs: absolute once validated."""


class StageConfig(BaseModel):
    """Base of every stage section: unknown keys are errors, not silently ignored, and so is a number that is not
    finite (`.nan`, `.inf`) wherever a section holds one (strengths, loss weights, rates)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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

ARCHITECTURE_KEYS = ("encoder_type", "output_size", "encoder_input_size", "start_from_latent_avg",
                     "stylegan_channel_multiplier")
"""The `PSPArchitecture` options params.yaml sets (family and input_nc come from the preset, learn_in_w from
encoder_type)."""


def core_options(cls: type, names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """Pydantic field definitions (type, default, description) of a psp_core options dataclass."""
    hints = typing.get_type_hints(cls)
    wanted = None if names is None else set(names)
    return {f.name: (hints[f.name], Field(f.default, description=f.metadata.get("doc")))
            for f in dataclasses.fields(cls) if wanted is None or f.name in wanted}


class TrainSection(StageConfig):
    """`train`: pSp training on Ray Train, tracked in MLflow (model and optimiser keys from psp_core.options)."""

    preset: PresetName = Field("encode", description="task preset: input kind, augmentation, loss weights, "
                                                     "encoder family (restyle_encode: ReStyle-pSp, e4e_encode: e4e, "
                                                     "w_encode: W encoder, hyperstyle_encode: HyperStyle)")
    loss: dict[str, float] = Field(default_factory=dict, description="loss weights replacing the preset's")
    shards: DataPath = Field(Path("data/shards"), description="shard folder (manifest.json)")
    generator: DataPath = Field(Path("pretrained_models/stylegan2-ffhq-config-f.pt"),
                            description="StyleGAN2 checkpoint (g_ema); absent: random weights, logged and tagged")
    irse50: DataPath = Field(Path("pretrained_models/model_ir_se50.pth"),
                             description="ArcFace IR-SE50 weights: encoder init and identity loss")
    w_encoder: DataPath = Field(Path("pretrained_models/faces_w_encoder.pt"),
                                description="hyperstyle_encode: the trained W encoder (encoder.*) whose codes the "
                                            "hypernetwork refines; it stays frozen and is registered beside the model")
    resnet34: DataPath = Field(Path("pretrained_models/resnet34-333f7ec4.pth"),
                               description="hyperstyle_encode: torchvision's ImageNet ResNet-34, the hypernetwork's "
                                           "body; absent: random weights, logged and tagged")
    layers_to_tune: list[int] | None = Field(
        None, description="hyperstyle_encode: the generator layers (modulated convolutions, toRGBs included) the "
                          "hypernetwork offsets; null: the reference's default, every layer but the toRGBs")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="AlexNet of LPIPS: pretrained (torch hub cache) or random (not LPIPS)")
    batch_size: int = Field(8, ge=1, description="images per worker per step")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker reserves")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are placed on nodes")
    storage_path: str = Field("ray_results", description="Ray Train checkpoints: a folder or URI every node sees")
    run_name: str = Field("auto", description="'auto': derived from the params, data and weights files, so an "
                                              "unchanged rerun resumes")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (from the last checkpoint)")
    num_to_keep: int = Field(2, ge=1, description="Ray checkpoints kept")
    experiment: str = Field("psp", description="MLflow experiment")
    registered_model: str = Field("psp-encoder", description="MLflow registered model the encoder is added to")
    alias: str = Field("candidate", description="alias set on the new version")
    report: Path = Field(Path("reports/train.json"), description="run id, registered version (models:/NAME/N), metrics")

    @model_validator(mode="after")
    def _core_accepts(self) -> "TrainSection":
        self.training()
        self.architecture(3)
        return self

    def _architecture_values(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in ARCHITECTURE_KEYS}
        return values | {"learn_in_w": values["encoder_type"] == "BackboneEncoderUsingLastLayerIntoW"}

    def architecture(self, image_nc: int) -> PSPArchitecture | HyperStyleArchitecture:
        """The architecture these params describe: the preset's encoder family, seeing the preset's `image_nc`
        image channels (and, for ReStyle and HyperStyle, its last output)."""
        family = preset_family(self.preset)
        if family == HYPERSTYLE:
            layers = {} if self.layers_to_tune is None else {"layers_to_tune": tuple(self.layers_to_tune)}
            return HyperStyleArchitecture(encoder_type=self.encoder_type, input_nc=encoder_input_nc(family, image_nc),
                                          output_size=self.output_size, encoder_input_size=self.encoder_input_size,
                                          stylegan_channel_multiplier=self.stylegan_channel_multiplier, **layers)
        return PSPArchitecture(input_nc=encoder_input_nc(family, image_nc), family=family,
                               **self._architecture_values())

    def training(self) -> TrainingConfig:
        """The engine's options."""
        return TrainingConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingConfig)})


TRAINING_OPTIONS = core_options(TrainingConfig)
"""The engine's options as fields of the train section (its compile cache folder made absolute, as every stage's)."""
TrainConfig = create_model(
    "TrainConfig", __base__=TrainSection, __module__=__name__, __doc__=TrainSection.__doc__,
    **core_options(PSPArchitecture, ARCHITECTURE_KEYS),
    **(TRAINING_OPTIONS | {"compile_cache": (CacheFolder, TRAINING_OPTIONS["compile_cache"][1])}),
)


# ----------------------------------------------------------------------------- using an encoder

MODEL_DESCRIPTION = ("reports/train.json (the version that run registered), models:/NAME/VERSION, "
                     "models:/NAME@ALIAS (moves) or a .pt file (pSp, ReStyle-pSp, ReStyle-e4e, e4e, or HyperStyle "
                     "with its W encoder beside it or in pretrained_models/)")
N_ITERS_DESCRIPTION = "ReStyle and HyperStyle encoders: refinement steps (null: 5); pSp and e4e run one pass"
PRECISION_DESCRIPTION = "forward precision: auto (bf16 where the CPU/GPU computes it natively, else fp32), fp32, bf16, fp16 (CUDA)"
COMPILE_DESCRIPTION = ("torch.compile the networks: auto (when the job repays the compile, see benchmarks/README.md), "
                       "true, false")
COMPILE_CACHE_DESCRIPTION = "compiled-kernel cache folder (null: $PSP_COMPILE_CACHE_DIR, else ~/.cache/psp-pipeline/inductor)"


class RuntimeSection(StageConfig):
    """The runtime switches every stage that runs an encoder shares: forward precision, compilation, its cache."""

    precision: Precision = Field("auto", description=PRECISION_DESCRIPTION)
    compile: CompileSwitch = Field("auto", description=COMPILE_DESCRIPTION)
    compile_cache: CacheFolder = Field(None, description=COMPILE_CACHE_DESCRIPTION)


class ActorPoolSection(RuntimeSection):
    """The runtime of a Ray Data stage: an actor pool holding the model, and what each actor gets."""

    batch_size: int = Field(8, ge=1, description="rows per actor call")
    num_actors: int = Field(1, ge=1, description="Ray Data actors, each holding the model")
    cpus_per_actor: float = Field(2.0, gt=0, description="logical CPUs (and torch threads) per actor")
    use_gpu: bool = Field(False, description="one GPU per actor")


class EvaluateConfig(RuntimeSection):
    """`evaluate`: reconstruction quality on a split of the shards."""

    model: str = Field("reports/train.json", description=MODEL_DESCRIPTION)
    shards: DataPath = Field(Path("data/shards"), description="shard folder (manifest.json)")
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
    grid: Path = Field(Path("reports/eval_grid.png"),
                       description="inputs over reconstructions (every ReStyle or HyperStyle step)")
    n_iters: int | None = Field(None, ge=1, le=MAX_REFINE_ITERS,
                                description=N_ITERS_DESCRIPTION + "; metrics are reported per step")
    compare: list[str] = Field([], description="more models scored on the same images: adds a comparison table")
    comparison: Path = Field(Path("reports/eval_comparison"),
                             description="with compare: writes this path's .json, .md (a table) and .png (side by side)")
    log_to_mlflow: bool = Field(True, description="for registry models: log to the version's run and eval_* tags")


class InvertConfig(ActorPoolSection):
    """`invert`: batch inversion into W+ with Ray Data."""

    model: str = Field("reports/train.json", description=MODEL_DESCRIPTION)
    input: DataPath = Field(Path("data/shards"), description="a shard folder (manifest.json) or a folder of images")
    aligned: bool = Field(True, description="for an image folder: already aligned (else aligned first)")
    split: Literal["train", "test"] | None = Field(None, description="shard input: only this split (null: all rows)")
    output_dir: DataPath = Field(Path("data/latents"), description="latent Parquet files + manifest (a new or own folder)")
    report: Path = Field(Path("reports/invert.json"), description="counts and speed")
    images_per_file: int = Field(256, ge=1, description="image-folder input: rows per output file")
    n_iters: int | None = Field(None, ge=1, le=MAX_REFINE_ITERS,
                                description=N_ITERS_DESCRIPTION + "; the last step is stored, with every step's scores")
    reconstructions: bool = Field(True, description="store each reconstruction as PNG bytes")
    n_outputs: int = Field(0, ge=0, description="style-mixed variants per image (multi-modal synthesis)")
    latent_mask: list[int] | None = Field(None, description="layers to mix; null: layers 8 and up (upper half if fewer)")
    mix_alpha: float | None = Field(None, ge=0, le=1, description="blend of the mixed layers (null: replace them)")
    seed: int = Field(0, description="seed of the mixing codes (with each image id)")
    preset: PresetName = Field("encode", description="task preset: how the encoder input is made")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="AlexNet of the per-image LPIPS: pretrained or random (not LPIPS)")


# ----------------------------------------------------------------------------- editing the codes

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""A name that is usable as a file or folder name: edit names name grids and image folders."""


class StrengthRange(StageConfig):
    """Evenly spaced strengths from `start` to `end` (both included)."""

    start: float = Field(-3.0, allow_inf_nan=False, description="first strength")
    end: float = Field(3.0, allow_inf_nan=False, description="last strength")
    steps: int = Field(7, ge=1, le=64, description="strengths from start to end (grid columns)")

    def strengths(self) -> tuple[float, ...]:
        """The strengths, start first (one value, `start`, when steps is 1)."""
        if self.steps == 1:
            return (self.start,)
        step = (self.end - self.start) / (self.steps - 1)
        return tuple(self.start + k * step for k in range(self.steps))


class InterfaceganParams(StrengthRange):
    """An InterFaceGAN direction: `w_plus + factor * direction` for each factor of the range."""

    kind: Literal["interfacegan"]
    direction: str = Field(description="age | smile | pose (shipped, FFHQ 1024 px only) or a .pt file: "
                                       "[1, 512] (every style) or [1, n_styles, 512]")
    name: str | None = Field(None, pattern=SAFE_NAME, description="grid and folder name (default: the direction's)")


class GanspaceParams(StageConfig):
    """GANSpace principal components: each (pca_index, start, end, strength) sets style 0's coordinate along
    component pca_index to `strength` standard deviations and moves styles start..end-1 by that shift;
    entries sharing (pca_index, start, end) are one direction whose grid columns are their strengths."""

    kind: Literal["ganspace"]
    pca: str = Field("ffhq", description="ffhq (shipped, FFHQ 1024 px only) or a .pt file {mean, comp, std}")
    directions: list[tuple[int, int, int, float]] = Field(
        min_length=1, description="[pca_index, start, end, strength] entries (the released format)")
    name: str = Field("ganspace", pattern=SAFE_NAME, description="prefix of the directions' names")

    @model_validator(mode="after")
    def _ranges(self) -> "GanspaceParams":
        for index, start, end, _ in self.directions:
            if index < 0 or not 0 <= start < end:
                raise ValueError(f"GANSpace entry ({index}, {start}, {end}, ...): needs pca_index >= 0 and 0 <= start < end")
        return self


class SefaParams(StrengthRange):
    """SeFa: the top-k closed-form directions of the generator's own modulation weights, over a strength range."""

    kind: Literal["sefa"]
    styles: list[int] | None = Field(None, min_length=1,
                                     description="W+ styles to factorize and move (null: every style that drives a convolution)")
    top_k: int = Field(3, ge=1, le=512, description="directions of largest eigenvalue, one grid each")
    name: str = Field("sefa", pattern=SAFE_NAME, description="prefix of the directions' names")


EditEntry = typing.Annotated[InterfaceganParams | GanspaceParams | SefaParams, Field(discriminator="kind")]


class EditConfig(ActorPoolSection):
    """`edit`: InterFaceGAN / GANSpace / SeFa edits of invert's W+ codes with Ray Data."""

    input: DataPath = Field(Path("data/latents"), description="invert's output folder (manifest.json + Parquet)")
    model: str | None = Field(None, description="null: the models:/NAME/VERSION that made the codes (the invert "
                                                 "manifest's); a .pt file when invert ran on a file (checked by hash)")
    edits: list[EditEntry] = Field(
        default_factory=lambda: [SefaParams(kind="sefa")], min_length=1,
        description="list of {kind: interfacegan, direction, start, end, steps} | {kind: ganspace, pca, "
                    "directions: [[pca_index, start, end, strength], ...]} | {kind: sefa, styles, top_k, start, end, steps}")
    output_dir: DataPath = Field(Path("data/edits"), description="edited images, latents, grids, manifest (a new or own folder)")
    report: Path = Field(Path("reports/edit.json"), description="counts, speed, directions and grid files")
    generator: DataPath | None = Field(
        None, description="domain adaptation: decode with this StyleGAN2 checkpoint (g_ema, or an ADA pickle) of the "
                          "model generator's architecture, e.g. a toonified one; HyperStyle keeps each image's offsets")
    offset_layers: list[int] | None = Field(
        None, description="HyperStyle: the generator layers whose weight offsets are applied (null: every tuned "
                          "layer; the reference's toonify run keeps 14,15,17,18,20,21,23,24)")
    grid_images: int = Field(8, ge=1, le=64, description="rows of each grid: the first codes by id")
    grid_tile: int = Field(256, ge=16, le=1024, description="side of a grid cell in pixels")


SECTIONS: dict[str, type[StageConfig]] = {
    "sample": SampleConfig, "align": AlignConfig, "shard": ShardConfig, "train": TrainConfig,
    "evaluate": EvaluateConfig, "invert": InvertConfig, "edit": EditConfig,
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
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))

