"""`psp align`: FFHQ-align every photo of a folder, in parallel, resumably, with a rejects table.

Outputs (in `output_dir`): one PNG per aligned face, `index.parquet` (file, source path, face
number, score, size, 68x2 landmarks in the aligned image), `rejects.csv` (path, reason, detail),
and `.records/` (one JSON per input photo: what a rerun reuses). `report` gets the counts (a DVC
metric). Every input file with an image extension ends up in the index or in the rejects table.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field
from tqdm import tqdm

from pipelines.config import StageConfig, load_section
from pipelines.io import atomic_path, write_bytes_atomic, write_json_atomic
from psp_core.align import FaceFinder, PhotoRejected, align_face, load_photo, resize_square
from psp_core.shards import LANDMARKS_TYPE

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
INDEX_FILE = "index.parquet"
REJECTS_FILE = "rejects.csv"
RECORDS_DIR = ".records"
OUTPUT_NAME = re.compile(r"-[0-9a-f]{8}(-f\d+)?\.png$")  # what photo_name + save_face produce

INDEX_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("source_path", pa.string()),
    ("face", pa.int32()),
    ("score", pa.float32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("landmarks", LANDMARKS_TYPE),
])


class AlignConfig(StageConfig):
    """`align` section of params.yaml."""

    input_dir: str = "data/raw"
    output_dir: str = "data/aligned"
    report: str = "reports/align.json"
    output_size: int = Field(256, ge=16, le=4096)
    supersample: int = Field(1, ge=1, le=8)
    faces: Literal["largest", "all"] = "largest"
    upsample: int = Field(1, ge=0, le=3)
    threshold: float = 0.4
    min_face_size: int = Field(48, ge=1)
    detect_max_side: int = Field(1024, ge=64)
    max_pixels: int = Field(64_000_000, ge=1)
    skip_alignment: bool = False
    workers: int = Field(0, ge=0)

    def output_key(self) -> str:
        """Hash of the settings that change the aligned output (records made under others are redone)."""
        fields = self.model_dump(exclude={"input_dir", "output_dir", "report", "workers"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    """Align the input folder as configured; per-image failures become rejects, the exit code is 0."""
    cfg = load_section("align", AlignConfig, args.overrides, args.params)
    report = align_folder(cfg)
    log.info("align: %s", json.dumps(report))
    return 0


def align_folder(cfg: AlignConfig) -> dict[str, Any]:
    """Run the stage: align new inputs, reuse finished ones, write index, rejects and report."""
    input_dir = Path(cfg.input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"align.input_dir {input_dir} is not a folder")
    output_dir = Path(cfg.output_dir)
    source, target = input_dir.resolve(), output_dir.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ValueError(f"align.output_dir {output_dir} and align.input_dir {input_dir} must not contain each other")
    records_dir = output_dir / RECORDS_DIR
    records_dir.mkdir(parents=True, exist_ok=True)

    photos, ignored = list_photos(input_dir)
    key = cfg.output_key()
    records: dict[str, dict] = {}
    todo: list[tuple[str, str]] = []
    for rel in photos:
        name = photo_name(rel)
        record = reusable_record(records_dir / f"{name}.json", input_dir / rel, key, output_dir)
        if record is None:
            todo.append((rel, name))
        else:
            records[rel] = record
    log.info("align: %d photos (%d already aligned, %d to do), %d other files ignored",
             len(photos), len(records), len(todo), len(ignored))

    started = time.perf_counter()
    records.update(align_photos(todo, cfg, key))
    elapsed = time.perf_counter() - started
    if todo:
        log.info("align: %d photos in %.1fs (%.2f photos/s)", len(todo), elapsed, len(todo) / max(elapsed, 1e-9))

    ordered = [records[rel] for rel in photos]
    remove_stale_outputs(output_dir, ordered)
    write_index(output_dir / INDEX_FILE, ordered)
    write_rejects(output_dir / REJECTS_FILE, ordered)
    report = align_report(ordered, ignored)
    write_json_atomic(cfg.report, report)
    return report


def list_photos(input_dir: Path) -> tuple[list[str], list[str]]:
    """Files under `input_dir` (relative, sorted): those with an image extension, and all others."""
    photos, others = [], []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        (photos if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(rel.as_posix())
    return photos, others


def photo_name(rel: str) -> str:
    """A file-name-safe, collision-free name for an input: its stem plus a hash of its relative path."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rel).stem)[:80] or "photo"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def reusable_record(record_path: Path, photo: Path, key: str, output_dir: Path) -> dict | None:
    """The saved record of a photo if it was made from the same file and settings and its images exist."""
    try:
        record = json.loads(record_path.read_text())
        stat = photo.stat()
    except (OSError, ValueError):
        return None
    same = (record.get("config") == key and record.get("size") == stat.st_size
            and record.get("mtime_ns") == stat.st_mtime_ns)
    if same and all((output_dir / face["file"]).is_file() for face in record.get("faces", [])):
        return record
    return None


