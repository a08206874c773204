"""FFHQ-style face alignment: hostile-input photo loading, dlib face + 68-landmark finding, the crop.

The crop follows the recipe the FFHQ data set (and so every pretrained StyleGAN2 face model and
pSp) was built with: an oriented square centred a little below the eyes, sized from the
eye-to-eye and eye-to-mouth distances, cut with a border, reflect-padded where it leaves the
photo (the padding blended toward a blur and the median colour), then resampled to the output size.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dlib
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.ndimage import gaussian_filter

log = logging.getLogger(__name__)

PREDICTOR_PACKAGE = "face_recognition_models"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

# Landmark index ranges of the 68-point (iBUG 300-W) scheme used by the crop.
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
MOUTH_LEFT = 48
MOUTH_RIGHT = 54


class PhotoRejected(Exception):
    """A photo (or one face in it) that cannot be aligned; `reason` is a short code for the rejects table."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Face:
    """One detected face: its box (left, top, right, bottom), detector score and 68x2 landmarks (x, y)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def width(self) -> int:
        """Width of the detector's box in photo pixels."""
        return self.box[2] - self.box[0]


def shape_predictor_path() -> Path:
    """Locate dlib's 68-point model shipped by `face-recognition-models` without importing it.

    The package's `__init__` imports the removed `pkg_resources`, so only its location is looked up.
    """
    spec = importlib.util.find_spec(PREDICTOR_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {PREDICTOR_PACKAGE!r} package is not installed (pip install face-recognition-models); "
            f"it ships {PREDICTOR_FILE}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models" / PREDICTOR_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{PREDICTOR_FILE} not found in the {PREDICTOR_PACKAGE!r} package")


def load_photo(source: str | Path | BinaryIO, max_pixels: int) -> Image.Image:
    """Open any image (a path or a binary file object) as an upright 8-bit RGB photo, or raise
    PhotoRejected saying why not.

    Reasons: `not_image` (no image format recognised), `too_large` (over `max_pixels`, checked from
    the header before decoding: decompression bombs), `unreadable` (truncated or corrupt data).
    Pillow's own pixel limit follows `max_pixels`; its warnings (corrupt EXIF, ...) are logged with
    the file's name instead of printed.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with Image.open(source) as image:
                    width, height = image.size
                    if width * height > max_pixels:
                        raise PhotoRejected(
                            "too_large", f"{width}x{height} = {width * height} pixels, limit is {max_pixels}"
                        )
                    image.load()
                    upright = ImageOps.exif_transpose(image)
                    return to_rgb(upright)
            finally:
                for warning in caught:
                    log.warning("%s: %s", name, warning.message)
    except PhotoRejected:
        raise
    except Image.DecompressionBombError as err:
        raise PhotoRejected("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise PhotoRejected("not_image", "no image format recognised in the file") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as err:
        raise PhotoRejected("unreadable", f"{type(err).__name__}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: 16-bit/32-bit/float scaled down, alpha composited on white.

    16-bit images (`I;16*`, or `I` within 0..65535) are divided by 257; 32-bit integer images whose
    values leave that range are scaled from their own minimum..maximum; float images in 0..1 are
    multiplied by 255.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if mode == "F" and high <= 1.0:
            values = values * 255.0
        elif mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
            values = values / 257.0
        elif mode == "I" and (low < 0 or high > 65535):
            values = (values - low) * (255.0 / max(high - low, 1.0))
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@functools.lru_cache(maxsize=1)
def face_detector() -> "dlib.fhog_object_detector":
    """dlib's HOG frontal face detector, built once per process (0.4 s)."""
    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=2)
def shape_predictor(path: str) -> "dlib.shape_predictor":
    """dlib's 68-point shape predictor read from `path` once per process (a 100 MB model, 0.6 s to read)."""
    return dlib.shape_predictor(path)


