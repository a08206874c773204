"""Data-path throughput: alignment images/s against its floor (detector + landmarks alone), and
Parquet shard write / read MB/s.

    python benchmarks/bench_data.py [--shard-images 600] [--workers 0]

Runs on the embedded sample (built in a temporary folder); prints the hardware and the command.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.stages.align import AlignConfig, align_folder, usable_cores
from pipelines.stages.sample import SampleConfig, build_sample
from pipelines.stages.shard import ShardConfig, write_shards
from psp_core.data.align import FaceFinder, PhotoRejected, load_photo
from psp_core.data.shards import iter_shard_batches, shard_paths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


def hardware() -> str:
    """One line: CPU, cores usable by this process, load, library versions."""
    import dlib
    import PIL
    import pyarrow

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {cpu_model()}, {usable} usable cores ({os.cpu_count()} online), load avg {load:.1f}; "
            f"Python {platform.python_version()}, dlib {dlib.__version__}, Pillow {PIL.__version__}, "
            f"pyarrow {pyarrow.__version__}")


def detect_floor(photos: list[Path]) -> tuple[int, float]:
    """Decode + detect + 68 landmarks only, one process: (faces found, seconds)."""
    finder = FaceFinder()
    found = 0
    started = time.perf_counter()
    for path in photos:
        try:
            found += len(finder.find(np.asarray(load_photo(path, 64_000_000)))[:1])
        except PhotoRejected:
            pass
    return found, time.perf_counter() - started


def timed_align(raw: Path, out: Path, workers: int) -> tuple[dict, float]:
    """The whole align stage (decode, detect, landmarks, crop, PNG, records, index): (report, seconds)."""
    cfg = AlignConfig(input_dir=str(raw), output_dir=str(out), report=str(out.parent / f"{out.name}.json"),
                      workers=workers)
    started = time.perf_counter()
    report = align_folder(cfg)
    return report, time.perf_counter() - started


def unique_copies(aligned: Path, folder: Path, count: int) -> int:
    """Write `count` distinct PNGs (aligned faces with one pixel changed); returns their total bytes."""
    sources = sorted(aligned.glob("*.png"))
    folder.mkdir()
    total = 0
    for number in range(count):
        pixels = np.array(Image.open(sources[number % len(sources)]))
        pixels[0, 0] = [number % 256, (number // 256) % 256, 7]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (folder / f"img{number:05d}.png").write_bytes(buffer.getvalue())
        total += len(buffer.getvalue())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-images", type=int, default=600, help="images in the shard benchmark")
    parser.add_argument("--workers", type=int, default=0, help="align worker processes (0 = all cores)")
    parser.add_argument("--batch-size", type=int, default=32, help="reader batch size")
    args = parser.parse_args()
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    print("command:", shlex.join([python, *sys.argv]), "(from the repository root)")
    print("hardware:", hardware())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_sample(SampleConfig(output_dir=str(tmp / "raw")))
        photos = sorted(p for p in (tmp / "raw").rglob("*") if p.is_file() and p.suffix != ".json")

        faces, floor_s = detect_floor(photos)
        print(f"floor  (decode + detect + landmarks, 1 process): {len(photos)} photos in {floor_s:.2f}s = "
              f"{len(photos) / floor_s:.1f} photos/s ({faces} faces)")
        report, one_s = timed_align(tmp / "raw", tmp / "aligned1", workers=1)
        print(f"align  (whole stage, 1 process):                 {len(photos)} photos in {one_s:.2f}s = "
              f"{len(photos) / one_s:.1f} photos/s ({report['faces_aligned']} faces at 256 px); "
              f"floor is {floor_s / one_s:.0%} of the time")
        report, all_s = timed_align(tmp / "raw", tmp / "aligned", workers=args.workers)
        workers = args.workers or usable_cores()
        print(f"align  (whole stage, {workers} processes):                {len(photos)} photos in {all_s:.2f}s = "
              f"{len(photos) / all_s:.1f} photos/s (includes starting the pool)")

        image_bytes = unique_copies(tmp / "aligned", tmp / "many", args.shard_images)
        megabytes = image_bytes / 1e6
        cfg = ShardConfig(input_dir=str(tmp / "many"), output_dir=str(tmp / "shards"), report=str(tmp / "shard.json"))
        started = time.perf_counter()
        write_shards(cfg)
        write_s = time.perf_counter() - started
        print(f"shard write: {args.shard_images} PNGs, {megabytes:.1f} MB in {write_s:.2f}s = {megabytes / write_s:.0f} MB/s "
              f"({args.shard_images / write_s:.0f} images/s; includes verify + sha256)")

        paths = shard_paths(tmp / "shards")
        import pyarrow.parquet as pq

        started = time.perf_counter()
        rows = sum(pq.read_table(p, columns=["image"]).num_rows for p in paths)
        raw_s = time.perf_counter() - started
        print(f"shard read (bytes only):  {rows} rows, {megabytes / raw_s:.0f} MB/s")
        started = time.perf_counter()
        decoded = sum(len(b) for b in iter_shard_batches(paths, batch_size=args.batch_size, source_kind=None))
        read_s = time.perf_counter() - started
        print(f"shard read + PNG decode:  {decoded} images in {read_s:.2f}s = {megabytes / read_s:.0f} MB/s "
              f"({decoded / read_s:.0f} images/s of 256x256, 1 process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
