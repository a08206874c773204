"""The local cache of fetched weights: a file on an object store (or any MLflow artifact, fetched by the
tracking service) copied once per machine, kept under its sha256, re-verified on every use."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from pipelines.services.storage.credentials import scrub
from pipelines.services.storage.files import atomic_path, file_digest
from pipelines.services.storage.locations import Location, is_registry_reference
from pipelines.services.storage.objects import access_error
from psp_core.errors import InputError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """The local cache of fetched weights: $XDG_CACHE_HOME/psp (default ~/.cache/psp)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psp"


def cached_weights(path: str | Path, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local path for a weights file: a local path as it is; a URI (`s3://...`, any store pyarrow or
    fsspec resolves) fetched once into a local cache, where a file is kept under its sha256. Registry
    artifacts (`models:/`, `runs:/`) come through the tracking service (`tracking.fetch_weights`).

    Processes on one node share the cache: a file lock per source lets one fetch while the others wait
    and reuse. A cached file is re-hashed on every use (a damaged copy is fetched again) and reused only
    while its source is unchanged (same size and modification time; MLflow run artifacts and numbered
    model versions never change; an alias is resolved to its version first). `sha256`, if given, is
    what the file must hash to (else InputError).
    """
    text = str(path)
    cache = cache_dir or cache_root()
    if is_registry_reference(path):
        raise ValueError(f"{text}: a registry artifact; fetch it with the tracking service (tracking.fetch_weights)")
    location = Location.of(path)
    fetched = location.path if location.is_local else _cached_object(location, cache)
    if sha256 is not None and (not fetched.is_file() or file_digest(fetched) != sha256):
        raise InputError(f"{scrub(text)}: not a file with the expected sha256 {sha256}")
    return fetched


def _cached_object(location: Location, cache: Path) -> Path:
    """Fetch an object-store file into the cache (see `cached_weights`)."""
    fs, key = location.filesystem()
    try:
        info = fs.get_file_info(key)
    except OSError as err:
        raise access_error(location, err) from None
    if info.type != pafs.FileType.File:
        raise InputError(f"{location}: no such file")

    def fetch(staging: Path) -> Path:
        target = staging / location.name
        with fs.open_input_stream(key) as source, open(target, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 22), b""):
                out.write(chunk)
        after = fs.get_file_info(key)
        if target.stat().st_size != info.size or (after.size, after.mtime_ns) != (info.size, info.mtime_ns):
            raise InputError(f"{location} changed while it was fetched; run again")
        return target

    return cached_copy(location.uri, {"size": info.size, "mtime_ns": info.mtime_ns}, fetch, cache)


def cached_copy(source: str, fingerprint: dict, fetch: Callable[[Path], Path], cache: Path | None = None) -> Path:
    """The cached copy of `source`: reused if its record matches `fingerprint` and it verifies, else
    fetched with `fetch(staging_folder)` (which returns the file or folder it wrote there) and stored.
    One process at a time per source (file lock). `cache`: the cache folder (default `cache_root()`)."""
    cache = cache or cache_root()
    key = hashlib.sha256(source.encode()).hexdigest()[:32]
    records = cache / "sources"
    records.mkdir(parents=True, exist_ok=True)
    record_path = records / f"{key}.json"
    with _locked(records / f"{key}.lock"):
        cached = _verified_copy(record_path, source, fingerprint, cache)
        if cached is not None:
            log.info("using the cached copy of %s", scrub(source))
            return cached
        log.info("fetching %s into the local cache", scrub(source))
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        try:
            fetched = fetch(staging)
            if fetched.is_file():
                digest = file_digest(fetched)
                cached = cache / "sha256" / digest / fetched.name
            else:
                digest = None
                cached = cache / "folders" / key
                shutil.rmtree(cached, ignore_errors=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record = {"source": source, **fingerprint, "sha256": digest, "path": cached.relative_to(cache).as_posix()}
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record) + "\n")
        return cached


def _verified_copy(record_path: Path, source: str, fingerprint: dict, cache: Path) -> Path | None:
    """The cached copy the record names, if it is of this source with this fingerprint and is intact (a
    file still hashes to its sha256, a folder exists); a damaged copy is removed."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != source or any(record.get(k) != v for k, v in fingerprint.items()):
        return None
    cached = cache / str(record.get("path"))
    if record.get("sha256") is None:
        return cached if cached.is_dir() else None
    if cached.is_file() and file_digest(cached) == record["sha256"]:
        return cached
    log.warning("the cached copy %s is damaged or gone: fetching it again", cached)
    shutil.rmtree(cached.parent, ignore_errors=True)
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (flock) for the block: one process at a time on this node."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
