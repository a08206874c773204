"""Parquet image shards: the schema, the train/test split rule, and a batch reader that decodes late.

One row per image. `image` (and the optional paired `source_image`) hold the encoded file bytes
(PNG or JPEG) exactly as written; rows are decoded only when a batch is read. Pure pyarrow, numpy,
Pillow (torch only in `images_to_tensor`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from psp_core.errors import InputError

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
"""File name extensions (lower case) every stage treats as images."""
MANIFEST_FILE = "manifest.json"
NUM_LANDMARKS = 68
# 68 (x, y) pairs. The outer list is variable-size because pyarrow cannot read back null
# fixed-size lists from Parquet; the reader checks there are 68.
LANDMARKS_TYPE = pa.list_(pa.list_(pa.float32(), 2))

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("landmarks", LANDMARKS_TYPE),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source_image", pa.binary()),
], metadata={"psp.schema_version": str(SCHEMA_VERSION)})


class ShardError(InputError):
    """A shard file or row that cannot be read; the message names the shard and the row."""


def printable_path(path: str) -> str:
    """A relative path as stored in tables (UTF-8 text): itself, or with the bytes of a name that is
    not valid UTF-8 written as `\\xNN` escapes, so such a file is a row like any other."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def content_id(data: bytes) -> str:
    """The id of an image: the SHA-256 of its encoded bytes (identical files get the same id)."""
    return hashlib.sha256(data).hexdigest()


def split_group(source_path: str, split_by: str) -> str:
    """The group a row is split with: its source photo (`photo`: all faces of one photo) or the
    photo's folder (`folder`: one identity per folder, as CelebA/LFW-style layouts keep them)."""
    if split_by == "photo":
        return source_path
    if split_by == "folder":
        return posixpath.dirname(source_path) or "."
    raise ValueError(f"split_by must be 'photo' or 'folder', got {split_by!r}")


