"""Per-image reconstruction metrics for `psp evaluate`: L2, LPIPS, MS-SSIM and identity similarity.

Images are float tensors [N, 3, H, W] in [-1, 1] (the pSp convention). Every metric returns one
value per image so that batches can be accumulated and averaged (NaN-aware) by `MetricTable`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import dlib
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from torch import Tensor, nn

from psp_core.data.align import FaceFinder, PhotoRejected, shape_predictor_path
from psp_core.nets.checkpoints import load_irse50
from psp_core.training.losses import IdentityLoss, LpipsBackbone, LPIPSLoss

logger = logging.getLogger(__name__)

MS_SSIM_MIN_SIDE = 161
"""Smallest image side `pytorch_msssim.ms_ssim` accepts with its 11-pixel window and 5 scales."""

MS_SSIM_UPSAMPLE_SIZE = 256
"""Images smaller than MS_SSIM_MIN_SIDE are bilinearly upsampled to this side before MS-SSIM."""

IDENTITY_SIZE = 256
"""Side to which images are resized before an identity network sees them (the pSp aligned-face size)."""

DLIB_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
"""dlib's face-recognition ResNet, shipped beside the 68-point predictor by `face-recognition-models`."""

LpipsNetwork = Callable[[Tensor, Tensor], Tensor]
"""An LPIPS network: (x, y) in [-1, 1] -> distances [N, 1, 1, 1], e.g. `lpips.LPIPS`."""


def l2_per_image(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of each image over channels and pixels, shape [N]."""
    return (outputs.float() - targets.float()).pow(2).flatten(1).mean(dim=1)


def ms_ssim_per_image(outputs: Tensor, targets: Tensor) -> Tensor:
    """MS-SSIM of each image (5 standard scales, data range 1 after mapping [-1, 1] to [0, 1]), shape [N].

    `pytorch_msssim` needs a side over 160 px for its 4 downsamplings; smaller images are upsampled
    (bilinear) to 256x256 first, so the value always uses the standard 5 scales and weights.
    """
    x = ((outputs.float() + 1) / 2).clamp(0, 1)
    y = ((targets.float() + 1) / 2).clamp(0, 1)
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        size = (MS_SSIM_UPSAMPLE_SIZE, MS_SSIM_UPSAMPLE_SIZE)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    return ms_ssim(x, y, data_range=1.0, size_average=False)


LPIPS_RANDOM_SEED = 0
"""Seed of the random LPIPS backbone, so that 'random' LPIPS values agree between stages and runs."""


def lpips_network(backbone: LpipsBackbone = "pretrained", alexnet_path: str | Path | None = None) -> nn.Module:
    """The frozen `lpips.LPIPS` (AlexNet, v0.1 heads) built offline by `psp_core.training.losses.LPIPSLoss`;
    a random backbone is drawn from a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LPIPS_RANDOM_SEED)
        return LPIPSLoss(backbone, alexnet_path).lpips


class IdentitySimilarity(Protocol):
    """A face-identity network as a metric: its recorded `name` and per-image similarity [N] (NaN: no face)."""

    name: str

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Similarity of each output to its target, shape [N]."""
        ...


class ArcFaceIdentity:
    """Cosine similarity of ArcFace IR-SE50 features on pSp's face crop, exactly as the identity loss sees faces."""

    name = "arcface_ir_se50"

    def __init__(self, backbone: nn.Module) -> None:
        self.loss = IdentityLoss(backbone)

    @classmethod
    def from_file(cls, path: str | Path) -> "ArcFaceIdentity":
        """Build from a `model_ir_se50.pth` state dict (loaded strictly, weights only)."""
        return cls(load_irse50(path))

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-image cosine similarity of unit-norm features of the [35:223, 32:220] crop pooled to 112, shape [N]."""
        device = next(self.loss.parameters()).device
        return self.loss.similarities(outputs.float().to(device), targets.float().to(device))


class DlibIdentity:
    """Cosine similarity of dlib's 128-d face-recognition ResNet descriptors: the offline identity fallback.

    Each image (resized to 256x256) gets its own face detection (HOG detector, score threshold, the
    most prominent face) and 68 landmarks, from which dlib cuts its aligned 150x150 chip. The
    detector runs without upsampling: an FFHQ-aligned 256 crop holds a face of about 125 px, above
    the detector's 80 px minimum, and it scores higher (and runs faster) than upsampled. An image
    with no detected face gives NaN for its pair: reconstructions without a face are counted as
    missing instead of being scored on a made-up box. dlib descriptors are not centred, so cosine
    similarity between different people is still high (measured about 0.77-0.91 on scikit-image's
    faces); the values are not comparable with ArcFace's.
    """

    name = "dlib_resnet_v1"

    def __init__(self, finder: FaceFinder | None = None, recognizer_path: str | Path | None = None) -> None:
        self.finder = finder or FaceFinder(upsample=0, threshold=0.3)
        path = Path(recognizer_path or shape_predictor_path().parent / DLIB_RECOGNITION_FILE)
        if not path.is_file():
            raise FileNotFoundError(
                f"dlib face-recognition model {path} not found (pip install face-recognition-models)"
            )
        self.recognizer = dlib.face_recognition_model_v1(str(path))
        self._rectangle = dlib.rectangle

    def descriptor(self, image: np.ndarray) -> np.ndarray | None:
        """The 128-d descriptor of the most prominent face in an RGB uint8 image, or None if there is no face."""
        try:
            face = self.finder.find(image)[0]
        except PhotoRejected:
            return None
        shape = self.finder.predictor(image, self._rectangle(*face.box))
        return np.asarray(self.recognizer.compute_face_descriptor(image, shape), dtype=np.float64)

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-image cosine similarity of output and target descriptors, NaN where either has no face, shape [N]."""
        out_images, target_images = to_uint8_rgb(outputs, IDENTITY_SIZE), to_uint8_rgb(targets, IDENTITY_SIZE)
        similarities = []
        for out_image, target_image in zip(out_images, target_images):
            a, b = self.descriptor(out_image), self.descriptor(target_image)
            if a is None or b is None:
                similarities.append(math.nan)
            else:
                similarities.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return torch.tensor(similarities, dtype=torch.float32)


