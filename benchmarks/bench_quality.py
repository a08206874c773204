"""Quality on a known generator: pSp, e4e, ReStyle-pSp and HyperStyle learn to invert a frozen generator's own
samples, whose true W+ codes are known, through the product's training path.

No pretrained weights reach these machines, so no published metric can be reproduced; inversion has a
setting with ground truth that needs none. A frozen generator (seeded random weights, or a given
checkpoint) draws training and validation images from W (truncation 0.7 around `w_avg`; `--mixing`:
W+ with per-layer mixing of two codes); they are written as PNG files and packed by `psp shard`'s own
writer into Parquet shards, read back with the shard reader, and each encoder is trained by the engine
(`build_psp` loading the generator file, `Trainer`, the `encode` / `restyle_encode` / `e4e_encode` presets, `PSPLoss`)
for the same optimiser steps and batch size. HyperStyle (`--encoders w_encoder hyperstyle`; the released networks read
256 px: `--size 256 --encoder-size 256`) first trains its W encoder (`w_encode`) for those steps, then the
hypernetwork (`build_hyperstyle` on that W encoder's file, `hyperstyle_encode`) for as many more. Reported per
encoder: validation image L2 and MS-SSIM before and after training (at the generator's resolution, outputs clamped
to [-1, 1]), the error to the true W+ codes, the codes' distance from W (their variance across styles, e4e's
editability proxy), how well an edit transfers (`edit_transfer`: the same SeFa edit on the true and on the inverted
code) and training images/s;
ReStyle-pSp and HyperStyle are evaluated at every refinement iteration (the inference core's `invert`). HyperStyle's
codes are its W encoder's: its edit-transfer figure is theirs, decoded without the image's offsets.

Run: python benchmarks/bench_quality.py --steps 400 --size 32 --json quality.json [--plot P.png --grid G.png]
(about 17 minutes on 2 CPU cores; `--steps 60` for a first look). HyperStyle beside ReStyle-pSp at 256 px:
python benchmarks/bench_quality.py --size 256 --encoder-size 256 --channel-multiplier 1 \
    --encoders restyle_psp w_encoder hyperstyle --steps 40 --batch-size 2 --restyle-iters 2 --json hyperstyle.json
(about 25 minutes on 2 CPU cores; benchmarks/README.md)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.params.schema import ShardConfig  # noqa: E402
from pipelines.services.storage import atomic_path, write_json_atomic  # noqa: E402
from pipelines.stages.shard import write_shards  # noqa: E402
from psp_core import (  # noqa: E402
    HyperStyleArchitecture,
    PSPArchitecture,
    PSPLoss,
    Trainer,
    TrainingConfig,
    build_hyperstyle,
    build_psp,
    get_preset,
    save_psp,
)
from psp_core.data.presets import PresetTransform, TaskPreset  # noqa: E402
from psp_core.data.shards import iter_shard_batches, shard_paths  # noqa: E402
from psp_core.data.transforms import to_signed, to_unit_float  # noqa: E402
from psp_core.editing.directions import sefa, sefa_directions  # noqa: E402
from psp_core.errors import InputError  # noqa: E402
from psp_core.evaluation.metrics import l2_per_image, ms_ssim_per_image  # noqa: E402
from psp_core.inference import InferenceModel, choose_device  # noqa: E402
from psp_core.nets.checkpoints import atomic_torch_save, read_generator_checkpoint  # noqa: E402
from psp_core.nets.stylegan2 import Generator, use_exact_modulation  # noqa: E402
from psp_core.options import MAX_CHANNEL_MULTIPLIER, MAX_REFINE_ITERS, REFINING_FAMILIES  # noqa: E402
from psp_core.runtime.devices import resolve_precision  # noqa: E402
from psp_core.training.callbacks import NullCallback  # noqa: E402

TRUNCATION = 0.7
"""Samples are w_avg + 0.7 (w - w_avg): the usual truncation for a generator's typical images."""

HEADROOM = 0.5
"""The average image's largest deviation from its mean is mapped to +-0.5: the truncated samples vary
about as much again around it, so they stay inside [-1, 1] (the share clipped is reported)."""

