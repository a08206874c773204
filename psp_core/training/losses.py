"""The pSp training objective: L2, LPIPS, W-norm, identity (IR-SE50) and MoCo terms, and their weighted sum."""

from __future__ import annotations

import abc
import logging
import warnings
from pathlib import Path
from typing import Literal

import lpips
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from psp_core.nets.checkpoints import CheckpointError, load_irse50, load_strict, read_checkpoint
from psp_core.options import LossWeights

logger = logging.getLogger(__name__)

FACE_CROP = (slice(35, 223), slice(32, 220))
"""Rows and columns of the face region in a 256x256 aligned image, as the reference pSp crops it."""

ALEXNET_CACHE_FILE = "alexnet-owt-7be5be79.pth"
"""File name of torchvision's ImageNet AlexNet weights in the torch hub cache."""

LpipsBackbone = Literal["pretrained", "random"]


def crop_face(images: Tensor) -> Tensor:
    """Return the reference face crop `[:, :, 35:223, 32:220]` of 256x256 images."""
    return images[:, :, FACE_CROP[0], FACE_CROP[1]]


def alexnet_cache_path() -> Path:
    """Where torchvision keeps the AlexNet ImageNet weights (the torch hub cache); LPIPS reads them from here."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CACHE_FILE


def require_alexnet(path: Path | None = None) -> Path:
    """The AlexNet weights file a pretrained LPIPS needs (the cache's unless `path`); a one-line
    FileNotFoundError saying where to put it when it is absent. Stages call it before any work."""
    path = path if path is not None else alexnet_cache_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the torchvision AlexNet weights at {path} (file {ALEXNET_CACHE_FILE}, "
            f"from https://download.pytorch.org/models/{ALEXNET_CACHE_FILE}); copy it there, "
            "set TORCH_HOME, or set the LPIPS backbone to 'random' for an offline demo"
        )
    return path


class LPIPSLoss(nn.Module):
    """LPIPS (AlexNet, v0.1 linear heads) averaged over the batch; never downloads anything."""

    def __init__(self, backbone: LpipsBackbone = "pretrained", alexnet_path: str | Path | None = None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if backbone == "pretrained":
            self._load_alexnet(Path(alexnet_path) if alexnet_path is not None else alexnet_cache_path())
        elif backbone == "random":
            logger.warning("LPIPS runs on a RANDOM AlexNet backbone (backbone: random): its values are not LPIPS")
        else:
            raise ValueError(f"LPIPS backbone must be 'pretrained' or 'random', got {backbone!r}")
        self.requires_grad_(False)
        self.eval()

    def _load_alexnet(self, path: Path) -> None:
        """Copy torchvision's AlexNet `features.*` weights into the LPIPS trunk slices."""
        state = torch.load(require_alexnet(path), map_location="cpu", weights_only=True)
        trunk = self.lpips.net
        trunk.load_state_dict({key: state[f"features.{key.split('.', 1)[1]}"] for key in trunk.state_dict()})

    def train(self, mode: bool = True) -> "LPIPSLoss":
        """Stay in eval mode: the network is frozen and its heads carry dropout."""
        return super().train(False)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean LPIPS distance between two batches in [-1, 1]."""
        return self.lpips(output, target).mean()


def w_norm_loss(latent: Tensor, latent_avg: Tensor | None) -> Tensor:
    """Batch mean of the Frobenius norm of `latent - latent_avg` over all styles (against zero without an average)."""
    offset = latent if latent_avg is None else latent - latent_avg
    return offset.norm(p=2, dim=(1, 2)).mean()


class FeatureSimilarityLoss(nn.Module, abc.ABC):
    """1 - cosine similarity of frozen, normalised features of output and target, plus the reference `id_improve`.

    Subclasses say how images become features (`embed`)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FeatureSimilarityLoss":
        """Stay in eval mode: the feature network is frozen."""
        return super().train(False)

    @abc.abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """Unit-length feature vectors [N, D] of images in [-1, 1]."""

    def similarities(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-image cosine similarity between output and target features, shape [N], without gradients."""
        with torch.no_grad():
            return (self.embed(output) * self.embed(target)).sum(dim=1)

    def forward(self, output: Tensor, target: Tensor, source: Tensor | None = None) -> tuple[Tensor, float | None]:
        """Loss `mean(1 - sim(out, target))` and `mean(sim(out, target) - sim(target, source))` (None without a 3-channel source)."""
        with torch.no_grad():
            target_feats = self.embed(target)
        sim_target = (self.embed(output) * target_feats).sum(dim=1)
        loss = (1.0 - sim_target).mean()
        if source is None or source.shape[1] != 3:
            return loss, None
        with torch.no_grad():
            sim_views = (target_feats * self.embed(source)).sum(dim=1)
        return loss, float((sim_target.detach() - sim_views).mean())


class IdentityLoss(FeatureSimilarityLoss):
    """The pSp identity term: frozen IR-SE50 on the 112x112-pooled face crop of the 256x256 image."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.resize = nn.AdaptiveAvgPool2d((256, 256))
        self.face_pool = nn.AdaptiveAvgPool2d((112, 112))

    @classmethod
    def from_file(cls, path: str | Path) -> "IdentityLoss":
        """Build from a `model_ir_se50.pth` state dict (FileNotFoundError naming the file if it is absent)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"identity loss needs the IR-SE50 weights {path} (model_ir_se50.pth); "
                "put the file there or set id_lambda to 0"
            )
        return cls(load_irse50(path))

    def embed(self, images: Tensor) -> Tensor:
        """IR-SE50 features of the reference face crop (the backbone L2-normalises them)."""
        if images.shape[-2:] != (256, 256):
            images = self.resize(images)
        return self.features(self.face_pool(crop_face(images)))


def moco_resnet50(path: str | Path) -> nn.Module:
    """ResNet-50 trunk (to global pooling) from a MoCo-v2 checkpoint `{'state_dict': {'module.encoder_q.*'}}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MoCo loss needs the MoCo-v2 checkpoint {path} (moco_v2_800ep_pretrain.pt); "
            "put the file there or set moco_lambda to 0"
        )
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a MoCo checkpoint (no 'state_dict' entry)")
    prefix = "module.encoder_q."
    state = {
        key[len(prefix):]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix) and not key.startswith(prefix + "fc.")
    }
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    load_strict(model, state, f"{path} (MoCo-v2 ResNet-50 encoder_q)")
    return model


class MocoLoss(FeatureSimilarityLoss):
    """Feature similarity under a MoCo-v2 ResNet-50, the pSp identity stand-in for non-face domains."""

    @classmethod
    def from_file(cls, path: str | Path) -> "MocoLoss":
        """Build from a MoCo-v2 checkpoint file."""
        return cls(moco_resnet50(path))

    def embed(self, images: Tensor) -> Tensor:
        """Normalised 2048-d features of images resized (nearest, as the reference) to 224x224."""
        return F.normalize(self.features(F.interpolate(images, size=224)), dim=1)


class PSPLoss(nn.Module):
    """The weighted pSp objective; returns the total and every term by its reference name."""

    def __init__(
        self,
        weights: LossWeights,
        *,
        lpips_backbone: LpipsBackbone = "pretrained",
        alexnet_path: str | Path | None = None,
        irse50_path: str | Path | None = None,
        moco_path: str | Path | None = None,
        identity: FeatureSimilarityLoss | None = None,
    ) -> None:
        super().__init__()
        self.weights = weights
        needs_lpips = weights.lpips_lambda > 0 or weights.lpips_lambda_crop > 0
        self.lpips = LPIPSLoss(lpips_backbone, alexnet_path) if needs_lpips else None
        if identity is None and weights.id_lambda > 0:
            if irse50_path is None:
                raise FileNotFoundError("id_lambda > 0 needs the IR-SE50 weights file (model_ir_se50.pth); none given")
            identity = IdentityLoss.from_file(irse50_path)
        if identity is None and weights.moco_lambda > 0:
            if moco_path is None:
                raise FileNotFoundError("moco_lambda > 0 needs the MoCo-v2 checkpoint file; none given")
            identity = MocoLoss.from_file(moco_path)
        self.identity = identity if weights.id_lambda > 0 or weights.moco_lambda > 0 else None

    def forward(
        self, output: Tensor, target: Tensor, source: Tensor, latent: Tensor, latent_avg: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss (for backward) and a dict of float terms: loss_l2, loss_lpips, ..., id_improve, loss."""
        w = self.weights
        terms: dict[str, Tensor] = {}
        logs: dict[str, float] = {}
        if self.identity is not None:
            name = "loss_id" if w.id_lambda > 0 else "loss_moco"
            terms[name], improvement = self.identity(output, target, source)
            if improvement is not None:
                logs["id_improve"] = improvement
        if w.l2_lambda > 0:
            terms["loss_l2"] = F.mse_loss(output, target)
        if w.lpips_lambda > 0:
            terms["loss_lpips"] = self.lpips(output, target)
        if w.lpips_lambda_crop > 0:
            terms["loss_lpips_crop"] = self.lpips(crop_face(output), crop_face(target))
        if w.l2_lambda_crop > 0:
            terms["loss_l2_crop"] = F.mse_loss(crop_face(output), crop_face(target))
        if w.w_norm_lambda > 0:
            terms["loss_w_norm"] = w_norm_loss(latent, latent_avg)
        lambdas = {
            "loss_id": w.id_lambda, "loss_moco": w.moco_lambda, "loss_l2": w.l2_lambda,
            "loss_lpips": w.lpips_lambda, "loss_lpips_crop": w.lpips_lambda_crop,
            "loss_l2_crop": w.l2_lambda_crop, "loss_w_norm": w.w_norm_lambda,
        }
        total = sum(lambdas[name] * value.float() for name, value in terms.items())
        logs.update({name: float(value.detach()) for name, value in terms.items()})
        logs["loss"] = float(total.detach())
        return total, logs