def assign_split(group: str, test_fraction: float) -> str:
    """'test' or 'train' from a hash of the group alone: every row of a group lands in one split,
    and keeps it when rows are added."""
    bucket = int(hashlib.sha256(f"split:{group}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if bucket < test_fraction else "train"


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB [H, W, 3], resized to `size`x`size` if given."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = image.convert("RGB")
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def decode_images(images: Sequence[bytes], size: int | None = None) -> np.ndarray:
    """Decode a batch of encoded images to uint8 [N, H, W, 3] (all the same size, or resized to `size`)."""
    decoded = []
    for number, data in enumerate(images):
        try:
            decoded.append(decode_image(data, size))
        except Exception as err:
            raise ShardError(f"image {number} of the batch cannot be decoded: {type(err).__name__}: {err}") from None
    return stack_images(decoded)


def stack_images(decoded: list[np.ndarray]) -> np.ndarray:
    """Stack HxWx3 arrays into one batch; differing sizes are an error (pass `size` to resize)."""
    shapes = {array.shape for array in decoded}
    if len(shapes) > 1:
        raise ShardError(f"images of different sizes {sorted(shapes)} in one batch: pass size= to resize")
    if not decoded:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.stack(decoded)


def images_to_tensor(images: np.ndarray) -> "torch.Tensor":
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1] (the encoder's input range)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor.div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class ShardBatch:
    """Decoded rows: images uint8 [N, H, W, 3]; landmarks float32 [N, 68, 2] (NaN where absent) or None."""

    ids: list[str]
    images: np.ndarray
    landmarks: np.ndarray | None
    source_images: np.ndarray | None
    source_paths: list[str]
    splits: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def open_shard(path: str | Path) -> pq.ParquetFile:
    """Open a shard and check it has the image columns; a non-Parquet or foreign file is a ShardError."""
    try:
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(f"{path}: not a readable Parquet shard ({err})") from None
    missing = {"id", "image", "split"} - set(shard.schema_arrow.names)
    if missing:
        raise ShardError(f"{path}: not an image shard, missing columns {sorted(missing)}")
    return shard


def iter_shard_batches(
    paths: Iterable[str | Path],
    batch_size: int,
    split: str | None = None,
    size: int | None = None,
    decode_source: bool = True,
) -> Iterator[ShardBatch]:
    """Yield decoded batches of `batch_size` rows (the last may be smaller) across shards in order.

    `split` keeps only 'train' or 'test' rows; `size` resizes images to `size`x`size`. A row that
    cannot be decoded raises ShardError naming its shard and row.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pending: list[tuple[pa.Table, str, np.ndarray]] = []
    pending_rows = 0
    for path in paths:
        shard = open_shard(path)
        columns = [c for c in SHARD_SCHEMA.names if c in shard.schema_arrow.names]
        if not decode_source and "source_image" in columns:
            columns.remove("source_image")
        offset = 0
        try:
            for record_batch in shard.iter_batches(batch_size=batch_size, columns=columns):
                table = pa.Table.from_batches([record_batch])
                rows = np.arange(offset, offset + table.num_rows)
                offset += table.num_rows
                if split is not None:
                    keep = np.asarray(table.column("split").to_numpy(zero_copy_only=False) == split)
                    table, rows = table.filter(pa.array(keep)), rows[keep]
                if table.num_rows:
                    pending.append((table, str(path), rows))
                    pending_rows += table.num_rows
                while pending_rows >= batch_size:
                    batch, pending = _take_rows(pending, batch_size)
                    pending_rows -= batch_size
                    yield _decode_batch(batch, size)
        except pa.ArrowException as err:
            raise ShardError(f"{path}: corrupt Parquet data after row {offset} ({err})") from None
    if pending_rows:
        batch, _ = _take_rows(pending, pending_rows)
        yield _decode_batch(batch, size)


def _take_rows(pending, count):
    taken, rest, need = [], [], count
    for table, path, rows in pending:
        if need == 0:
            rest.append((table, path, rows))
        elif table.num_rows <= need:
            taken.append((table, path, rows))
            need -= table.num_rows
        else:
            taken.append((table.slice(0, need), path, rows[:need]))
            rest.append((table.slice(need), path, rows[need:]))
            need = 0
    return taken, rest


def _decode_batch(parts: list[tuple[pa.Table, str, np.ndarray]], size: int | None) -> ShardBatch:
    ids, images, sources, landmarks, source_paths, splits = [], [], [], [], [], []
    has_source = all("source_image" in table.column_names for table, _, _ in parts)
    for table, path, rows in parts:
        data = table.to_pydict()
        absent = [None] * len(rows)
        for i, row in enumerate(rows):
            images.append(_decode_cell(data["image"][i], size, path, row, "image"))
            if has_source:
                raw = data["source_image"][i]
                sources.append(None if raw is None else _decode_cell(raw, size, path, row, "source_image"))
            landmarks.append(_landmarks_cell(data.get("landmarks", absent)[i], path, row))
        ids.extend(data["id"])
        splits.extend(data["split"])
        source_paths.extend(data.get("source_path", absent))
    source_images = None
    if has_source and sources and all(s is not None for s in sources):
        source_images = stack_images(sources)
    return ShardBatch(
        ids=ids,
        images=stack_images(images),
        landmarks=np.stack(landmarks) if landmarks and not all(np.isnan(l).all() for l in landmarks) else None,
        source_images=source_images,
        source_paths=source_paths,
        splits=splits,
    )


def _landmarks_cell(points: list | None, path: str, row: int) -> np.ndarray:
    if points is None:
        return np.full((NUM_LANDMARKS, 2), np.nan, np.float32)
    array = np.asarray(points, dtype=np.float32)
    if array.shape != (NUM_LANDMARKS, 2):
        raise ShardError(f"{path}: row {row}: landmarks have shape {array.shape}, expected ({NUM_LANDMARKS}, 2)")
    return array


def _decode_cell(data: bytes | None, size: int | None, path: str, row: int, column: str) -> np.ndarray:
    if data is None:
        raise ShardError(f"{path}: row {row}: column {column} is null")
    try:
        return decode_image(data, size)
    except Exception as err:
        raise ShardError(f"{path}: row {row}: {column} cannot be decoded ({type(err).__name__}: {err})") from None


def read_manifest(shard_dir: str | Path) -> dict:
    """Read a shard folder's manifest.json (rows per split, shard files, schema version)."""
    path = Path(shard_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} not found: run `psp shard` first") from None
    except ValueError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {manifest.get('schema_version')}, this reader reads {SCHEMA_VERSION}")
    return manifest


def shard_paths(shard_dir: str | Path, verify: bool = False) -> list[Path]:
    """The shard files listed in the manifest; checks each exists with its size (and sha256 if `verify`)."""
    shard_dir = Path(shard_dir)
    paths = []
    for entry in read_manifest(shard_dir)["shards"]:
        path = shard_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise ShardError(f"{path}: missing or not the size the manifest records ({entry['bytes']} bytes)")
        if verify and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest")
        paths.append(path)
    return paths
