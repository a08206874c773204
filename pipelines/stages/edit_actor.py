"""`psp edit`'s Ray Data side: a direction to move codes along, and the actor that moves and decodes them.
Kept apart from the driver so the actors import only what decoding needs."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines.services import storage
from psp_core.data.presets import TARGET_SIZE
from psp_core.data.shards import LATENT_TYPE, TARGET_IMAGE, decode_image, stack_mixed
from psp_core.data.tensors import pair_tensors, png_bytes
from psp_core.editing.directions import LatentEdit
from psp_core.errors import InputError
from psp_core.inference import InferenceModel, keep_layers, offsets_of
from psp_core.nets.checkpoints import load_generator
from psp_core.nets.hyperstyle import WeightOffsets

LATENTS, IMAGES, GRIDS = "latents", "images", "grids"
IMAGE_PATH = re.compile(rf"^{IMAGES}/[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*_[+-][0-9.e+-]+\.png$")
"""What an image path recorded in an output file looks like (checked before a stale image is removed)."""


@dataclass(frozen=True)
class Direction:
    """One grid's worth of edits: a named direction, its strengths (grid columns) and the edit applying it."""

    name: str
    edit: str
    kind: str
    index: int | None
    strengths: tuple[float, ...]
    latent_edit: LatentEdit

    def moved(self, codes: torch.Tensor) -> torch.Tensor:
        """W+ codes [N, S, 512] at every strength: [F, N, S, 512]."""
        return self.latent_edit(codes, self.strengths)

    def image_path(self, image_id: str, column: int) -> str:
        """The edited image's path in the output folder, named by code id and strength."""
        return f"{IMAGES}/{self.name}/{image_id}_{self.strengths[column]:+g}.png"

    def describe(self) -> dict[str, Any]:
        """The direction as the report and manifest list it."""
        return {"name": self.name, "edit": self.edit, "kind": self.kind, "index": self.index,
                "strengths": list(self.strengths), "grid": grid_path(self.name)}


def grid_path(direction: str) -> str:
    """A direction's grid in the output folder."""
    return f"{GRIDS}/{direction}.png"


CODE_COLUMNS = ("id", "source_path", "latent", "variant", "error")
"""The columns of an invert output file that editing reads (`read_codes`)."""


def check_codes(path: storage.Location, n_styles: int, with_targets: bool = False) -> None:
    """An invert output file holds what `read_codes` reads: its columns, W+ codes of the generator's `n_styles`,
    and a code on every row to edit (variant 0, no error); with `with_targets` (HyperStyle) also each such row's
    input image, which its weight offsets are recomputed from. Else one InputError naming the file."""
    schema = storage.parquet_schema(path)
    if with_targets and TARGET_IMAGE not in schema.names:
        raise InputError(f"{path}: no {TARGET_IMAGE!r} column to recompute HyperStyle's weight offsets from (written by "
                         "an earlier version): rerun `psp invert`")
    for name in CODE_COLUMNS:
        if name not in schema.names:
            raise InputError(f"{path}: no {name!r} column; not a `psp invert` output file (rerun `psp invert`)")
    found = schema.field("latent").type
    styles: set[int] = set()
    needed = ["latent"] + ([TARGET_IMAGE] if with_targets else [])
    if found == LATENT_TYPE:
        table = storage.parquet_columns(path, [*needed, "variant", "error"])
        styles = set(pc.list_value_length(table.column("latent")).drop_null().to_pylist())
    if found != LATENT_TYPE or styles - {n_styles}:
        raise InputError(f"{path}: latent column of type {found} with {sorted(styles)} styles; the model's "
                         f"generator takes [{n_styles} x 512] float32 codes")
    edited = pc.and_(pc.equal(table.column("variant"), 0), pc.is_null(table.column("error")))
    for name in needed:
        missing = pc.sum(pc.and_(edited, pc.is_null(table.column(name)))).as_py() or 0
        if missing:
            raise InputError(f"{path}: {missing} row{'s' if missing > 1 else ''} to edit (variant 0, no error) "
                             f"{'have' if missing > 1 else 'has'} no {name}; rerun `psp invert`")


def read_codes(item: pa.Table) -> pa.Table:
    """One invert file's codes to edit: variant 0 rows without an error (and their input images when the item
    asks for them: a HyperStyle model's, `check_codes` found them)."""
    unit, path = item.column("unit")[0].as_py(), item.column("path")[0].as_py()
    targets = [TARGET_IMAGE] if item.column("targets")[0].as_py() else []
    table = storage.parquet_columns(path, ["id", "source_path", "latent", "variant", "error", *targets])
    table = table.filter(pc.and_(pc.equal(table.column("variant"), 0), pc.is_null(table.column("error"))))
    table = table.drop(["variant", "error"])
    return table.add_column(0, "unit", pa.array([unit] * table.num_rows, pa.string()))


