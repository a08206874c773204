"""`psp shard`: pack aligned images into Parquet shards (schema in psp_core.data.shards) with a manifest.

Reads `index.parquet` written by `psp align` when the input folder has one (source paths and
landmarks), otherwise every image file in the folder. Image bytes already in the configured
format are stored unchanged; exact duplicates (same bytes) are dropped and listed with their source
photos; the split comes from a hash of each row's group (`split_by`: its source photo, or its
folder), so near-copies of one photo never straddle train and test. The shard folder (a local path
or an object-store URI) is published whole: locally written under a temporary name and swapped in, on
an object store written under a fresh prefix with the manifest last (see pipelines.services.storage.objects).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipelines.params.loading import load_section
from pipelines.params.schema import ShardConfig
from pipelines.services import storage
from pipelines.services.storage import list_folder, read_regular_file, write_json_atomic
from psp_core.data.shards import (
    IMAGE_EXTENSIONS,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    assign_split,
    content_id,
    printable_path,
    split_group,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
FORMAT_SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
UNCOMPRESSED_COLUMNS = ("image", "source_image")


class RowRejected(Exception):
    """An input image (or its pair) that cannot go into a shard; the message says why."""


def run(args: argparse.Namespace) -> int:
    """Write the shards, manifest and report for the configured input folder."""
    cfg = load_section("shard", ShardConfig, args.overrides, args.params)
    report = write_shards(cfg)
    log.info("shard: %s", json.dumps(report))
    return 0


def write_shards(cfg: ShardConfig) -> dict[str, Any]:
    """Run the stage: read inputs in order, drop duplicates, write shards + manifest, return the report.

    The manifest lists the dropped duplicates and rejected inputs by path; the report only counts them.
    """
    input_dir = Path(cfg.input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"shard.input_dir {input_dir} is not a folder")
    seen: dict[str, str] = {}
    duplicates: list[dict[str, str]] = []
    rejects: list[dict[str, str]] = []
    counts = {"train": 0, "test": 0}
    groups: dict[str, set[str]] = {"train": set(), "test": set()}
    shards: list[dict[str, Any]] = []
    storage.check_access(cfg.output_dir, write=True)
    with storage.published_folder(cfg.output_dir, MANIFEST_FILE) as folder:
        buffer: list[dict] = []
        for entry in input_entries(input_dir):
            try:
                row = shard_row(entry, input_dir, cfg)
            except RowRejected as err:
                rejects.append({"file": printable_path(entry["file"]), "source_path": entry["source_path"], "reason": str(err)})
                continue
            if row["id"] in seen:
                duplicates.append({"file": printable_path(entry["file"]), "source_path": entry["source_path"],
                                   "same_as": seen[row["id"]]})
                continue
            seen[row["id"]] = entry["source_path"]
            counts[row["split"]] += 1
            groups[row["split"]].add(split_group(entry["source_path"], cfg.split_by))
            buffer.append(row)
            if len(buffer) == cfg.rows_per_shard:
                shards.append(write_shard(folder, len(shards), buffer, cfg.row_group_size))
                buffer = []
        if buffer or not shards:
            shards.append(write_shard(folder, len(shards), buffer, cfg.row_group_size))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "image_format": cfg.image_format,
            "test_fraction": cfg.test_fraction,
            "split_by": cfg.split_by,
            "paired_sources": cfg.source_dir is not None,
            "rows": {**counts, "total": counts["train"] + counts["test"]},
            "groups": {split: len(members) for split, members in groups.items()},
            "duplicates_dropped": len(duplicates),
            "rejected": len(rejects),
            "shards": shards,
            "duplicates": duplicates,
            "rejects": rejects,
        }
        folder.publish(manifest)
    if rejects:
        log.warning("shard: %d inputs rejected, e.g. %s: %s", len(rejects), rejects[0]["file"], rejects[0]["reason"])
    if cfg.test_fraction > 0 and counts["train"] and not counts["test"]:
        log.warning("shard: the test split is empty: %d %s group(s), test_fraction %s", len(groups["train"]),
                    cfg.split_by, cfg.test_fraction)
    report = {
        "rows": manifest["rows"],
        "groups": manifest["groups"],
        "duplicates_dropped": len(duplicates),
        "rejected": len(rejects),
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    write_json_atomic(cfg.report, report)
    return report


def input_entries(input_dir: Path) -> Iterator[dict]:
    """The images to shard, in a stable order: from align's index if present, else the folder's image files."""
    index = input_dir / INDEX_FILE
    if index.is_file():
        rows = pq.read_table(index, columns=["file", "source_path", "landmarks"]).to_pylist()
        yield from sorted(rows, key=lambda r: (r["source_path"], r["file"]))
        return
    for rel in list_folder(input_dir).images:
        yield {"file": rel, "source_path": printable_path(rel), "landmarks": None}


def shard_row(entry: dict, input_dir: Path, cfg: ShardConfig) -> dict:
    """One shard row from one input image (and its pair): bytes kept when already in `image_format`."""
    path = input_dir / entry["file"]
    try:
        data = read_regular_file(path)
    except OSError as err:
        raise RowRejected(f"unreadable: {err}") from None
    width, height, data = encoded_in_format(data, cfg.image_format, cfg.jpeg_quality)
    image_id = content_id(data)
    return {
        "id": image_id,
        "image": data,
        "width": width,
        "height": height,
        "source_path": entry["source_path"],
        "landmarks": entry["landmarks"],
        "split": assign_split(split_group(entry["source_path"], cfg.split_by), cfg.test_fraction),
        "source_image": paired_source(entry["source_path"], Path(cfg.source_dir)) if cfg.source_dir else None,
    }


def encoded_in_format(data: bytes, image_format: str, jpeg_quality: int) -> tuple[int, int, bytes]:
    """(width, height, bytes): the bytes unchanged if already a valid `image_format` file, else re-encoded RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if data.startswith(FORMAT_SIGNATURES[image_format]) and image.mode == "RGB":
                image.verify()
                return size[0], size[1], data
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise RowRejected(f"not a decodable image: {err}") from None
    buffer = io.BytesIO()
    if image_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    return size[0], size[1], buffer.getvalue()


def paired_source(source_path: str, source_dir: Path) -> bytes:
    """The paired input (segmentation map, sketch ...) with the same file name, stem first then any extension."""
    exact = source_dir / source_path
    candidates = [exact] + [exact.with_suffix(ext) for ext in sorted(IMAGE_EXTENSIONS)]
    for candidate in candidates:
        if candidate.is_file():
            data = candidate.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise RowRejected(f"paired source {candidate} is not a decodable image: {err}") from None
            return data
    raise RowRejected(f"no paired source image for {source_path} in {source_dir}")


def write_shard(folder: storage.FolderWriter, number: int, rows: list[dict], row_group_size: int) -> dict[str, Any]:
    """Write one shard file (image columns uncompressed: their bytes already are) and describe it."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    compression = {column: ("NONE" if column in UNCOMPRESSED_COLUMNS else "ZSTD") for column in SHARD_SCHEMA.names}
    with folder.open(f"shard-{number:05d}.parquet") as out:
        pq.write_table(
            table, out, row_group_size=row_group_size, compression=compression,
            use_dictionary=["split"], write_statistics=["id", "width", "height", "split", "source_path"],
        )
    written = folder.files[-1]
    return {"file": written.file, "rows": len(rows), "bytes": written.bytes, "sha256": written.sha256}
