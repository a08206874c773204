"""`psp align`: FFHQ-align every photo of a folder, in parallel, resumably, with a rejects table.

Outputs (in `output_dir`, a folder this stage owns): one PNG per aligned face, `index.parquet`
(file, source path, face number, score, size, 68x2 landmarks in the aligned image), `rejects.csv`
(path, reason, detail), and `.records/` (one JSON per input photo: what it made, what a rerun
reuses, and the only files the stage ever removes). `report` gets the counts (a DVC metric).
Every entry of the input folder is accounted for: aligned, a reject row, or counted as skipped.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipelines.params.loading import load_section
from pipelines.params.schema import AlignConfig
from pipelines.services.storage import (
    FolderListing,
    atomic_path,
    list_folder,
    output_folder,
    read_regular_file,
    write_bytes_atomic,
    write_json_atomic,
)
from psp_core.data.align import FaceFinder, PhotoRejected, align_face, load_photo, resize_square
from psp_core.data.shards import LANDMARKS_TYPE, printable_path
from psp_core.errors import InputError

log = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
REJECTS_FILE = "rejects.csv"
RECORDS_DIR = ".records"
RECORD_VERSION = 2          # records of other versions are redone

INDEX_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("source_path", pa.string()),
    ("face", pa.int32()),
    ("score", pa.float32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("landmarks", LANDMARKS_TYPE),
])


def run(args: argparse.Namespace) -> int:
    """Align the input folder as configured; per-image failures become rejects, the exit code is 0."""
    cfg = load_section("align", AlignConfig, args.overrides, args.params)
    report = align_folder(cfg)
    log.info("align: %s", json.dumps(report))
    return 0


def align_folder(cfg: AlignConfig) -> dict[str, Any]:
    """Run the stage: align new inputs, reuse finished ones, write index, rejects and report."""
    # inputs
    input_dir = Path(cfg.input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"align.input_dir {input_dir} is not a folder")
    output_dir = Path(cfg.output_dir)
    source, target = input_dir.resolve(), output_dir.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise InputError(f"align.output_dir {output_dir} and align.input_dir {input_dir} must not contain each other")
    listing = list_folder(input_dir)

    with output_folder(output_dir, "align"):
        records_dir = output_dir / RECORDS_DIR
        records_dir.mkdir(exist_ok=True)
        previous = read_records(records_dir)
        owned = {face["file"] for record in previous.values() for face in record.get("faces", [])}
        foreign = frozenset(p.name for p in output_dir.glob("*.png")) - owned

        # reuse what a previous run made from the same file and settings
        key = cfg.output_key()
        records: dict[str, dict] = {}
        todo: list[tuple[str, str]] = []
        for rel in listing.images:
            name = photo_name(rel)
            record = reusable_record(previous.get(f"{name}.json"), input_dir / rel, key, output_dir)
            if record is None:
                todo.append((rel, name))
            else:
                records[rel] = record
        log.info("align: %d photos (%d already aligned, %d to do), %d other files ignored, %d entries skipped %s",
                 len(listing.images), len(records), len(todo), len(listing.others), len(listing.skipped),
                 listing.skipped_counts() or "")

        # align
        started = time.perf_counter()
        records.update(align_photos(todo, cfg, key, foreign))
        elapsed = time.perf_counter() - started
        if todo:
            log.info("align: %d photos in %.1fs (%.2f photos/s)", len(todo), elapsed, len(todo) / max(elapsed, 1e-9))

        # outputs
        ordered = mark_duplicates([records[rel] for rel in listing.images])
        remove_stale_outputs(output_dir, previous, ordered)
        write_index(output_dir / INDEX_FILE, ordered)
        write_rejects(output_dir / REJECTS_FILE, ordered, listing)
        report = align_report(ordered, listing)
        write_json_atomic(cfg.report, report)
    return report


def photo_name(rel: str) -> str:
    """A file-name-safe, collision-free name for an input: its stem plus a hash of its relative path's bytes."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rel).stem)[:80] or "photo"
    return f"{stem}-{hashlib.sha1(os.fsencode(rel)).hexdigest()[:8]}"


def read_records(records_dir: Path) -> dict[str, dict]:
    """The records earlier runs left, by file name (unreadable ones are ignored: that photo is redone)."""
    records = {}
    for path in records_dir.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("faces"), list):
            records[path.name] = record
    return records


def reusable_record(record: dict | None, photo: Path, key: str, output_dir: Path) -> dict | None:
    """The saved record of a photo if it was made from the same file and settings and its images exist."""
    if record is None:
        return None
    try:
        stat = photo.stat()
    except OSError:
        return None
    same = (not record.get("pending") and record.get("version") == RECORD_VERSION and record.get("config") == key
            and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns)
    if same and all((output_dir / face["file"]).is_file() for face in record["faces"]):
        return record
    return None