class Editor:
    """Ray Data actor: loads the generator once, then edits batches of W+ codes along every direction at
    every strength and decodes them (stored noise, so an unchanged code gives its reconstruction). A HyperStyle
    model's codes are decoded with their image's weight offsets, recomputed from the input image the inversion kept
    in `offset_steps` steps (`offset_layers` of them applied); `generator` replaces the model's generator in the
    decode (domain adaptation), not in the offsets' recomputation."""

    def __init__(self, checkpoint: str, directions: list[Direction], batch_size: int, use_gpu: bool, cpus: float,
                 precision: str = "fp32", compile: str | bool = False, compile_cache: str | None = None,
                 n_images: int = 0, generator: str | None = None, offset_steps: int | None = None,
                 offset_layers: list[int] | None = None):
        device = "cuda" if use_gpu else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        preset = None if offset_steps is None else "encode"   # HyperStyle encodes its input images again
        self.model = InferenceModel.load(checkpoint, preset, device, precision, compile, compile_cache, n_images,
                                         offset_steps)
        self.device = self.model.device
        self.n_styles = self.model.n_styles
        self.generator = None if generator is None else self.model.prepared_generator(load_generator(generator))
        self.offset_steps, self.offset_layers = offset_steps, offset_layers
        self.directions = directions
        self.batch_size = batch_size

    def __call__(self, table: pa.Table) -> pa.Table:
        n, styles = table.num_rows, self.n_styles
        flat = table.column("latent").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
        codes = torch.from_numpy(flat.reshape(n, styles, 512).copy()).to(self.device)   # [N, S, 512]
        offsets = self.weight_offsets(table.column(TARGET_IMAGE).to_pylist()) if self.offset_steps else None
        ids = table.column("id").to_pylist()
        parts = []
        with torch.inference_mode():
            for direction in self.directions:
                moved = direction.moved(codes)                                        # [F, N, S, 512]
                f = len(direction.strengths)
                assert moved.shape == (f, n, styles, 512), moved.shape
                latents = moved.reshape(f * n, styles * 512).float().cpu().numpy()
                rows = pa.array(np.tile(np.arange(n), f))
                parts.append(pa.table({
                    "unit": table.column("unit").take(rows), "id": table.column("id").take(rows),
                    "source_path": table.column("source_path").take(rows),
                    "edit": pa.array([direction.edit] * (f * n), pa.string()),
                    "kind": pa.array([direction.kind] * (f * n), pa.string()),
                    "direction": pa.array([direction.name] * (f * n), pa.string()),
                    "index": pa.array([direction.index] * (f * n), pa.int32()),
                    "strength": pa.array(np.repeat(np.asarray(direction.strengths, np.float32), n), pa.float32()),
                    "latent": pa.FixedSizeListArray.from_arrays(
                        pa.FixedSizeListArray.from_arrays(pa.array(latents.reshape(-1)), 512), styles),
                    "image": pa.array([direction.image_path(ids[i], k) for k in range(f) for i in range(n)], pa.string()),
                    "png": pa.array(self.decode(moved.flatten(0, 1), offsets, n), pa.binary()),
                }))
        return pa.concat_tables(parts)

    def weight_offsets(self, images: list[bytes]) -> WeightOffsets:
        """HyperStyle: the weight offsets of each input image [N] (a Ray batch: at most `batch_size`) as invert had
        them, by the same transform and steps; only the `offset_layers` kept."""
        pixels = stack_mixed([decode_image(data) for data in images], TARGET_SIZE)
        source, _ = self.model.prepare(*pair_tensors(pixels, None, self.model.input_kind))
        return keep_layers(self.model.invert(source, self.offset_steps)[-1].offsets, self.offset_layers)

    def decode(self, codes: torch.Tensor, offsets: WeightOffsets | None, n: int) -> list[bytes]:
        """W+ codes [M, S, 512] -> PNG bytes of their images, decoded `batch_size` at a time; code j is image
        j mod `n`'s (`offsets` holds the n images' weight offsets: each image's edits share them)."""
        pngs = []
        for start in range(0, codes.shape[0], self.batch_size):
            chunk = codes[start:start + self.batch_size]
            rows = torch.arange(start, start + chunk.shape[0]) % n                  # the image of each code
            mine = None if offsets is None else offsets_of(offsets, rows)
            images = self.model.decode(chunk, mine, self.generator)                 # [B, 3, H, W]
            pngs.extend(png_bytes(image) for image in images)
        return pngs
