"""Decoded images as torch tensors: the (source, target) pair a preset transform takes, the encoder's
input range, and generator images back to PNG bytes."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from psp_core.data.shards import ShardBatch, ShardError, SourceKind


def pair_tensors(images: np.ndarray, sources: np.ndarray | None,
                 kind: SourceKind) -> tuple[torch.Tensor, torch.Tensor]:
    """The (source, target) pair a preset transform takes, as NCHW torch tensors: target uint8
    [N, 3, H, W]; source the paired sources (uint8, or int64 label maps [N, 1, H, W]) or, where the
    shards have none, the target itself (a sketch preset then draws its sketch from the photo)."""
    target = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if sources is None:
        if kind == "segmentation":
            raise ShardError("a segmentation preset needs paired label maps (shard with source_dir)")
        return target, target
    return torch.from_numpy(np.ascontiguousarray(sources)).permute(0, 3, 1, 2), target


def batch_pair(batch: ShardBatch, kind: SourceKind) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) NCHW tensors of a decoded shard batch for a preset of this input kind (see `pair_tensors`)."""
    return pair_tensors(batch.images, batch.source_images, kind)


def png_bytes(image: torch.Tensor) -> bytes:
    """A generator image [3, H, W] in [-1, 1] as PNG bytes (clamped, rounded to 8 bits)."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1] (the encoder's input range)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor.div_(127.5).sub_(1.0)