def align_photos(todo: list[tuple[str, str]], cfg: AlignConfig, key: str, foreign: frozenset[str]) -> dict[str, dict]:
    """Align photos on a process pool (inline for one worker); a crash of a worker becomes an `error` reject.

    Ctrl-C or SIGTERM kills the workers at once (finished photos keep their records); workers die
    with the stage even on SIGKILL (PR_SET_PDEATHSIG)."""
    if not todo:
        return {}
    workers = min(cfg.workers or usable_cores(), len(todo))
    results: dict[str, dict] = {}
    progress = tqdm(total=len(todo), desc="align", unit="photo", disable=None)
    try:
        if workers == 1:
            init_worker(cfg, foreign, in_process=True)
            for rel, name in todo:
                results[rel] = align_one(rel, name, key)
                progress.update()
            return results
        # fork: workers start at once with everything imported (spawn re-imports torch via psp_core).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=init_worker, initargs=(cfg, foreign))
        try:
            futures = {pool.submit(align_one, rel, name, key): (rel, name) for rel, name in todo}
            for future in as_completed(futures):
                rel, name = futures[future]
                try:
                    results[rel] = future.result()
                except BrokenProcessPool as err:
                    results[rel] = photo_record(rel, Path(cfg.input_dir) / rel, key, [],
                                                [("error", f"worker process died: {err}")])
                progress.update()
        except BaseException:
            stop_pool(pool)
            raise
        pool.shutdown()
        return results
    finally:
        progress.close()


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel queued photos and kill the workers now, not after the queue drains."""
    processes = list((getattr(pool, "_processes", None) or {}).values())   # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=5)


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_WORKER: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1


def init_worker(cfg: AlignConfig, foreign: frozenset[str], in_process: bool = False) -> None:
    """Load dlib's models once per worker process. A pool worker ignores Ctrl-C (the stage stops
    it) and is killed by the kernel when the stage's process dies, however it dies."""
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # not Linux: the pool's own shutdown is what stops the workers
        if os.getppid() == 1:
            os._exit(0)  # the stage died before the death signal was armed
    _WORKER["cfg"] = cfg
    _WORKER["foreign"] = foreign
    if not cfg.skip_alignment:
        _WORKER["finder"] = FaceFinder(cfg.upsample, cfg.threshold, cfg.detect_max_side)


def align_one(rel: str, name: str, key: str) -> dict:
    """Align one photo in a worker: write its face PNGs and its record; never raises.

    The images it will write are claimed in a pending record first, so a worker killed between an
    image and the final record leaves files a rerun knows as this stage's own (and replaces)."""
    cfg: AlignConfig = _WORKER["cfg"]
    source = Path(cfg.input_dir) / rel
    output_dir = Path(cfg.output_dir)
    faces: list[dict] = []
    rejects: list[tuple[str, str]] = []
    digest = None
    try:
        try:
            data = read_regular_file(source)
        except OSError as err:
            raise PhotoRejected("unreadable", f"{type(err).__name__}: {err}") from None
        digest = hashlib.sha256(data).hexdigest()
        photo = load_photo(NamedBytes(data, printable_path(rel)), cfg.max_pixels)
        if cfg.skip_alignment:
            planned = [AlignedFace(f"{name}.png", 0, None, resize_square(photo, cfg.output_size), None)]
        else:
            planned, rejects = align_faces(photo, name, cfg)
        for face in planned:
            if face.file in _WORKER.get("foreign", ()):
                raise PhotoRejected("output_exists", f"{output_dir / face.file} exists and was not written by psp align")
        if planned:
            write_json_atomic(output_dir / RECORDS_DIR / f"{name}.json",
                              {"version": RECORD_VERSION, "source": rel, "pending": True,
                               "faces": [{"file": face.file} for face in planned]})
        faces = [save_face(output_dir, face) for face in planned]
    except PhotoRejected as err:
        rejects.append((err.reason, err.detail))
    except Exception as err:  # one bad photo must not stop the stage: record it and go on
        rejects.append(("error", f"{type(err).__name__}: {err}"))
    record = photo_record(rel, source, key, faces, rejects, digest)
    write_json_atomic(output_dir / RECORDS_DIR / f"{name}.json", record)
    return record