class FaceFinder:
    """dlib's HOG frontal face detector plus the 68-point shape predictor, with a score threshold.

    Detection runs on a copy downscaled to `detect_max_side` (fast on large photos); landmarks are
    then predicted on the full-resolution photo.
    """

    def __init__(
        self,
        upsample: int = 1,
        threshold: float = 0.4,
        detect_max_side: int = 1024,
        predictor_path: str | Path | None = None,
    ) -> None:
        self._dlib = dlib
        self.detector = face_detector()
        self.predictor = shape_predictor(str(predictor_path or shape_predictor_path()))
        self.upsample = upsample
        self.threshold = threshold
        self.detect_max_side = detect_max_side

    def find(self, photo: np.ndarray) -> list[Face]:
        """Faces scoring at least `threshold`, most prominent first; raises PhotoRejected('no_face') if none.

        Prominence is box area times detector score: a face-like patch on clothing can get a box
        as large as the real face's, but not its score.
        """
        height, width = photo.shape[:2]
        scale = min(1.0, self.detect_max_side / max(height, width))
        small = photo
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))
        boxes, scores, _ = self.detector.run(small, self.upsample, min(self.threshold, 0.0))
        kept = [(box, score) for box, score in zip(boxes, scores) if score >= self.threshold]
        if not kept:
            if scores:
                detail = f"{len(scores)} detection(s) below threshold {self.threshold} (best score {max(scores):.2f})"
            else:
                detail = "the detector found no face"
            raise PhotoRejected("no_face", detail)
        faces = [self._face(photo, box, score, scale) for box, score in kept]
        return sorted(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) * f.score, reverse=True)

    def _face(self, photo: np.ndarray, box, score: float, scale: float) -> Face:
        height, width = photo.shape[:2]
        left = int(np.clip(round(box.left() / scale), 0, width - 1))
        top = int(np.clip(round(box.top() / scale), 0, height - 1))
        right = int(np.clip(round(box.right() / scale), left + 1, width))
        bottom = int(np.clip(round(box.bottom() / scale), top + 1, height))
        shape = self.predictor(photo, self._dlib.rectangle(left, top, right, bottom))
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return Face(box=(left, top, right, bottom), score=float(score), landmarks=landmarks)


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ crop square from 68 landmarks: corners (upper-left, lower-left, lower-right,
    upper-right) as a 4x2 array in photo pixel coordinates, and its side length."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    eye_left = landmarks[LEFT_EYE].mean(axis=0)
    eye_right = landmarks[RIGHT_EYE].mean(axis=0)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_mid = (landmarks[MOUTH_LEFT] + landmarks[MOUTH_RIGHT]) / 2
    eye_to_mouth = mouth_mid - eye_mid

    # Horizontal axis: the eye line averaged with the eye-to-mouth line turned 90 degrees anticlockwise.
    across = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    across /= np.hypot(*across)
    across *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    down = np.array([-across[1], across[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([centre - across - down, centre - across + down, centre + across + down, centre + across - down])
    return quad, float(np.hypot(*across) * 2)


def landmarks_in_crop(landmarks: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Map photo landmarks into the pixel coordinates of the `size`x`size` image cut from `quad`.

    Both use dlib's convention (a pixel's centre at its integer index); the quad's corners are the
    crop's outer corners, as Pillow's QUAD transform takes them after the +0.5 shift in align_face.
    """
    axes = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)
    fractions = np.linalg.solve(axes, (np.asarray(landmarks, dtype=np.float64) - quad[0]).T).T
    return fractions * size - 0.5


def align_face(
    photo: Image.Image, landmarks: np.ndarray, output_size: int = 256, supersample: int = 1
) -> tuple[Image.Image, np.ndarray]:
    """Cut the FFHQ-aligned face out of an RGB photo; returns the image and its 68x2 landmarks.

    The square is resampled at `output_size * supersample` and then downscaled (FFHQ itself:
    output_size 1024, supersample 4).
    """
    quad, qsize = ffhq_quad(landmarks)
    aligned_landmarks = landmarks_in_crop(landmarks, quad, output_size)
    image = photo
    quad = quad.copy()

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(image.width / shrink)), int(np.rint(image.height / shrink)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top = np.floor(quad.min(axis=0)).astype(int) - border
    right, bottom = np.ceil(quad.max(axis=0)).astype(int) + border
    crop = (max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height))
    if crop != (0, 0, image.width, image.height):
        image = image.crop(crop)
        quad -= crop[:2]

    outside = (
        border - int(np.floor(quad[:, 0].min())),
        border - int(np.floor(quad[:, 1].min())),
        int(np.ceil(quad[:, 0].max())) - image.width + border,
        int(np.ceil(quad[:, 1].max())) - image.height + border,
    )
    if max(outside) > border - 4:
        pad = np.maximum(np.maximum(outside, 0), int(np.rint(qsize * 0.3)))
        image = reflect_pad_blended(image, pad, blur=qsize * 0.02)
        quad += pad[:2]

    transform_size = output_size * supersample
    image = image.transform(
        (transform_size, transform_size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()),
        Image.Resampling.BILINEAR,
    )
    if supersample > 1:
        image = image.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return image, aligned_landmarks.astype(np.float32)


def reflect_pad_blended(image: Image.Image, pad: np.ndarray, blur: float) -> Image.Image:
    """Pad (left, top, right, bottom) by reflection, fading the padding toward a blur and the median colour.

    This hides the mirrored copy of the face that plain reflection would put around the crop.
    """
    left, top, right, bottom = (int(p) for p in pad)
    pixels = np.pad(np.asarray(image, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    height, width = pixels.shape[:2]
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    xs = np.arange(width, dtype=np.float32)[None, :, None]
    inside_x = np.minimum(xs / max(left, 1), (width - 1 - xs) / max(right, 1))
    inside_y = np.minimum(ys / max(top, 1), (height - 1 - ys) / max(bottom, 1))
    outward = np.maximum(1.0 - inside_x, 1.0 - inside_y)
    blurred = gaussian_filter(pixels, [blur, blur, 0])
    pixels += (blurred - pixels) * np.clip(outward * 3.0 + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(outward, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def resize_square(photo: Image.Image, output_size: int) -> Image.Image:
    """Centre-crop a photo to a square and resize it (for data sets that are already aligned)."""
    side = min(photo.size)
    left = (photo.width - side) // 2
    top = (photo.height - side) // 2
    square = photo.crop((left, top, left + side, top + side))
    if square.size == (output_size, output_size):
        return square
    return square.resize((output_size, output_size), Image.Resampling.LANCZOS)
