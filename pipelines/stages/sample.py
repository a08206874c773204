"""`psp sample`: build the embedded default photo folder from real photos that installed packages ship.

No machine here can download photos, so the default run starts from scikit-image's `astronaut`
and matplotlib's `grace_hopper.jpg` (expanded by seeded augmentations: rotation, scale, shift,
mirror, colour, resolution, JPEG quality), real faces of different people from scikit-image's
`lfw_subset()`, and the awkward files a real folder holds: photos without faces, a photo with two
faces, grayscale, alpha, palette, CMYK and 16-bit images, an EXIF-rotated JPEG, a tiny face, a
truncated JPEG and a non-image with an image extension. One folder per identity (`astronaut/`,
`grace_hopper/`, `lfw/lfw_NNN/`: every variant of a photo beside it), so `shard.split_by: folder`
keeps each person in one split. `sample.json` lists every file with how it was made and what
alignment is expected to make of it. See data/README.md.
"""
from __future__ import annotations

import argparse
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image, ImageEnhance, ImageOps

from pipelines.params.loading import load_section
from pipelines.params.schema import SampleConfig
from pipelines.services.storage import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_FILE = "sample.json"

# lfw_subset() faces (of its first 100 images) that dlib's detector finds with score >= 0.6
# after the 25 px crops are upscaled to 128 px.
LFW_FACES = (
    0, 1, 2, 3, 5, 6, 8, 10, 11, 14, 15, 18, 19, 20, 21, 24, 25, 31, 33, 34, 35, 36, 37, 38, 39, 40,
    41, 42, 44, 45, 46, 48, 49, 51, 52, 53, 55, 58, 60, 61, 62, 63, 64, 65, 66, 72, 73, 74, 75, 77,
)
LFW_SIZE = 128


@dataclass(frozen=True)
class Augmentation:
    """A geometric and photometric change of a photo, applied about its centre."""

    angle: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    mirror: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    resolution: float = 1.0
    quality: int = 95

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Augmentation":
        """A random augmentation within ranges where dlib's frontal detector still finds the face."""
        return cls(
            angle=round(float(rng.uniform(-8, 8)), 2),
            scale=round(float(rng.uniform(0.75, 1.2)), 3),
            shift=(round(float(rng.uniform(-0.08, 0.08)), 3), round(float(rng.uniform(-0.08, 0.08)), 3)),
            mirror=bool(rng.random() < 0.5),
            brightness=round(float(rng.uniform(0.75, 1.25)), 3),
            contrast=round(float(rng.uniform(0.75, 1.25)), 3),
            saturation=round(float(rng.uniform(0.6, 1.4)), 3),
            resolution=float(rng.choice([1.0, 1.0, 0.8, 0.65])),
            quality=int(rng.integers(55, 96)),
        )

    def apply(self, photo: Image.Image) -> Image.Image:
        """The augmented RGB photo (same canvas size times `resolution`; uncovered area mid-grey)."""
        if self.mirror:
            photo = ImageOps.mirror(photo)
        photo = photo.transform(
            photo.size, Image.Transform.AFFINE, self.inverse_matrix(photo.size),
            Image.Resampling.BICUBIC, fillcolor=(118, 118, 118),
        )
        photo = ImageEnhance.Brightness(photo).enhance(self.brightness)
        photo = ImageEnhance.Contrast(photo).enhance(self.contrast)
        photo = ImageEnhance.Color(photo).enhance(self.saturation)
        if self.resolution != 1.0:
            size = (round(photo.width * self.resolution), round(photo.height * self.resolution))
            photo = photo.resize(size, Image.Resampling.LANCZOS)
        return photo

    def forward_matrix(self, size: tuple[int, int]) -> np.ndarray:
        """3x3 map from (mirrored) source pixels to output pixels: rotate and scale about the centre, shift."""
        centre = np.array([size[0] / 2, size[1] / 2])
        theta = np.deg2rad(self.angle)
        linear = self.scale * np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        offset = centre + np.array(self.shift) * np.array(size) - linear @ centre
        matrix = np.eye(3)
        matrix[:2, :2], matrix[:2, 2] = linear, offset
        return matrix

    def inverse_matrix(self, size: tuple[int, int]) -> tuple[float, ...]:
        """Pillow's AFFINE data: the output-to-source map's first two rows."""
        return tuple(np.linalg.inv(self.forward_matrix(size))[:2].flatten())


def run(args: argparse.Namespace) -> int:
    """Write the sample folder (replacing any previous one atomically)."""
    cfg = load_section("sample", SampleConfig, args.overrides, args.params)
    entries = build_sample(cfg)
    log.info("sample: %d files in %s", len(entries), cfg.output_dir)
    return 0


