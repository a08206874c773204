"""Image grids people look at: training's input | target | output rows, evaluation's inputs over
reconstructions, and edit grids (codes by strengths). RGB tensors in, tensors or PIL pictures out."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from psp_core.data.transforms import to_display


def _picture(grid: Tensor) -> Image.Image:
    """A grid [3, H, W] in [0, 1] as an 8-bit RGB picture."""
    return Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


def comparison_grid(source: Tensor, target: Tensor, output: Tensor, similarities: Tensor | None = None) -> Tensor:
    """Rows of input | target | output in [0, 1] (3 x N tiles at the target size), output tiles captioned with identity similarity."""
    size = target.shape[-2:]
    display_source = F.interpolate(to_display(source.detach().float().cpu()), size=size, mode="nearest")
    outputs = ((output.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if similarities is not None:
        outputs = torch.stack([caption(img, f"id {float(s):.2f}") for img, s in zip(outputs, similarities)])
    targets = ((target.detach().float().cpu() + 1) / 2).clamp(0, 1)
    tiles = torch.stack([display_source, targets, outputs], dim=1).flatten(0, 1)
    return make_grid(tiles, nrow=3, padding=2)


def caption(image: Tensor, text: str) -> Tensor:
    """Write `text` in the top-left corner of an image [3, H, W] in [0, 1]."""
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    ImageDraw.Draw(picture).text((2, 2), text, fill=(255, 255, 0))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255


def reconstruction_grid(inputs: Tensor, outputs: Tensor | Sequence[Tensor], max_images: int = 8,
                        padding: int = 2) -> Image.Image:
    """PNG-ready RGB picture: the first `max_images` inputs (any encoder input, via `to_display`) over
    their outputs (one row, or one row per tensor given: e.g. every ReStyle step, or every model)."""
    rows = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    k = min(max_images, len(inputs), *(len(row) for row in rows))
    if k == 0:
        raise ValueError("reconstruction_grid needs at least one input/output pair")
    shown_rows = [((row[:k].detach().float().cpu() + 1) / 2).clamp(0, 1) for row in rows]
    shown_inputs = to_display(inputs[:k].detach().float().cpu())
    if shown_inputs.shape[-2:] != shown_rows[0].shape[-2:]:
        shown_inputs = F.interpolate(shown_inputs, size=shown_rows[0].shape[-2:], mode="nearest")
    grid = make_grid(torch.cat([shown_inputs, *shown_rows]), nrow=k, padding=padding, pad_value=1.0)
    return _picture(grid)


def edit_grid(images: Tensor, tile: int, padding: int = 2) -> Image.Image:
    """An edit grid as an RGB picture: images `[R, C, 3, H, W]` in [-1, 1] (rows = codes, columns = strengths),
    each cell `tile` pixels a side (area-averaged down, nearest-neighbour up, so small images stay sharp)."""
    assert images.ndim == 5 and images.shape[2] == 3, images.shape
    rows, columns = images.shape[:2]
    cells = ((images.detach().float().cpu().flatten(0, 1) + 1) / 2).clamp(0, 1)     # [R * C, 3, H, W]
    if cells.shape[-1] > tile:
        cells = F.interpolate(cells, size=(tile, tile), mode="area")
    elif cells.shape[-1] < tile:
        cells = F.interpolate(cells, size=(tile, tile), mode="nearest")
    grid = make_grid(cells, nrow=columns, padding=padding, pad_value=1.0)
    return _picture(grid)
