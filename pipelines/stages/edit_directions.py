"""`psp edit`'s directions: the edits of `edit.edits` as named directions with their files (shipped FFHQ ones by
name, or the user's) loaded and checked against the model's generator."""
from __future__ import annotations

import re
from pathlib import Path

from pipelines.params.schema import SAFE_NAME, EditConfig, GanspaceParams, InterfaceganParams, SefaParams
from pipelines.stages.edit_actor import Direction
from psp_core.editing.directions import (
    FFHQ_DIRECTIONS,
    FFHQ_N_STYLES,
    GanspaceEdit,
    GanspacePCA,
    InterfaceganEdit,
    SefaEdit,
    load_interfacegan,
    sefa_directions,
)
from psp_core.errors import InputError
from psp_core.nets.stylegan2 import Generator

SHIPPED_INTERFACEGAN = {name: FFHQ_DIRECTIONS / f"interfacegan_{name}.pt" for name in ("age", "smile", "pose")}
SHIPPED_GANSPACE = {"ffhq": FFHQ_DIRECTIONS / "ganspace_ffhq_pca.pt"}


def direction_files(cfg: EditConfig) -> dict[str, Path]:
    """Every direction file the edits read, by the value that names it (a shipped name or a path)."""
    files = {}
    for entry in cfg.edits:
        if isinstance(entry, InterfaceganParams):
            files[entry.direction] = SHIPPED_INTERFACEGAN.get(entry.direction, Path(entry.direction))
        elif isinstance(entry, GanspaceParams):
            files[entry.pca] = SHIPPED_GANSPACE.get(entry.pca, Path(entry.pca))
    return files


def shipped_or_file(value: str, shipped: dict[str, Path], n_styles: int) -> Path:
    """A shipped FFHQ direction by name (refused for a generator other than FFHQ's 18-style one), else a file path."""
    if value not in shipped:
        return Path(value)
    path = shipped[value]
    if n_styles != FFHQ_N_STYLES:
        raise InputError(f"{path}: an FFHQ direction for the 1024 px generator ({FFHQ_N_STYLES} styles); this model's "
                         f"generator has {n_styles} styles")
    return path


def build_directions(cfg: EditConfig, generator: Generator, n_styles: int) -> list[Direction]:
    """Every direction the edits describe, with its files loaded and checked against the model; names unique."""
    directions: list[Direction] = []
    for entry in cfg.edits:
        if isinstance(entry, InterfaceganParams):
            path = shipped_or_file(entry.direction, SHIPPED_INTERFACEGAN, n_styles)
            name = entry.name or (entry.direction if entry.direction in SHIPPED_INTERFACEGAN else path.stem)
            direction = load_interfacegan(path, n_styles)
            directions.append(Direction(name, name, "interfacegan", None, entry.strengths(), InterfaceganEdit(direction)))
        elif isinstance(entry, GanspaceParams):
            path = shipped_or_file(entry.pca, SHIPPED_GANSPACE, n_styles)
            pca = GanspacePCA.load(path)
            grouped: dict[tuple[int, int, int], list[float]] = {}
            for index, start, end, strength in entry.directions:
                if index >= pca.comp.shape[0]:
                    raise InputError(f"{path}: has {pca.comp.shape[0]} components, edit.edits asks for pca_index {index}")
                if end > n_styles:
                    raise InputError(f"GANSpace entry ({index}, {start}, {end}, {strength}): styles {start}..{end - 1} "
                                     f"outside the model's 0..{n_styles - 1}")
                grouped.setdefault((index, start, end), []).append(strength)
            for (index, start, end), strengths in grouped.items():
                directions.append(Direction(f"{entry.name}-pc{index}-{start}-{end}", entry.name, "ganspace", index,
                                            tuple(strengths), GanspaceEdit(pca, index, start, end)))
        else:
            assert isinstance(entry, SefaParams)
            styles = tuple(entry.styles if entry.styles is not None else range(n_styles - 1))
            _, vectors = sefa_directions(generator, styles)
            directions.extend(Direction(f"{entry.name}-{k}", entry.name, "sefa", k, entry.strengths(),
                                        SefaEdit(vectors[k], styles)) for k in range(entry.top_k))
    for direction in directions:
        if not re.match(SAFE_NAME, direction.name):
            raise InputError(f"edit direction name {direction.name!r} is not a usable file name: set the edit's name")
        labels = {f"{s:+g}" for s in direction.strengths}
        if len(labels) != len(direction.strengths):
            raise InputError(f"edit direction {direction.name}: strengths {list(direction.strengths)} repeat (to 6 digits)")
    names = [d.name for d in directions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"two edits make a direction named {repeated[0]}: give one of them another name")
    return directions