def build_sample(cfg: SampleConfig) -> list[dict]:
    """Build the sample in a temporary folder, then swap it in; returns the manifest entries."""
    with atomic_dir(cfg.output_dir, MANIFEST_FILE) as folder:
        entries = write_sample(folder, cfg)
        write_json_atomic(folder / MANIFEST_FILE, {"seed": cfg.seed, "files": entries})
    return entries


def base_photos() -> dict[str, Image.Image]:
    """The two real portrait photos shipped by scikit-image and matplotlib."""
    grace = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    with Image.open(grace) as image:
        grace_hopper = image.convert("RGB")
    return {"astronaut": Image.fromarray(skimage.data.astronaut()), "grace_hopper": grace_hopper}


def write_sample(folder: Path, cfg: SampleConfig) -> list[dict]:
    """Write every sample file into `folder`; each entry says how it was made and the expected outcome."""
    rng = np.random.default_rng(cfg.seed)
    photos = base_photos()
    astronaut, grace = photos["astronaut"], photos["grace_hopper"]
    entries: list[dict] = []

    def add(name: str, data: bytes, made: str, expect: str, **extra) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        entries.append({"file": name, "made": made, "expect": expect, **extra})

    for name, photo in photos.items():
        add(f"{name}/{name}.jpg", encode(photo, "JPEG", quality=95), f"{name} photo", "face")
        for copy in range(cfg.augmented_copies):
            augmentation = Augmentation.draw(rng)
            add(f"{name}/{name}_aug{copy:02d}.jpg", encode(augmentation.apply(photo), "JPEG", quality=augmentation.quality),
                f"{name} augmented", "face", augmentation=asdict(augmentation))

    faces = skimage.data.lfw_subset()
    for index in LFW_FACES[: cfg.lfw_faces]:
        gray = Image.fromarray(np.rint(faces[index] * 255).astype(np.uint8))
        add(f"lfw/lfw_{index:03d}/lfw_{index:03d}.jpg", encode(gray.resize((LFW_SIZE, LFW_SIZE), Image.Resampling.BICUBIC), "JPEG", quality=92),
            f"lfw_subset()[{index}] upscaled to {LFW_SIZE} px, grayscale", "face")

    add("coffee.jpg", encode(Image.fromarray(skimage.data.coffee()), "JPEG", quality=90), "scikit-image coffee", "no_face")
    add("chelsea.png", encode(Image.fromarray(skimage.data.chelsea()), "PNG"), "scikit-image chelsea (a cat)", "no_face")
    add("grace_hopper/two_faces.jpg", encode(side_by_side(astronaut, grace), "JPEG", quality=92),
        "astronaut and grace_hopper side by side", "face", faces=2)
    add("grace_hopper/grayscale_grace_hopper.jpg", encode(grace.convert("L"), "JPEG", quality=90), "grayscale JPEG", "face")
    add("astronaut/alpha_astronaut.png", encode(with_alpha(astronaut), "PNG"), "RGBA PNG, transparent corners", "face")
    add("grace_hopper/palette_grace_hopper.png", encode(grace.quantize(256), "PNG"), "palette (P mode) PNG", "face")
    add("astronaut/cmyk_astronaut.jpg", encode(astronaut.convert("CMYK"), "JPEG", quality=92), "CMYK JPEG", "face")
    add("astronaut/gray16_astronaut.png", encode(gray16(astronaut), "PNG"), "16-bit grayscale PNG", "face")
    add("grace_hopper/exif_rotated_grace_hopper.jpg", exif_rotated_jpeg(grace),
        "stored turned 90 degrees with EXIF Orientation 6", "face")
    small = astronaut.resize((230, 230), Image.Resampling.LANCZOS)
    add("astronaut/tiny_face_astronaut.jpg", encode(small, "JPEG", quality=92), "astronaut at 230 px (face ~44 px)", "too_small")
    whole = encode(grace, "JPEG", quality=90)
    add("grace_hopper/truncated_grace_hopper.jpg", whole[: len(whole) // 2], "first half of a JPEG", "unreadable")
    add("notes.jpg", b"shopping list: film, batteries\n" * 4, "a text file named .jpg", "not_image")
    return entries


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """Encode an image to file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two photos on one canvas (a group photo with two faces)."""
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (200, 200, 200))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def with_alpha(photo: Image.Image) -> Image.Image:
    """The photo with a vignette alpha channel (transparent corners)."""
    ys, xs = np.mgrid[: photo.height, : photo.width]
    radius = np.hypot((xs - photo.width / 2) / photo.width, (ys - photo.height / 2) / photo.height)
    alpha = np.clip((0.65 - radius) * 6 * 255, 0, 255).astype(np.uint8)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def gray16(photo: Image.Image) -> Image.Image:
    """The photo as a 16-bit grayscale image (full 0..65535 range)."""
    values = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(values)


def exif_rotated_jpeg(photo: Image.Image) -> bytes:
    """A JPEG whose pixels are turned 90 degrees counter-clockwise and whose EXIF says to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)

