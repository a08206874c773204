"""Publishing an output folder so readers never see a partial one: a folder of files written under a fresh
generation with its manifest last (`published_folder`), and a folder a stage claims as its own with a
marker written first (`claimed_folder`). Locally and on object stores alike (see the package docstring)."""
from __future__ import annotations

import hashlib
import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pipelines.services.storage.files import OUTPUT_MARKER, atomic_dir, output_folder
from pipelines.services.storage.locations import Location
from pipelines.services.storage.objects import (
    atomic_output,
    delete_file,
    exists,
    list_files,
    read_bytes,
    write_json_atomic,
)
from psp_core.errors import InputError


@dataclass(frozen=True)
class WrittenFile:
    """A file a `FolderWriter` wrote: its name relative to the folder (what the manifest lists), size, digest."""

    file: str
    bytes: int
    sha256: str


class _HashingWriter:
    """A write-only binary stream that counts and hashes what passes through to `target`."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._digest = hashlib.sha256()
        self._size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        self._target.write(view)
        self._digest.update(view)
        self._size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def result(self) -> tuple[int, str]:
        return self._size, self._digest.hexdigest()


class FolderWriter:
    """Writes the files of one output folder and, last, its manifest (see `published_folder`)."""

    def __init__(self, root: Location, prefix: str, manifest: str) -> None:
        self._root = root
        self._prefix = prefix
        self._manifest = manifest
        self.files: list[WrittenFile] = []
        self.published = False

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        """A write-only stream for the file `name` (atomic); afterwards `files` holds its WrittenFile.
        It has write/tell/flush: enough for `pyarrow.parquet.write_table` and `torch.save`."""
        if self.published:
            raise RuntimeError("the manifest is written last: no file after it")
        relative = self._prefix + name
        with atomic_output(self._root / relative) as out:
            hashing = _HashingWriter(out)
            yield hashing  # type: ignore[misc]
        size, digest = hashing.result()
        self.files.append(WrittenFile(file=relative, bytes=size, sha256=digest))

    def write_bytes(self, name: str, data: bytes) -> WrittenFile:
        """Write the file `name` with `data`; returns what the manifest lists for it."""
        with self.open(name) as out:
            out.write(data)
        return self.files[-1]

    def publish(self, manifest: dict) -> None:
        """Write the manifest (JSON) last: from now on readers see this version of the folder."""
        write_json_atomic(self._root / self._manifest, manifest)
        self.published = True


@contextmanager
def published_folder(path: str | Path | Location, manifest: str) -> Iterator[FolderWriter]:
    """The output folder `path`, written through a FolderWriter and published by its manifest, written
    last (see the module docstring). An existing non-empty folder without `manifest` is someone else's:
    refused. The block must end with `writer.publish(...)`."""
    location = Location.of(path)
    if location.is_local:
        with atomic_dir(location.path, manifest) as tmp:
            writer = FolderWriter(Location.of(tmp), "", manifest)
            yield writer
            _require_published(writer, location)
        return
    existing = list_files(location)
    if existing and not exists(location / manifest):
        raise InputError(f"{location} holds files and no {manifest}: not an output of this stage; refusing to write into it")
    generation = f"g-{uuid.uuid4().hex[:12]}/"
    writer = FolderWriter(location, generation, manifest)
    try:
        yield writer
        _require_published(writer, location)
    except BaseException:
        if not writer.published:
            for written in writer.files:
                delete_file(location / written.file)
        raise
    keep = {manifest} | {written.file for written in writer.files}
    for name in list_files(location):
        if name not in keep:
            delete_file(location / name)


def _require_published(writer: FolderWriter, location: Location) -> None:
    if not writer.published:
        raise RuntimeError(f"{location}: the block ended without writing the manifest")


@contextmanager
def claimed_folder(path: str | Path | Location, stage: str) -> Iterator[Location]:
    """`path` as `stage`'s output folder for the block, by the rules of `pipelines.services.storage.files.output_folder` (a new
    or empty folder is claimed with the marker object written first, a folder with the stage's marker is
    reused, any other non-empty folder is refused), on an object store too. Files go in with
    `atomic_output`; a folder claimed by this call and left holding only the marker is removed on failure."""
    location = Location.of(path)
    if location.is_local:
        with output_folder(location.path, stage) as folder:
            yield Location.of(folder)
        return
    marker = location / OUTPUT_MARKER
    created = not exists(marker)
    if created:
        if list_files(location):
            raise InputError(f"{location} is not empty and is not an output folder of `psp {stage}` (no "
                             f"{OUTPUT_MARKER}); refusing to write into it: choose a new or empty folder")
        write_json_atomic(marker, {"stage": stage})
    else:
        owner = _marker_stage(marker)
        if owner != stage:
            raise InputError(f"{location} is the output folder of `psp {owner}`, not of `psp {stage}`; choose another folder")
    try:
        yield location
    except BaseException:
        if created and not list_files(location):
            delete_file(marker)
        raise


def _marker_stage(marker: Location) -> str:
    try:
        return str(json.loads(read_bytes(marker))["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"