MEAN_LATENT_SAMPLES = 10_000
PREVIEW_IMAGES = 8
EVAL_BATCH = 8
"""Images per generator pass when rendering and scoring in float32. The generators here run the fused modulated
convolution (`use_exact_modulation(..., False)`), whose cost per image falls with the batch: decoding 32 codes with
the seeded 16 px generator took 1.22 s two at a time, 0.75 s eight at a time, 0.69 s sixteen (32 px: 3.68, 3.24,
3.41 s; one thread of a 2-core EPYC). HyperStyle's decode with offsets runs the grouped form, which costs at 256 px
what the shared weight does (benchmarks/README.md, "A weight per image")."""


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of the benchmark: the preset it trains with, its family and network."""

    preset: str
    family: str
    encoder_type: str
    objective: str


ENCODERS: dict[str, EncoderSpec] = {
    "psp": EncoderSpec("encode", "psp", "GradualStyleEncoder", "pSp objective"),
    "restyle_psp": EncoderSpec("restyle_encode", "restyle_psp", "BackboneEncoder",
                               "pSp objective at every refinement iteration (ReStyle's coach)"),
    "e4e": EncoderSpec("e4e_encode", "e4e", "Encoder4Editing",
                       "e4e's objective: progressive deltas, the delta regulariser and the latent discriminator "
                       "(schedule and discriminator learning rate scaled to the run, `e4e_schedule`)"),
    "w_encoder": EncoderSpec("w_encode", "w_encoder", "WEncoder",
                             "e4e's objective with one code for every style (HyperStyle's W encoder; the latent "
                             "discriminator's learning rate scaled to the run, `e4e_schedule`)"),
    "hyperstyle": EncoderSpec("hyperstyle_encode", "hyperstyle", "SharedWeightsHyperNetResNet",
                              "HyperStyle's coach: the hypernetwork's offsets on the frozen W encoder's codes, a "
                              "backward per refinement iteration, one optimiser step per batch"),
}
"""The encoders, in report order: pSp; ReStyle-pSp with its released encoder; e4e's encoder; HyperStyle's W encoder;
HyperStyle on that W encoder (listed after it: it is built on its file)."""

SEEDED_SIZES = (16, 32, 64, 256)   # the seeded generator's output sizes


def refines(name: str) -> bool:
    """Whether an encoder runs refinement iterations (ReStyle, HyperStyle): it is scored at each of them."""
    return ENCODERS[name].family in REFINING_FAMILIES


@dataclass(frozen=True)
class QualityConfig:
    """Everything one benchmark run depends on."""

    steps: int = 400
    size: int = 32
    encoder_size: int = 32   # the images' own size: the encoder sees them unresized
    batch_size: int = 8
    train_images: int = 160
    val_images: int = 24
    restyle_iters: int = 3   # refinement iterations of ReStyle and of HyperStyle, in training and at evaluation
    eval_every: int = 50
    learning_rate: float = 1e-3   # hundreds of steps, not the reference's 500k at 1e-4 (benchmarks/README.md)
    precision: str = "auto"
    mixing: bool = False
    generator: Path | None = None
    channel_multiplier: int = 2   # the seeded generator's (1: a quarter of the cost at 256 px)
    encoders: tuple[str, ...] = ("psp", "restyle_psp", "e4e")
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that cannot run, naming the option."""
        if self.generator is None and self.size not in SEEDED_SIZES:
            raise InputError(f"--size must be one of {', '.join(map(str, SEEDED_SIZES))} for the seeded generator, "
                             f"got {self.size}")
        unknown = [name for name in self.encoders if name not in ENCODERS]
        if unknown or not self.encoders:
            raise InputError(f"--encoders: unknown {unknown}; choose from {', '.join(ENCODERS)}")
        if "hyperstyle" in self.encoders and "w_encoder" not in self.encoders[:self.encoders.index("hyperstyle")]:
            raise InputError("--encoders: hyperstyle refines a trained W encoder's codes; list w_encoder before it")
        for name in ("steps", "batch_size", "restyle_iters", "eval_every", "val_images", "channel_multiplier"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.channel_multiplier > MAX_CHANNEL_MULTIPLIER or self.restyle_iters > MAX_REFINE_ITERS:
            raise InputError(f"--channel-multiplier must be at most {MAX_CHANNEL_MULTIPLIER} and --restyle-iters at "
                             f"most {MAX_REFINE_ITERS}, got {self.channel_multiplier} and {self.restyle_iters}")
        if self.train_images < self.batch_size:
            raise InputError(f"--train-images {self.train_images} cannot fill one batch of {self.batch_size}")


# ----------------------------------------------------------------------------- the known generator

@dataclass
class KnownGenerator:
    """The frozen generator whose samples are inverted, its output already mapped to [-1, 1]."""

    generator: Generator
    latent_avg: Tensor   # [1, 512]
    scale: float
    shift: float

    @property
    def n_styles(self) -> int:
        return self.generator.n_latent


def average_image(generator: Generator, latent_avg: Tensor) -> Tensor:
    """The generator's image of w_avg, stored noise: [1, 3, S, S]."""
    with torch.no_grad():
        image, _ = generator([latent_avg], input_is_latent=True, randomize_noise=False)
    return image


def output_affine(generator: Generator, latent_avg: Tensor) -> tuple[float, float]:
    """(scale, shift) of the one affine map x -> scale * x + shift, measured once on the average image:
    its mean goes to 0 and its largest deviation from the mean to +-HEADROOM."""
    image = average_image(generator, latent_avg)
    mean = float(image.mean())
    scale = HEADROOM / float((image - mean).abs().max())
    return scale, -scale * mean


def bake_affine(generator: Generator, scale: float, shift: float) -> None:
    """Put the affine map into the generator's own weights, so the checkpoint file computes it: the
    RGB skip path is linear, so scaling every ToRGB's weight and bias scales the image, and the
    last ToRGB's bias (added after the upsampled skip) carries the shift."""
    to_rgbs = [generator.to_rgb1, *generator.to_rgbs]
    with torch.no_grad():
        for to_rgb in to_rgbs:
            to_rgb.conv.weight.mul_(scale)
            to_rgb.bias.mul_(scale)
        to_rgbs[-1].bias.add_(shift)


def known_generator(size: int, seed: int, checkpoint: Path | None, channel_multiplier: int = 2) -> KnownGenerator:
    """A frozen generator (seeded random weights at `size`, or `checkpoint`'s) with the output affine
    measured on its average image and baked into its weights. It runs its modulated convolutions in the fused form,
    as the encoders' decoders do: the reference's rounding is for parity, and at 16 px the fused form runs 2.3x
    (batch 2) to 6.6x (batch 8) faster (benchmarks/README.md, bench_modconv.py)."""
    if checkpoint is not None:
        loaded = read_generator_checkpoint(checkpoint)
        generator, latent_avg = loaded.generator, loaded.latent_avg
        if generator.size != size:
            raise InputError(f"--generator {checkpoint} outputs {generator.size} px, --size says {size}")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = Generator(size, channel_multiplier=channel_multiplier)
        latent_avg = None
    generator = use_exact_modulation(generator.eval().requires_grad_(False), False)
    if latent_avg is None:
        latent_avg = generator.mean_latent(MEAN_LATENT_SAMPLES, generator=torch.Generator().manual_seed(seed))
    latent_avg = latent_avg.reshape(1, -1).float()
    before = average_image(generator, latent_avg)
    scale, shift = output_affine(generator, latent_avg)
    bake_affine(generator, scale, shift)
    after = average_image(generator, latent_avg)
    assert torch.allclose(after, scale * before + shift, atol=1e-4), "the baked affine map is not the measured one"
    return KnownGenerator(generator, latent_avg, scale, shift)


def write_generator(known: KnownGenerator, path: Path) -> Path:
    """The generator as a public-layout checkpoint `{'g_ema', 'latent_avg'}`, which `build_psp` loads."""
    return atomic_torch_save({"g_ema": known.generator.state_dict(), "latent_avg": known.latent_avg[0]}, path)


def sample_codes(known: KnownGenerator, count: int, seed: int, mixing: bool) -> Tensor:
    """True codes [count, n_styles, 512]: w from z ~ N(0, I), truncated toward w_avg; with `mixing`,
    each layer takes one of two such w, chosen per layer (a W+ code)."""
    rng = torch.Generator().manual_seed(seed)
    draws = 2 if mixing else 1
    z = torch.randn(count * draws, known.generator.style_dim, generator=rng)
    with torch.no_grad():
        w = known.generator.get_latent(z)
    w = known.latent_avg + TRUNCATION * (w - known.latent_avg)
    codes = w.view(count, draws, 1, -1).expand(-1, -1, known.n_styles, -1)
    if not mixing:
        return codes[:, 0].contiguous()
    choice = torch.randint(2, (count, 1, known.n_styles, 1), generator=rng)
    return codes.gather(1, choice.expand(-1, -1, -1, codes.shape[-1]))[:, 0].contiguous()


def render(known: KnownGenerator, codes: Tensor) -> Tensor:
    """Images [N, 3, S, S] of W+ codes [N, n_styles, 512] (stored noise), in batches."""
    images = []
    with torch.no_grad():
        for start in range(0, codes.shape[0], EVAL_BATCH):
            batch, _ = known.generator([codes[start:start + EVAL_BATCH]], input_is_latent=True,
                                       randomize_noise=False)
            images.append(batch)
    return torch.cat(images)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float [N, 3, H, W] -> uint8 [N, 3, H, W] (values outside [-1, 1] clip)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_images(pixels: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] -> float [N, 3, H, W] in [-1, 1]."""
    return to_signed(to_unit_float(pixels))


# ----------------------------------------------------------------------------- data as shards

def sample_name(index: int) -> str:
    return f"sample{index:05d}.png"


def write_split_shards(pixels: Tensor, root: Path, split: str) -> Path:
    """Write the images [N, 3, S, S] uint8 as PNG files and pack them with `psp shard`'s writer into
    their own shard folder, every row in `split` (test_fraction 0 or 1, so each set keeps its size)."""
    folder = root / "png" / split
    folder.mkdir(parents=True)
    for index, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / sample_name(index))
    shard_dir = root / "shards" / split
    write_shards(ShardConfig(input_dir=str(folder), output_dir=str(shard_dir),
                             report=str(root / "reports" / f"shard-{split}.json"),
                             test_fraction=1.0 if split == "test" else 0.0))
    return shard_dir


def read_split(shard_dir: Path, split: str) -> tuple[Tensor, list[int]]:
    """Every row of `split` decoded by the shard reader: uint8 [N, 3, S, S] and each row's sample index."""
    pixels, indices = [], []
    for batch in iter_shard_batches(shard_paths(shard_dir, verify=True), 256, split=split):
        pixels.append(torch.from_numpy(batch.images).permute(0, 3, 1, 2))
        indices.extend(int(Path(path).stem.removeprefix("sample")) for path in batch.source_paths)
    return torch.cat(pixels), indices


@dataclass
class KnownData:
    """Training images, validation images and their true codes, as read back from the shards."""

    train: Tensor        # uint8 [N, 3, S, S]
    val: Tensor          # uint8 [M, 3, S, S]
    val_codes: Tensor    # [M, n_styles, 512]
    clipped_fraction: float


def make_data(known: KnownGenerator, cfg: QualityConfig, root: Path) -> KnownData:
    """Sample both sets (different seeds), shard them, read them back; codes follow the rows' order."""
    sets = {}
    clipped = []
    for split, count, seed in (("train", cfg.train_images, cfg.seed + 1), ("test", cfg.val_images, cfg.seed + 2)):
        codes = sample_codes(known, count, seed, cfg.mixing)
        images = render(known, codes)
        clipped.append((images.abs() > 1).float().mean().item() * count)
        pixels, order = read_split(write_split_shards(to_uint8(images), root, split), split)
        if sorted(order) != list(range(count)):
            raise RuntimeError(f"the {split} shards hold {len(order)} rows for {count} samples")
        sets[split] = (pixels, codes[order])
    return KnownData(sets["train"][0], sets["test"][0], sets["test"][1],
                     sum(clipped) / (cfg.train_images + cfg.val_images))


def epoch_batches(pixels: Tensor, batch_size: int, seed: int) -> Callable[[int], list[tuple[Tensor, Tensor]]]:
    """The engine's `epoch -> batches` source: a seeded shuffle per epoch, full batches of (source,
    target) uint8 [B, 3, S, S] (the same image: inversion)."""
    def batches(epoch: int) -> list[tuple[Tensor, Tensor]]:
        order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        chunks = order[: len(order) // batch_size * batch_size].view(-1, batch_size)
        return [(pixels[chunk], pixels[chunk]) for chunk in chunks]
    return batches


# ----------------------------------------------------------------------------- evaluation

EDIT_DISTANCE = 3.0
"""SeFa distance of the editability probe: the usual range of SeFa's edits is -3..3 along a unit direction."""


def sefa_probe(generator: Generator) -> tuple[Tensor, list[int]]:
    """The generator's strongest SeFa direction [512] over every style its convolutions take, and those styles."""
    styles = list(range(1 + len(generator.convs)))
    return sefa_directions(generator, styles)[1][0], styles


def edit_transfer(generator: Generator, found: Tensor, true: Tensor) -> float:
    """Editability, measured: the same SeFa edit (`sefa_probe`, EDIT_DISTANCE) applied to the inverted codes `found`
    and to the true codes `true` [N, n_styles, 512]; the mean L2 between the two edited images over the mean L2
    between the two unedited ones. 1: the edit keeps the inversion as close to the truth as it was; above 1: the
    inverted code edits differently (it sits where the generator responds otherwise, away from W)."""
    direction, styles = sefa_probe(generator)
    device = next(generator.parameters()).device
    found, true = found.to(device), true.to(device)
    edited_found = sefa(found, direction, styles, [EDIT_DISTANCE])[0]
    edited_true = sefa(true, direction, styles, [EDIT_DISTANCE])[0]
    decoded = {name: torch.cat([generator([codes[i:i + EVAL_BATCH]], input_is_latent=True, randomize_noise=False)[0]
                                for i in range(0, codes.shape[0], EVAL_BATCH)])
               for name, codes in (("found", found), ("true", true), ("edited_found", edited_found),
                                   ("edited_true", edited_true))}
    apart = lambda a, b: float(l2_per_image(decoded[a].float(), decoded[b].float()).mean())  # noqa: E731
    return apart("edited_found", "edited_true") / apart("found", "true")

def style_variance(codes: Tensor) -> Tensor:
    """Distance of W+ codes [N, n_styles, 512] from W: variance across the styles, mean over the 512
    dimensions, per code [N] (0 for a code in W)."""
    return codes.float().var(dim=1, unbiased=False).mean(dim=1)


def image_scores(outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """Mean L2 and MS-SSIM of outputs against targets [N, 3, S, S], both clamped to [-1, 1]."""
    outputs, targets = outputs.float().clamp(-1, 1), targets.float().clamp(-1, 1)
    return {"l2": float(l2_per_image(outputs, targets).mean()),
            "ms_ssim": float(ms_ssim_per_image(outputs, targets).mean())}


@dataclass
class Evaluation:
    """Validation scores at every refinement iteration (one entry for the encoders that run one pass) and the first
    images."""

    per_iter: list[dict[str, float]]
    previews: list[Tensor]   # per iteration: [PREVIEW_IMAGES, 3, S, S]

    @property
    def last(self) -> dict[str, float]:
        return self.per_iter[-1]


def evaluate(model: InferenceModel, val: Tensor, codes: Tensor, n_iters: int) -> Evaluation:
    """Invert the validation images with the inference core (`invert`: ReStyle's and HyperStyle's every iteration
    kept) and score each iteration's images against the targets at the generator's resolution; the codes' figures
    are computed once for codes an iteration left as they were (HyperStyle's are its W encoder's at every
    iteration). The network is put in eval mode first: the engine leaves it training (BatchNorm on batch
    statistics)."""
    model.net.eval()
    decoder = model.net.decoder
    targets = to_images(val)
    outputs: list[list[Tensor]] = []
    latents: list[list[Tensor]] = []
    for start in range(0, val.shape[0], EVAL_BATCH):
        chunk = val[start:start + EVAL_BATCH]
        source, _ = model.prepare(chunk, chunk)
        steps = model.invert(source, n_iters)
        outputs.append([step.images.float().cpu() for step in steps])
        latents.append([step.latents.float().cpu() for step in steps])
    per_iter, previews = [], []
    last_found, code_scores = None, {}
    for index in range(len(outputs[0])):
        images = torch.cat([chunk[index] for chunk in outputs])
        found = torch.cat([chunk[index] for chunk in latents])
        assert images.shape == targets.shape, f"outputs {list(images.shape)} != targets {list(targets.shape)}"
        if last_found is None or not torch.equal(found, last_found):
            with torch.no_grad():
                code_scores = {"latent_mse": float((found - codes).pow(2).mean()),
                               "style_variance": float(style_variance(found).mean()),
                               "edit_transfer": edit_transfer(decoder, found, codes)}
        last_found = found
        per_iter.append({**image_scores(images, targets), **code_scores})
        previews.append(images[:PREVIEW_IMAGES].clamp(-1, 1))
    return Evaluation(per_iter, previews)


class ValidationProbe(NullCallback):
    """Scores the validation set at the engine's logging interval and at the last step (timed apart from
    training)."""

    def __init__(self, name: str, model: InferenceModel, data: KnownData, n_iters: int) -> None:
        self.name, self.model, self.data, self.n_iters = name, model, data, n_iters
        self.curve: list[dict[str, Any]] = []
        self.last: Evaluation | None = None
        self.seconds = 0.0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluate now; record validation L2 (per iteration) beside the step's training loss."""
        start = time.perf_counter()
        self.last = evaluate(self.model, self.data.val, self.data.val_codes, self.n_iters)
        per_iter = [s["l2"] for s in self.last.per_iter]
        self.curve.append({"step": step, "train_loss": metrics["loss"], "val_l2_per_iter": per_iter})
        self.seconds += time.perf_counter() - start
        print(f"# {self.name} step {step}: train loss {metrics['loss']:.4f}, validation L2 "
              + " ".join(f"{value:.4f}" for value in per_iter), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- training

def benchmark_preset(spec: EncoderSpec) -> TaskPreset:
    """The encoder's preset with what this setting cannot use switched off: no identity term (no face,
    no ArcFace weights), no LPIPS (no pretrained AlexNet here; a random one measures nothing), no flips
    (a mirrored sample is not a sample of the generator: it has no true code)."""
    preset = get_preset(spec.preset).with_loss(lpips_lambda=0.0, id_lambda=0.0)
    return dataclasses.replace(preset, flip="none")


REFERENCE_LEARNING_RATE = 1e-4
"""The encoder learning rate of the released pSp and e4e runs; this benchmark's is `cfg.learning_rate`."""


def e4e_schedule(cfg: QualityConfig) -> dict[str, Any]:
    """e4e's schedule scaled to a run of `cfg.steps`: the first delta joins at a tenth of the run and one more
    every hundredth (the released run's 20000 and 2000 in the same ratio), and the latent discriminator's learning
    rate scaled like the encoder's (2e-5 at the reference's 1e-4)."""
    return {"progressive_start": max(1, cfg.steps // 10), "progressive_step_every": max(1, cfg.steps // 100),
            "w_discriminator_lr": 2e-5 * cfg.learning_rate / REFERENCE_LEARNING_RATE}


def build_encoder(spec: EncoderSpec, preset: TaskPreset, cfg: QualityConfig, generator_path: Path,
                  w_encoder_path: Path) -> nn.Module:
    """The network to train, on the known generator's file: a pSp-family model, or HyperStyle on the trained W
    encoder's file (ResNet-34 body at random: no torchvision weights reach this machine)."""
    if spec.family == "hyperstyle":
        arch = HyperStyleArchitecture(output_size=cfg.size, encoder_input_size=cfg.encoder_size,
                                      stylegan_channel_multiplier=cfg.channel_multiplier)
        return build_hyperstyle(arch, w_encoder_path, generator_path)
    arch = PSPArchitecture(encoder_type=spec.encoder_type, input_nc=preset.encoder_input_nc, output_size=cfg.size,
                           encoder_input_size=cfg.encoder_size, family=spec.family,
                           stylegan_channel_multiplier=cfg.channel_multiplier)
    return build_psp(arch, generator_path)


def schedule(spec: EncoderSpec, cfg: QualityConfig) -> dict[str, Any]:
    """The family's own training settings scaled to the run: e4e's schedule, the W encoder's discriminator rate."""
    if spec.family == "e4e":
        return e4e_schedule(cfg)
    if spec.family == "w_encoder":
        return {"w_discriminator_lr": e4e_schedule(cfg)["w_discriminator_lr"]}
    return {}


def train_encoder(name: str, generator_path: Path, data: KnownData, cfg: QualityConfig,
                  device: torch.device, w_encoder_path: Path) -> tuple[dict[str, Any], Evaluation]:
    """Train one encoder with the engine for `cfg.steps` steps in `cfg.precision`; scores before, during
    and after, always in fp32 (the metrics should not carry bf16 rounding). A trained W encoder is saved to
    `w_encoder_path`, where HyperStyle is built from."""
    spec = ENCODERS[name]
    preset = benchmark_preset(spec)
    n_iters = cfg.restyle_iters if refines(name) else 1
    torch.manual_seed(cfg.seed)
    net = build_encoder(spec, preset, cfg, generator_path, w_encoder_path)
    net = use_exact_modulation(net.to(device), False)   # as training runs it
    model = InferenceModel(net, spec.preset, device, "fp32")
    before = evaluate(model, data.val, data.val_codes, n_iters)
    probe = ValidationProbe(name, model, data, n_iters)
    never = cfg.steps + 1
    config = TrainingConfig(max_steps=cfg.steps, learning_rate=cfg.learning_rate,
                            precision=resolve_precision(cfg.precision, device),
                            log_interval=cfg.eval_every, image_interval=never, val_interval=never,
                            save_interval=never, seed=cfg.seed, n_iters_per_batch=n_iters, **schedule(spec, cfg))
    trainer = Trainer(net, PSPLoss(preset.loss), config,
                      batch_transform=PresetTransform(preset, cfg.encoder_size, train=True), callback=probe)
    start = time.perf_counter()
    trainer.fit(epoch_batches(data.train, cfg.batch_size, cfg.seed))
    train_seconds = time.perf_counter() - start - probe.seconds
    after = probe.last   # the engine reports its last step whatever the interval
    assert after is not None and probe.curve[-1]["step"] == cfg.steps
    if spec.family == "w_encoder":
        save_psp(net, w_encoder_path)
    result: dict[str, Any] = {
        "family": spec.family, "encoder_type": spec.encoder_type, "preset": spec.preset,
        "objective": spec.objective, "loss_weights": dataclasses.asdict(preset.loss),
        "val_l2_before": before.last["l2"], "val_l2": after.last["l2"],
        "val_ms_ssim_before": before.last["ms_ssim"], "val_ms_ssim": after.last["ms_ssim"],
        "latent_mse_before": before.last["latent_mse"], "latent_mse": after.last["latent_mse"],
        "style_variance_before": before.last["style_variance"], "style_variance": after.last["style_variance"],
        "edit_transfer_before": before.last["edit_transfer"], "edit_transfer": after.last["edit_transfer"],
        "images_per_s": cfg.steps * cfg.batch_size / train_seconds, "train_seconds": train_seconds,
        "curve": [{"step": 0, "train_loss": None, "val_l2_per_iter": [s["l2"] for s in before.per_iter]},
                  *probe.curve],
    }
    if refines(name):
        result["n_iters"] = n_iters
        for key in ("l2", "ms_ssim"):
            result[f"val_{key}_before_per_iter"] = [s[key] for s in before.per_iter]
            result[f"val_{key}_per_iter"] = [s[key] for s in after.per_iter]
        for key in ("latent_mse", "style_variance", "edit_transfer"):
            result[f"{key}_per_iter"] = [s[key] for s in after.per_iter]
    return result, after


@dataclass
class BenchmarkResult:
    """The JSON summary and the preview images of each encoder (targets first) for the grid."""

    summary: dict[str, Any]
    previews: dict[str, list[Tensor]]


def run_benchmark(cfg: QualityConfig, workdir: Path) -> BenchmarkResult:
    """Build the generator and the shards under `workdir`, train and score every encoder of `cfg`."""
    device = choose_device("auto")
    start = time.perf_counter()
    known = known_generator(cfg.size, cfg.seed, cfg.generator, cfg.channel_multiplier)
    generator_path = write_generator(known, workdir / "generator.pt")
    data = make_data(known, cfg, workdir)
    targets = to_images(data.val)
    baseline = average_image(known.generator, known.latent_avg).expand_as(targets)
    true_codes = render(known, data.val_codes)
    summary: dict[str, Any] = {
        "steps": cfg.steps,
        "encoders": {},
        "hardware": hardware(),
        "command": command_line(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "training_precision": resolve_precision(cfg.precision, device),
        "data": {
            "generator": str(cfg.generator) if cfg.generator else f"seeded random weights (seed {cfg.seed})",
            "size": cfg.size, "n_styles": known.n_styles, "truncation": TRUNCATION,
            "codes": "W+ (per-layer mixing of two w)" if cfg.mixing else "W",
            "affine_scale": known.scale, "affine_shift": known.shift, "clipped_fraction": data.clipped_fraction,
            "train_images": int(data.train.shape[0]), "val_images": int(data.val.shape[0]),
            "val_l2_average_image": image_scores(baseline, targets)["l2"],
            "val_l2_true_codes": image_scores(true_codes, targets)["l2"],
            "true_style_variance": float(style_variance(data.val_codes).mean()),
            "seconds": time.perf_counter() - start,
        },
    }
    previews = {"targets": [targets[:PREVIEW_IMAGES]]}
    for name in cfg.encoders:
        result, after = train_encoder(name, generator_path, data, cfg, device, workdir / "w_encoder.pt")
        summary["encoders"][name] = result
        previews[name] = after.previews
        print(result_line(name, result), flush=True)
    summary["load_average"] = list(os.getloadavg())   # the machine may be shared: its load at the end
    return BenchmarkResult(summary, previews)


# ----------------------------------------------------------------------------- reporting

def result_line(name: str, r: dict[str, Any]) -> str:
    """One table row of an encoder's figures."""
    return (f"{name:<12} {r['val_l2_before']:>10.4f} {r['val_l2']:>8.4f} {r['val_ms_ssim_before']:>8.3f} "
            f"{r['val_ms_ssim']:>8.3f} {r['latent_mse']:>10.4f} {r['style_variance']:>10.4f} "
            f"{r['edit_transfer']:>9.3f} {r['images_per_s']:>7.2f}")


TABLE_HEADER = (f"{'encoder':<12} {'L2 before':>10} {'L2':>8} {'SSIM bef':>8} {'MS-SSIM':>8} {'latent MSE':>10} "
                f"{'style var':>10} {'edit xfer':>9} {'img/s':>7}")


COLOURS = {"psp": "C0", "restyle_psp": "C1", "e4e": "C2", "w_encoder": "C3", "hyperstyle": "C4"}
"""One colour per encoder in both panels of the plot."""


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Validation L2 against training step (every encoder) and against refinement iteration (ReStyle, HyperStyle)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = summary["encoders"]
    figure, (by_step, by_iter) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, result in encoders.items():
        steps = [point["step"] for point in result["curve"]]
        by_step.plot(steps, [point["val_l2_per_iter"][-1] for point in result["curve"]], marker="o", color=COLOURS[name],
                     label=name if not refines(name) else f"{name} (iteration {result['n_iters']})")
        if refines(name):
            by_step.plot(steps, [point["val_l2_per_iter"][0] for point in result["curve"]], linestyle="--",
                         color=COLOURS[name], label=f"{name} (iteration 1)")
    baseline = summary["data"]["val_l2_average_image"]
    for axis in (by_step, by_iter):
        axis.axhline(baseline, color="gray", linestyle=":", label="average image")
        axis.set_yscale("log")
        axis.set_ylabel("validation image L2 (MSE, [-1, 1])")
    by_step.set_xlabel("optimiser step")
    by_step.set_title("L2 vs training step")
    by_step.legend(fontsize=8)
    for name in filter(refines, encoders):
        iterations = range(1, encoders[name]["n_iters"] + 1)
        by_iter.plot(iterations, encoders[name]["val_l2_per_iter"], marker="o", color=COLOURS[name],
                     label=f"{name}, trained")
        by_iter.plot(iterations, encoders[name]["val_l2_before_per_iter"], marker="x", linestyle="--",
                     color=COLOURS[name], label=f"{name}, untrained")
        by_iter.set_xticks(list(iterations))
    for name in encoders:
        if not refines(name):
            by_iter.axhline(encoders[name]["val_l2"], linestyle="-.", label=f"{name} (one pass)", color=COLOURS[name])
    by_iter.set_xlabel("refinement iteration")
    by_iter.set_title(f"L2 vs refinement iteration (after {summary['steps']} steps)")
    by_iter.legend(fontsize=8)
    figure.suptitle(f"Inverting a known {summary['data']['size']} px generator: {summary['steps']} steps, "
                    f"batch {summary['config']['batch_size']}", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_grid(previews: dict[str, list[Tensor]], path: Path) -> None:
    """Rows: the validation targets, pSp, e4e, each ReStyle iteration, the W encoder, each HyperStyle iteration
    (torchvision's make_grid), labelled; images smaller than 64 px upscaled 4x (nearest) to be seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows, labels = [], []
    for name in ("targets", "psp", "e4e", "restyle_psp", "w_encoder", "hyperstyle"):
        for index, images in enumerate(previews.get(name, [])):
            rows.append(images)
            labels.append(name if len(previews[name]) == 1 else f"{name} it {index + 1}")
    tiles = torch.cat(rows)
    tiles = F.interpolate((tiles + 1) / 2, scale_factor=4 if tiles.shape[-1] < 64 else 1, mode="nearest")
    grid = make_grid(tiles, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    figure, axis = plt.subplots(figsize=(grid.shape[2] / 100 + 1.4, grid.shape[1] / 100 + 0.2))
    axis.imshow(grid.permute(1, 2, 0).numpy())
    tile = tiles.shape[-1] + 2
    axis.set_yticks([2 + tile * i + tile / 2 for i in range(len(labels))], labels)
    axis.set_xticks([])
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")   # the row labels stay whole
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = QualityConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps per encoder")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help=f"generator output size ({', '.join(map(str, SEEDED_SIZES))}; a given generator's own)")
    parser.add_argument("--channel-multiplier", type=int, default=defaults.channel_multiplier,
                        help="the seeded generator's StyleGAN2 channel multiplier (with --generator: the file's)")
    parser.add_argument("--encoder-size", type=int, default=defaults.encoder_size, help="encoder input size")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--train-images", type=int, default=defaults.train_images)
    parser.add_argument("--val-images", type=int, default=defaults.val_images)
    parser.add_argument("--restyle-iters", type=int, default=defaults.restyle_iters,
                        help="ReStyle's and HyperStyle's iterations per batch in training, and at evaluation")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=defaults.precision,
                        help="training precision (auto: bf16 where the hardware has it); evaluation runs in fp32")
    parser.add_argument("--mixing", action="store_true", help="W+ codes: per-layer mixing of two w")
    parser.add_argument("--generator", type=Path, help="a generator checkpoint {'g_ema', 'latent_avg'} "
                                                       "instead of seeded random weights")
    parser.add_argument("--encoders", nargs="+", default=list(defaults.encoders), choices=list(ENCODERS),
                        help="in this order; hyperstyle (256 px) after the w_encoder it is built on")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a shared machine "
                                                    "one thread can be many times faster than two that contend")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures (JSON)")
    parser.add_argument("--plot", type=Path, help="PNG plot: L2 vs step, L2 vs refinement iteration")
    parser.add_argument("--grid", type=Path, help="PNG grid: targets, then every encoder (each iteration)")
    args = parser.parse_args()
    try:
        cfg = QualityConfig(steps=args.steps, size=args.size, encoder_size=args.encoder_size,
                            batch_size=args.batch_size, train_images=args.train_images,
                            val_images=args.val_images, restyle_iters=args.restyle_iters,
                            eval_every=args.eval_every, learning_rate=args.learning_rate,
                            precision=args.precision, mixing=args.mixing, generator=args.generator,
                            channel_multiplier=args.channel_multiplier, encoders=tuple(args.encoders), seed=args.seed)
    except InputError as err:
        parser.exit(2, f"error: {err}\n")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"# {hardware()}\n# {command_line()}")
    print(TABLE_HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="psp-quality-") as tmp:
        try:
            result = run_benchmark(cfg, Path(tmp))
        except InputError as err:   # a --generator that does not fit the settings
            parser.exit(2, f"error: {err}\n")
    data = result.summary["data"]
    print(f"# load average at the end: {' / '.join(f'{v:.1f}' for v in result.summary['load_average'])}")
    print(f"# baselines: average image L2 {data['val_l2_average_image']:.4f}, true codes L2 "
          f"{data['val_l2_true_codes']:.2e} (PNG rounding), clipped {data['clipped_fraction']:.2e}")
    for name in filter(refines, result.summary["encoders"]):
        per_iter = result.summary["encoders"][name]["val_l2_per_iter"]
        print(f"# {name} L2 per iteration: " + ", ".join(f"{v:.4f}" for v in per_iter))
    write_json_atomic(args.json, result.summary)
    if args.plot is not None:
        write_plot(result.summary, args.plot)
    if args.grid is not None:
        write_grid(result.previews, args.grid)


if __name__ == "__main__":
    main()