def to_uint8_rgb(images: Tensor, size: int) -> np.ndarray:
    """Images in [-1, 1] as a contiguous uint8 array [N, size, size, 3] (bilinear resize when needed)."""
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def identity_backend(irse50_path: str | Path | None) -> IdentitySimilarity:
    """ArcFace IR-SE50 when its weights file exists, else dlib's ResNet (logged loudly: other numbers)."""
    if irse50_path is not None and Path(irse50_path).is_file():
        return ArcFaceIdentity.from_file(irse50_path)
    logger.warning(
        "identity metric uses dlib's face-recognition ResNet (dlib_resnet_v1): IR-SE50 weights %s not found; "
        "its similarities are not comparable with pSp's ArcFace numbers", irse50_path,
    )
    return DlibIdentity()


class MetricSuite:
    """All evaluation metrics of one batch, per image: l2, lpips, ms_ssim, and id_similarity when
    given an identity network (inversion scores without it).

    Both batches are clamped to [-1, 1] first: the metrics describe the images as saved and shown.
    """

    def __init__(self, lpips_net: LpipsNetwork, identity: IdentitySimilarity | None) -> None:
        self.lpips_net = lpips_net
        self.identity = identity

    @torch.no_grad()
    def __call__(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Metric name -> per-image values [N] on the CPU (NaN where identity found no face)."""
        outputs, targets = outputs.float().clamp(-1, 1), targets.float().clamp(-1, 1)
        values = {
            "l2": l2_per_image(outputs, targets).cpu(),
            "lpips": self.lpips_net(outputs, targets).reshape(len(outputs)).float().cpu(),
            "ms_ssim": ms_ssim_per_image(outputs, targets).cpu(),
        }
        if self.identity is not None:
            values["id_similarity"] = self.identity(outputs, targets).float().cpu()
        return values


class MetricTable:
    """Per-image metric rows accumulated over batches, with NaN-aware means and missing-value counts."""

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        self.columns: dict[str, list[float]] = {}

    def add(self, values: dict[str, Tensor], ids: Sequence[str] | None = None) -> None:
        """Append one batch: metric name -> values [N] (all the same N), and optional image ids."""
        sizes = {name: len(v) for name, v in values.items()}
        n = next(iter(sizes.values()), 0)
        if any(size != n for size in sizes.values()) or (ids is not None and len(ids) != n):
            n_ids = None if ids is None else len(ids)
            raise ValueError(f"a batch's metrics and ids must have one length; got {sizes}, ids {n_ids}")
        if self.ids and set(values) != set(self.columns):
            raise ValueError(f"metrics {sorted(values)} differ from earlier batches' {sorted(self.columns)}")
        for name, v in values.items():
            self.columns.setdefault(name, []).extend(v.detach().double().cpu().flatten().tolist())
        self.ids.extend(ids if ids is not None else [None] * n)

    def rows(self) -> list[dict[str, float | str | None]]:
        """One dict per image: `id` and every metric."""
        return [
            {"id": image_id, **{name: column[i] for name, column in self.columns.items()}}
            for i, image_id in enumerate(self.ids)
        ]

    def summary(self) -> dict[str, float]:
        """`n_images`, the NaN-ignoring mean of each metric (NaN if all missing) and `<metric>_missing` counts."""
        result: dict[str, float] = {"n_images": len(self.ids)}
        for name, col in self.columns.items():
            values = np.asarray(col, dtype=np.float64)
            present = values[~np.isnan(values)]
            result[name] = float(present.mean()) if present.size else math.nan
            result[f"{name}_missing"] = int(values.size - present.size)
        return result