class NamedBytes(io.BytesIO):
    """File bytes that carry the file's name (for Pillow's messages and our logs)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name


@dataclass(frozen=True)
class AlignedFace:
    """One output image before it is written: its file name, face number, detector score and landmarks."""
    file: str
    number: int
    score: float | None
    image: Image.Image
    landmarks: np.ndarray | None


def align_faces(photo: Image.Image, name: str, cfg: AlignConfig) -> tuple[list[AlignedFace], list[tuple[str, str]]]:
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
        faces.append(AlignedFace(f"{name}-f{number}.png", number, face.score, image, landmarks))
    return faces, rejects


PNG_COMPRESS_LEVEL = 1
"""zlib level of the aligned PNGs: the same pixels as Pillow's default level 6, encoded 3.7x faster (0.18 s against
0.67 s for the sample's 50 faces, of the 1.5 s the stage spent past the face detector) for files 11 % larger
(74.9 against 67.2 KiB at 256 px; benchmarks/README.md, "Data")."""


def save_face(output_dir: Path, face: AlignedFace) -> dict:
    """Write one aligned image as PNG (atomically) and describe it for the record."""
    buffer = io.BytesIO()
    face.image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    write_bytes_atomic(output_dir / face.file, buffer.getvalue())
    return {
        "file": face.file,
        "face": face.number,
        "score": face.score,
        "width": face.image.width,
        "height": face.image.height,
        "landmarks": None if face.landmarks is None else np.round(face.landmarks, 3).tolist(),
    }


def photo_record(rel: str, source: Path, key: str, faces: list[dict], rejects: list[tuple[str, str]],
                 sha256: str | None = None) -> dict:
    """What was made of one input photo (also what a rerun reuses and what the stage may remove)."""
    try:
        stat = source.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = None, None
    return {
        "version": RECORD_VERSION, "source": rel, "size": size, "mtime_ns": mtime, "sha256": sha256,
        "config": key, "faces": faces,
        "rejects": [{"reason": reason, "detail": detail} for reason, detail in rejects],
    }


def mark_duplicates(records: list[dict]) -> list[dict]:
    """Records in input order, each later copy of an earlier photo's exact bytes marked with
    `duplicate_of` (its faces stay on disk but leave the index; the rejects table names both)."""
    first: dict[str, str] = {}
    marked = []
    for record in records:
        digest = record.get("sha256")
        original = first.setdefault(digest, record["source"]) if digest else record["source"]
        marked.append(record | {"duplicate_of": original} if original != record["source"] else record)
    return marked


def remove_stale_outputs(output_dir: Path, previous: dict[str, dict], records: list[dict]) -> None:
    """Delete the images and records of earlier runs that no current input produced: only files
    that a record of this stage lists, never anything else in the folder."""
    keep = {face["file"] for record in records for face in record["faces"]}
    keep_records = {f"{photo_name(record['source'])}.json" for record in records}
    for record_name, record in previous.items():
        for face in record["faces"]:
            if face["file"] not in keep:
                (output_dir / face["file"]).unlink(missing_ok=True)
        if record_name not in keep_records:
            (output_dir / RECORDS_DIR / record_name).unlink(missing_ok=True)


def write_index(path: Path, records: list[dict]) -> None:
    """Write the Parquet index of aligned images (landmarks null when alignment was skipped)."""
    rows = [dict(face, source_path=printable_path(record["source"]))
            for record in records if "duplicate_of" not in record for face in record["faces"]]
    columns = {name: [row[name] for row in rows] for name in INDEX_SCHEMA.names}
    table = pa.table(columns, schema=INDEX_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_rejects(path: Path, records: list[dict], listing: FolderListing) -> None:
    """Write the rejects table as CSV (path, reason, detail): photos that gave no usable face,
    duplicates, and the image files and folders the listing passed over."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason", "detail"])
            for record in records:
                shown = printable_path(record["source"])
                if "duplicate_of" in record:
                    writer.writerow([shown, "duplicate", f"same bytes as {printable_path(record['duplicate_of'])}"])
                for reject in record["rejects"]:
                    writer.writerow([shown, reject["reason"], reject["detail"]])
            for rel, reason in listing.reportable_skips():
                writer.writerow([printable_path(rel), reason, SKIP_DETAILS[reason]])


SKIP_DETAILS = {
    "hidden": "hidden entries (names starting with a dot) are not read",
    "broken_link": "a symbolic link whose target does not exist",
    "symlinked_folder": "links to folders are not followed; point align.input_dir at the target or copy it in",
    "not_regular_file": "a pipe, socket or device, not a file",
    "unreadable_folder": "the folder cannot be listed (permissions?)",
}


def align_report(records: list[dict], listing: FolderListing) -> dict[str, Any]:
    """Counts for reports/align.json."""
    kept = [record for record in records if "duplicate_of" not in record]
    reasons = Counter(reject["reason"] for record in records for reject in record["rejects"])
    reasons.update({"duplicate": len(records) - len(kept)} if len(records) > len(kept) else {})
    reasons.update(reason for _, reason in listing.reportable_skips())
    return {
        "photos": len(records),
        "photos_aligned": sum(1 for record in kept if record["faces"]),
        "faces_aligned": sum(len(record["faces"]) for record in kept),
        "duplicates": len(records) - len(kept),
        "rejects": sum(reasons.values()),
        "reject_reasons": dict(sorted(reasons.items())),
        "other_files_ignored": len(listing.others),
        "skipped": listing.skipped_counts(),
    }
