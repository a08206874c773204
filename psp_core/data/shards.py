"""Parquet image shards: the schema, the train/test split rule, and a batch reader that decodes late.

One row per image. `image` (and the optional paired `source_image`) hold the encoded file bytes
(PNG or JPEG) exactly as written; rows are decoded only when a batch is read. Pure pyarrow, numpy,
Pillow; the torch side of a batch is `psp_core.data.tensors`.

Shard folders may live in any pyarrow filesystem: the readers take an optional `filesystem` (then
paths are that filesystem's paths, e.g. `bucket/key` for S3); without one, paths are local as always.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from psp_core.errors import InputError

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


LATENT_TYPE = pa.list_(pa.list_(pa.float32(), 512))
"""The Parquet type of a W+ code column (`psp invert`'s latents): [n_styles][512] float32. The outer
list is variable-size because pyarrow cannot read back null fixed-size lists (a rejected row's code)."""
MODEL_METADATA_KEY = b"psp.model"
"""Schema metadata key naming the model (pinned reference) that wrote a latents file."""
TARGET_IMAGE = "target_image"
"""A latents file's column of a HyperStyle inversion: each image's bytes as read, from which an edit recomputes the
image's weight offsets (too large to store: ~0.15 GB per image at 1024 px)."""


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


def decode_label_map(data: bytes) -> np.ndarray:
    """A segmentation label map (single-channel PNG, one class id per pixel) -> int64 [H, W]; an RGB
    file is read as its luma, a palette file as its indices (the class ids)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        labels = image if image.mode in ("L", "P", "I") else image.convert("L")
        return np.asarray(labels).astype(np.int64)


SourceKind = Literal["rgb", "sketch", "segmentation"]


def decode_source(data: bytes, kind: SourceKind, size: int | None = None) -> np.ndarray:
    """A paired source image as its input kind sees it: RGB uint8 [H, W, 3], a sketch's gray uint8
    [H, W, 1], or a label map int64 [H, W, 1] (never interpolated, so no resize here)."""
    if kind == "rgb":
        return decode_image(data, size)
    if kind == "segmentation":
        return decode_label_map(data)[..., None]
    with Image.open(io.BytesIO(data)) as image:
        gray = image.convert("L")
    if size is not None and gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(gray)[..., None]


def decode_sources(datas: Sequence[bytes], kind: SourceKind, size: int | None = None) -> np.ndarray:
    """A batch of paired sources decoded as `decode_source` does, stacked: [N, H, W, C]."""
    decoded = []
    for number, data in enumerate(datas):
        try:
            decoded.append(decode_source(data, kind, size))
        except Exception as err:
            raise ShardError(f"source image {number} of the batch cannot be decoded: {type(err).__name__}: {err}") from None
    return stack_images(decoded)


def stack_mixed(arrays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stack decoded images [H, W, C] as they are when they share one size (as shards do), else each
    resized to `size` x `size` first (bilinear; integer label maps nearest), as an image folder may need."""
    if len({a.shape for a in arrays}) <= 1:
        return stack_images(list(arrays))
    resized = []
    for array in arrays:
        photo = array.dtype == np.uint8
        method = Image.Resampling.BILINEAR if photo else Image.Resampling.NEAREST
        planes = [np.asarray(Image.fromarray(array[..., c].astype(np.uint8 if photo else np.int32)).resize((size, size), method))
                  for c in range(array.shape[-1])]
        resized.append(np.stack(planes, -1).astype(array.dtype))
    return np.stack(resized)


@dataclass(frozen=True)
class ShardBatch:
    """Decoded rows: images uint8 [N, H, W, 3]; landmarks float32 [N, 68, 2] (NaN where absent) or None;
    source_images as `decode_source` makes them for the reader's `source_kind` (None without pairs)."""

    ids: list[str]
    images: np.ndarray
    landmarks: np.ndarray | None
    source_images: np.ndarray | None
    source_paths: list[str]
    splits: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> "ShardBatch":
        """The first `n` rows."""
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return ShardBatch(self.ids[:n], self.images[:n], cut(self.landmarks), cut(self.source_images),
                          self.source_paths[:n], self.splits[:n])


def open_shard(path: str | Path, filesystem: pafs.FileSystem | None = None) -> pq.ParquetFile:
    """Open a shard (a local path, or a path in `filesystem`) and check it has the image columns; a
    non-Parquet or foreign file is a ShardError."""
    try:
        shard = pq.ParquetFile(path if filesystem is None else filesystem.open_input_file(str(path)))
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
    source_kind: SourceKind | None = "rgb",
    filesystem: pafs.FileSystem | None = None,
) -> Iterator[ShardBatch]:
    """Yield decoded batches of `batch_size` rows (the last may be smaller) across shards in order.

    `split` keeps only 'train' or 'test' rows; `size` resizes images to `size`x`size`; paired sources
    are decoded as `source_kind` (None: not read); `paths` are in `filesystem` if given. A row that
    cannot be decoded raises ShardError naming its shard and row.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pending: list[tuple[pa.Table, str, np.ndarray]] = []
    pending_rows = 0
    for path in paths:
        shard = open_shard(path, filesystem)
        columns = [c for c in SHARD_SCHEMA.names if c in shard.schema_arrow.names]
        if source_kind is None and "source_image" in columns:
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
                    yield _decode_batch(batch, size, source_kind)
        except pa.ArrowException as err:
            raise ShardError(f"{path}: corrupt Parquet data after row {offset} ({err})") from None
    if pending_rows:
        batch, _ = _take_rows(pending, pending_rows)
        yield _decode_batch(batch, size, source_kind)


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


def _decode_batch(parts: list[tuple[pa.Table, str, np.ndarray]], size: int | None,
                  source_kind: SourceKind | None) -> ShardBatch:
    ids, images, sources, landmarks, source_paths, splits = [], [], [], [], [], []
    has_source = all("source_image" in table.column_names for table, _, _ in parts)
    for table, path, rows in parts:
        data = table.to_pydict()
        absent = [None] * len(rows)
        for i, row in enumerate(rows):
            images.append(_decode_cell(data["image"][i], size, path, row, "image"))
            if has_source:
                raw = data["source_image"][i]
                sources.append(None if raw is None else _decode_cell(raw, size, path, row, "source_image", source_kind))
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


def _decode_cell(data: bytes | None, size: int | None, path: str, row: int, column: str,
                 kind: SourceKind = "rgb") -> np.ndarray:
    if data is None:
        raise ShardError(f"{path}: row {row}: column {column} is null")
    try:
        return decode_source(data, kind, size)
    except Exception as err:
        raise ShardError(f"{path}: row {row}: {column} cannot be decoded ({type(err).__name__}: {err})") from None


def is_shard_folder(path: str | Path, filesystem: pafs.FileSystem | None = None) -> bool:
    """Whether `path` is a shard folder (it has a manifest), as opposed to, e.g., a folder of images."""
    if filesystem is not None:
        return filesystem.get_file_info(f"{path}/{MANIFEST_FILE}").type == pafs.FileType.File
    return (Path(path) / MANIFEST_FILE).is_file()


MANIFEST_DIGEST_CHARS = 32
"""Hex digits of a manifest's sha256 that name a shard folder's content everywhere (run names, MLflow
datasets, which keep digests of at most 36 characters, evaluation records): its first 128 bits."""


@dataclass(frozen=True)
class ShardManifest:
    """A shard folder's manifest.json, read once and passed on: rows per split, the shard files (`file`,
    `rows`, `bytes`, `sha256` each), whether every row holds a paired source image, and the digest of the
    document's bytes. `document` is the whole JSON (rejects, groups, ...), as `psp shard` wrote it."""

    rows: Mapping[str, int]
    shards: tuple[Mapping[str, Any], ...]
    paired_sources: bool
    digest: str
    document: Mapping[str, Any]

    @property
    def columns(self) -> list[str]:
        """The columns a reader of images needs: id, image, source_path and split, and the paired source
        when the shards have one (the one schema: `SHARD_SCHEMA`)."""
        return ["id", "image", "source_path", "split"] + (["source_image"] if self.paired_sources else [])

    @classmethod
    def parse(cls, data: bytes, where: str) -> "ShardManifest":
        """The manifest in `data` (the bytes of `where`); a foreign or damaged document is a ShardError."""
        try:
            document = json.loads(data)
        except ValueError as err:
            raise ShardError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
            version = document.get("schema_version") if isinstance(document, dict) else None
            raise ShardError(f"{where}: schema version {version}, this reader reads {SCHEMA_VERSION}")
        try:
            rows = {str(k): int(v) for k, v in document["rows"].items()}
            shards = tuple(dict(entry) for entry in document["shards"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ShardError(f"{where}: not a shard manifest (rows and shards)") from None
        if not all(isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str) for entry in shards):
            raise ShardError(f"{where}: a shard entry lacks its file name or sha256")
        return cls(rows=rows, shards=shards, paired_sources=bool(document.get("paired_sources")),
                   digest=hashlib.sha256(data).hexdigest()[:MANIFEST_DIGEST_CHARS], document=document)


def read_manifest(shard_dir: str | Path, filesystem: pafs.FileSystem | None = None) -> ShardManifest:
    """Read a shard folder's manifest.json (`shard_dir` is in `filesystem` if given)."""
    path = f"{shard_dir}/{MANIFEST_FILE}" if filesystem is not None else Path(shard_dir) / MANIFEST_FILE
    try:
        if filesystem is None:
            data = path.read_bytes()
        else:
            with filesystem.open_input_stream(path) as stream:
                data = stream.read()
    except FileNotFoundError:
        raise ShardError(f"{path} not found: run `psp shard` first") from None
    return ShardManifest.parse(data, str(path))


def shard_paths(shard_dir: str | Path, verify: bool = False, filesystem: pafs.FileSystem | None = None,
                manifest: ShardManifest | None = None) -> list[Path] | list[str]:
    """The shard files `manifest` (read from `shard_dir` when not given) lists; checks each exists with its
    size (and sha256 if `verify`). Local paths without `filesystem`; with one, the files' paths in it."""
    manifest = manifest if manifest is not None else read_manifest(shard_dir, filesystem)
    if filesystem is None:
        return _local_shard_paths(Path(shard_dir), manifest, verify)
    paths = []
    for entry in manifest.shards:
        path = f"{str(shard_dir).rstrip('/')}/{entry['file']}"
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File or info.size != entry["bytes"]:
            raise ShardError(f"{path}: missing or not the size the manifest records ({entry['bytes']} bytes)")
        if verify and _stream_digest(filesystem, path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest")
        paths.append(path)
    return paths


def _stream_digest(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_shard_paths(shard_dir: Path, manifest: ShardManifest, verify: bool) -> list[Path]:
    paths = []
    for entry in manifest.shards:
        path = shard_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise ShardError(f"{path}: missing or not the size the manifest records ({entry['bytes']} bytes)")
        if verify and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest")
        paths.append(path)
    return paths
