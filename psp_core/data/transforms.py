"""Batched tensor transforms that turn decoded images into pSp sources and targets (resize, [-1, 1], flips, sketches, one-hot maps, degradations)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601 luma weights, the ones Pillow's `convert('L')` uses."""

SEGMENTATION_PALETTE = torch.tensor([
    [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204], [0, 255, 255],
    [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0], [0, 0, 153], [0, 0, 204],
    [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51], [0, 204, 0],
], dtype=torch.float32) / 255
"""One colour per CelebAMask-HQ class (19), for showing label maps."""


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float()


def resize_images(images: Tensor, size: int) -> Tensor:
    """Anti-aliased bilinear resize of a batch to size x size (a no-op when already there)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_labels(labels: Tensor, size: int) -> Tensor:
    """Nearest-neighbour resize of integer label maps [N, 1, H, W] (never interpolating class ids)."""
    if tuple(labels.shape[-2:]) == (size, size):
        return labels
    return F.interpolate(labels.float(), size=(size, size), mode="nearest-exact").to(labels.dtype)


def to_signed(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the range the generator produces (Normalize(0.5, 0.5))."""
    return images * 2 - 1


def random_hflip(images: Tensor, generator: torch.Generator, p: float = 0.5) -> tuple[Tensor, Tensor]:
    """Mirror each image with probability p; returns the images and the per-image flip mask."""
    mask = torch.rand(images.shape[0], generator=generator) < p
    return flip_where(images, mask), mask


def flip_where(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror the images whose mask entry is True."""
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(-1), images)


def grayscale(images: Tensor) -> Tensor:
    """RGB [N, 3, H, W] -> luma [N, 1, H, W]."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
    return (images * weights[:, None, None]).sum(dim=1, keepdim=True)


def sketch_from_photo(images: Tensor, gain: float = 4.0) -> Tensor:
    """A line drawing in [0, 1] (dark lines on white) from RGB photos in [0, 1]: Sobel edges of the blurred luma."""
    gray = gaussian_blur(grayscale(images), kernel_size=5, sigma=1.0)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device)
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]
    gradients = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradients.pow(2).sum(dim=1, keepdim=True).sqrt()
    return 1 - (magnitude * gain).clamp(0, 1)


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Integer label maps [N, 1, H, W] or [N, H, W] -> float one-hot [N, num_classes, H, W]; ids out of range are refused."""
    labels = labels.long()
    if labels.ndim == 4:
        labels = labels[:, 0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"label ids must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def degrade_resolution(images: Tensor, factors: Sequence[int], generator: torch.Generator) -> Tensor:
    """Downsample each image by a factor drawn from `factors` (anti-aliased bicubic), then resize back (bicubic)."""
    size = images.shape[-2:]
    choice = torch.randint(len(factors), (images.shape[0],), generator=generator).to(images.device)
    degraded = images.clone()
    for index, factor in enumerate(factors):
        selected = (choice == index).nonzero().flatten()
        if factor == 1 or selected.numel() == 0:
            continue
        small_size = (max(1, size[0] // factor), max(1, size[1] // factor))
        small = F.interpolate(images[selected], size=small_size, mode="bicubic", align_corners=False, antialias=True)
        degraded[selected] = F.interpolate(small, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return degraded


def to_display(source: Tensor) -> Tensor:
    """Any encoder input as RGB in [0, 1] for viewing: signed RGB, sketches in [0, 1], one-hot maps coloured."""
    if source.shape[1] == 3:
        return ((source + 1) / 2).clamp(0, 1)
    if source.shape[1] == 1:
        return source.clamp(0, 1).repeat(1, 3, 1, 1)
    palette = SEGMENTATION_PALETTE.to(source.device)
    classes = source.argmax(dim=1) % palette.shape[0]
    return palette[classes].permute(0, 3, 1, 2)