def align_photos(todo: list[tuple[str, str]], cfg: AlignConfig, key: str) -> dict[str, dict]:
    """Align photos on a process pool (inline for one worker); a crash of a worker becomes an `error` reject."""
    if not todo:
        return {}
    workers = min(cfg.workers or usable_cores(), len(todo))
    results: dict[str, dict] = {}
    if workers == 1:
        init_worker(cfg)
        progress = tqdm(total=len(todo), desc="align", unit="photo", disable=None)
        for rel, name in todo:
            results[rel] = align_one(rel, name, key)
            progress.update()
    else:
        # fork: workers start at once with everything imported (spawn re-imports torch via psp_core).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(cfg,)) as pool:
            futures = {pool.submit(align_one, rel, name, key): (rel, name) for rel, name in todo}
            progress = tqdm(total=len(todo), desc="align", unit="photo", disable=None)
            for future in as_completed(futures):
                rel, name = futures[future]
                try:
                    results[rel] = future.result()
                except BrokenProcessPool as err:
                    results[rel] = photo_record(rel, Path(cfg.input_dir) / rel, key, [],
                                                [("error", f"worker process died: {err}")])
                progress.update()
    progress.close()
    return results


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_WORKER: dict[str, Any] = {}


def init_worker(cfg: AlignConfig) -> None:
    """Load dlib's models once per worker process."""
    _WORKER["cfg"] = cfg
    if not cfg.skip_alignment:
        _WORKER["finder"] = FaceFinder(cfg.upsample, cfg.threshold, cfg.detect_max_side)


def align_one(rel: str, name: str, key: str) -> dict:
    """Align one photo in a worker: write its face PNGs and its record; never raises."""
    cfg: AlignConfig = _WORKER["cfg"]
    source = Path(cfg.input_dir) / rel
    output_dir = Path(cfg.output_dir)
    faces: list[dict] = []
    rejects: list[tuple[str, str]] = []
    try:
        photo = load_photo(source, cfg.max_pixels)
        if cfg.skip_alignment:
            faces.append(save_face(output_dir, f"{name}.png", 0, None, resize_square(photo, cfg.output_size), None))
        else:
            faces, rejects = align_faces(photo, name, cfg, output_dir)
    except PhotoRejected as err:
        rejects.append((err.reason, err.detail))
    except Exception as err:  # one bad photo must not stop the stage: record it and go on
        rejects.append(("error", f"{type(err).__name__}: {err}"))
    record = photo_record(rel, source, key, faces, rejects)
    write_json_atomic(output_dir / RECORDS_DIR / f"{name}.json", record)
    return record


def align_faces(
    photo: Image.Image, name: str, cfg: AlignConfig, output_dir: Path
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Find, filter and crop the faces of one RGB photo as `faces` and `min_face_size` say."""
    found = _WORKER["finder"].find(np.asarray(photo))
    chosen = found if cfg.faces == "all" else found[:1]
    rejects = [
        ("extra_face", f"face {n + 1} of {len(found)} (score {f.score:.2f}, {f.width} px): faces=largest keeps one")
        for n, f in enumerate(found[1:], start=1)
    ] if cfg.faces == "largest" else []
    faces = []
    for number, face in enumerate(chosen):
        if face.width < cfg.min_face_size:
            rejects.append(("too_small", f"face {number + 1} is {face.width} px wide, min_face_size is {cfg.min_face_size}"))
            continue
        image, landmarks = align_face(photo, face.landmarks, cfg.output_size, cfg.supersample)
        faces.append(save_face(output_dir, f"{name}-f{number}.png", number, face.score, image, landmarks))
    return faces, rejects


def save_face(
    output_dir: Path, file: str, number: int, score: float | None, image: Image.Image, landmarks: np.ndarray | None
) -> dict:
    """Write one aligned image as PNG (atomically) and describe it for the record."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(output_dir / file, buffer.getvalue())
    return {
        "file": file,
        "face": number,
        "score": score,
        "width": image.width,
        "height": image.height,
        "landmarks": None if landmarks is None else np.round(landmarks, 3).tolist(),
    }


def photo_record(rel: str, source: Path, key: str, faces: list[dict], rejects: list[tuple[str, str]]) -> dict:
    """What was made of one input photo (also what a rerun reuses)."""
    try:
        stat = source.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = None, None
    return {
        "source": rel, "size": size, "mtime_ns": mtime, "config": key, "faces": faces,
        "rejects": [{"reason": reason, "detail": detail} for reason, detail in rejects],
    }


def remove_stale_outputs(output_dir: Path, records: list[dict]) -> None:
    """Delete images (named as this stage names them) and records that no current input produced."""
    keep = {face["file"] for record in records for face in record["faces"]}
    keep_records = {f"{photo_name(record['source'])}.json" for record in records}
    for path in output_dir.glob("*.png"):
        if path.name not in keep and OUTPUT_NAME.search(path.name):
            path.unlink()
    for path in (output_dir / RECORDS_DIR).glob("*.json"):
        if path.name not in keep_records:
            path.unlink()


def write_index(path: Path, records: list[dict]) -> None:
    """Write the Parquet index of aligned images (landmarks null when alignment was skipped)."""
    rows = [dict(face, source_path=record["source"]) for record in records for face in record["faces"]]
    columns = {name: [row[name] for row in rows] for name in INDEX_SCHEMA.names}
    table = pa.table(columns, schema=INDEX_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_rejects(path: Path, records: list[dict]) -> None:
    """Write the rejects table as CSV: path, reason, detail."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason", "detail"])
            for record in records:
                for reject in record["rejects"]:
                    writer.writerow([record["source"], reject["reason"], reject["detail"]])


def align_report(records: list[dict], ignored: list[str]) -> dict[str, Any]:
    """Counts for reports/align.json."""
    reasons = Counter(reject["reason"] for record in records for reject in record["rejects"])
    return {
        "photos": len(records),
        "photos_aligned": sum(1 for record in records if record["faces"]),
        "faces_aligned": sum(len(record["faces"]) for record in records),
        "rejects": sum(reasons.values()),
        "reject_reasons": dict(sorted(reasons.items())),
        "other_files_ignored": len(ignored),
    }
