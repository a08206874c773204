"""Latent edits of W+ codes: InterFaceGAN directions, GANSpace principal components, SeFa; and the grid
picture of an edit (codes in rows, strengths in columns).

Codes are W+ `[N, n_styles, 512]`. Directions load from the files users bring (the e4e / ReStyle
releases' formats, `torch.load(..., weights_only=True)`); a file of the wrong shape is one
InputError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import Tensor

from psp_core.errors import InputError
from psp_core.nets.stylegan2 import Generator

FFHQ_DIRECTIONS = Path(__file__).parent / "ffhq"
"""The released FFHQ directions (InterFaceGAN age, smile, pose; GANSpace PCA) shipped with the package."""
FFHQ_N_STYLES = 18
"""The shipped directions mean something only in the W+ of the FFHQ 1024 px generator: 18 styles."""


def _load(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"direction file {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)   # released files hold CUDA tensors
    except Exception as err:
        raise InputError(f"{path}: not a direction file torch can load with weights_only=True ({type(err).__name__})") from None


def real_tensor(path: str | Path, value: object, what: str) -> Tensor:
    """`value`, read from a direction file, as float32 if it is a tensor of finite real numbers; else one
    InputError naming the file (complex, integer or NaN / Inf values would move codes to nonsense)."""
    if not isinstance(value, Tensor):
        raise InputError(f"{path}: {what} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise InputError(f"{path}: {what} holds {str(value.dtype).removeprefix('torch.')} values; "
                         "a direction is real floating-point")
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{path}: {what} holds values that are not finite (NaN or Inf)")
    return value.float()


def load_interfacegan(path: str | Path, n_styles: int) -> Tensor:
    """An InterFaceGAN direction as `[1, n_styles, 512]`: a W normal `[1, 512]` (or `[512]`) broadcast
    over every style, or a per-style W+ direction `[1, n_styles, 512]`."""
    direction = _load(path)
    if not isinstance(direction, Tensor):
        raise InputError(f"{path}: an InterFaceGAN direction is a tensor, got {type(direction).__name__}")
    direction = real_tensor(path, direction, "the direction")
    shape = tuple(direction.shape)
    if shape in ((512,), (1, 512)):
        return direction.float().reshape(1, 1, 512).expand(1, n_styles, 512).clone()
    if shape == (1, n_styles, 512):
        return direction.float()
    raise InputError(f"{path}: direction of shape {list(shape)}; expected [1, 512] or [1, {n_styles}, 512]")


def interfacegan(codes: Tensor, direction: Tensor, factors: Sequence[float]) -> Tensor:
    """`codes + factor * direction` for each factor: `[N, S, 512]`, `[1, S, 512]` -> `[F, N, S, 512]`."""
    assert codes.ndim == 3 and direction.shape[1:] == codes.shape[1:], (codes.shape, direction.shape)
    steps = torch.as_tensor(list(factors), dtype=codes.dtype, device=codes.device).view(-1, 1, 1, 1)
    return codes.unsqueeze(0) + steps * direction.to(codes).unsqueeze(0)


@dataclass(frozen=True)
class GanspacePCA:
    """GANSpace principal components of W: mean `[1, 512]`, components `[K, 1, 512]`, std `[K]`."""

    mean: Tensor
    comp: Tensor
    std: Tensor

    @classmethod
    def load(cls, path: str | Path) -> "GanspacePCA":
        """Read the released `{'mean', 'comp', 'std'}` file."""
        data = _load(path)
        if not isinstance(data, dict) or not {"mean", "comp", "std"} <= set(data):
            raise InputError(f"{path}: a GANSpace file is a dict with mean, comp and std")
        mean, comp, std = (real_tensor(path, data[k], k) for k in ("mean", "comp", "std"))
        k = comp.shape[0] if comp.dim() else 0
        if tuple(mean.shape) not in ((512,), (1, 512)) or tuple(comp.shape[1:]) != (1, 512) or tuple(std.shape) != (k,):
            raise InputError(f"{path}: shapes mean {list(mean.shape)}, comp {list(comp.shape)}, std {list(std.shape)}; "
                             "expected [1, 512], [K, 1, 512], [K]")
        if not bool((std > 0).all()):
            raise InputError(f"{path}: std must be > 0 for every component (strengths are in standard deviations)")
        return cls(mean.reshape(1, 512), comp, std)


def ganspace(codes: Tensor, pca: GanspacePCA, index: int, start: int, end: int, strength: float) -> Tensor:
    """The reference GANSpace edit of W+ codes `[N, S, 512]`: move style 0's coordinate along component
    `index` to `strength` standard deviations, and add that same shift to styles `start..end-1`."""
    assert codes.ndim == 3
    comp = pca.comp[index].reshape(512).to(codes)           # [512]
    std = float(pca.std[index])
    coordinate = ((codes[:, 0] - pca.mean.to(codes)) * comp).sum(-1) / std   # [N], from style 0 only
    delta = (strength - coordinate).view(-1, 1) * comp * std                # [N, 512]
    edited = codes.clone()
    edited[:, start:end] += delta.unsqueeze(1)
    return edited


def sefa_directions(generator: Generator, styles: Sequence[int]) -> tuple[Tensor, Tensor]:
    """SeFa's closed-form directions for the given W+ style indices: the eigenvectors of A A^T, where A
    stacks the column-normalised (transposed) modulation weights of the convolutions those styles drive
    (style 0: `conv1`, style i: `convs[i-1]`). Returns (eigenvalues [512], eigenvectors [512, 512] as
    rows), largest eigenvalue first; each eigenvector is defined up to sign."""
    convs = [generator.conv1] + list(generator.convs)
    if not styles or min(styles) < 0 or max(styles) >= len(convs):
        raise InputError(f"SeFa styles must be in 0..{len(convs) - 1}, got {list(styles)}")
    blocks = [convs[i].conv.modulation.weight.detach().double().T for i in styles]   # each [512, C_i]
    stacked = torch.cat(blocks, dim=1)
    stacked = stacked / stacked.norm(dim=0, keepdim=True)
    values, vectors = torch.linalg.eigh(stacked @ stacked.T)                        # ascending
    return values.flip(0).float(), vectors.flip(1).T.float()


def sefa(codes: Tensor, direction: Tensor, styles: Sequence[int], distances: Sequence[float]) -> Tensor:
    """Move the given styles of W+ codes `[N, S, 512]` by `distance * direction` for each distance -> `[F, N, S, 512]`."""
    assert codes.ndim == 3 and direction.shape == (codes.shape[-1],)
    mask = torch.zeros(codes.shape[1], 1, dtype=codes.dtype, device=codes.device)
    mask[list(styles)] = 1
    steps = torch.as_tensor(list(distances), dtype=codes.dtype, device=codes.device).view(-1, 1, 1, 1)
    return codes.unsqueeze(0) + steps * (mask * direction.to(codes)).unsqueeze(0)


class LatentEdit(Protocol):
    """One edit direction of W+ codes, applied at several strengths: `[N, S, 512]` -> `[F, N, S, 512]`."""

    def __call__(self, codes: Tensor, strengths: Sequence[float]) -> Tensor: ...


@dataclass(frozen=True)
class InterfaceganEdit:
    """`codes + factor * direction`, direction `[1, S, 512]` (from `load_interfacegan`)."""

    direction: Tensor

    def __call__(self, codes: Tensor, strengths: Sequence[float]) -> Tensor:
        return interfacegan(codes, self.direction, strengths)


@dataclass(frozen=True)
class GanspaceEdit:
    """The GANSpace edit of component `index` on styles `start..end-1`, one result per target strength."""

    pca: GanspacePCA
    index: int
    start: int
    end: int

    def __call__(self, codes: Tensor, strengths: Sequence[float]) -> Tensor:
        return torch.stack([ganspace(codes, self.pca, self.index, self.start, self.end, s) for s in strengths])


@dataclass(frozen=True)
class SefaEdit:
    """`codes + distance * direction` on the given styles only, direction `[512]` (from `sefa_directions`)."""

    direction: Tensor
    styles: tuple[int, ...]

    def __call__(self, codes: Tensor, strengths: Sequence[float]) -> Tensor:
        return sefa(codes, self.direction, self.styles, strengths)
