"""Reading and writing files wherever they live (local paths and object stores alike), and failing fast,
in one line naming the URI, where an object store cannot be used."""
from __future__ import annotations

import hashlib
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.services.storage.credentials import scrub
from pipelines.services.storage.files import atomic_path, file_digest, json_document, temporary_prefix
from pipelines.services.storage.locations import Location
from pipelines.services.storage.s3 import s3_endpoint
from psp_core.errors import InputError

READ_ATTEMPTS = 8
READ_RETRY_SECONDS = 0.02  # the first pause before a reread; doubled on each further try
"""Tries of `read_bytes` on an object replaced while it is read."""

def reader_filesystem(path: str | Path | Location) -> tuple[pafs.FileSystem | None, str]:
    """What `psp_core.data.shards`' readers take for `path`: (None, the local path) for a local path, or (the
    store's pyarrow filesystem, the path in it) for a URI."""
    location = Location.of(path)
    if location.is_local:
        return None, str(location.path)
    return location.filesystem()


def parquet_schema(path: str | Path | Location) -> pa.Schema:
    """A Parquet file's schema (its footer only), from a local path or a URI."""
    filesystem, key = reader_filesystem(path)
    return pq.read_schema(key, filesystem=filesystem)


def parquet_columns(path: str | Path | Location, columns: list[str]) -> pa.Table:
    """Some columns of a Parquet file, from a local path or a URI."""
    filesystem, key = reader_filesystem(path)
    return pq.read_table(key, columns=columns, filesystem=filesystem)


def access_error(location: Location, err: BaseException) -> InputError:
    """One line naming `location` for a failed object-store call: refused credentials, a missing bucket,
    an unreachable endpoint, or the store's own first line (credentials scrubbed)."""
    message = str(err)
    upper = message.upper()
    if any(code in upper for code in ("ACCESS_DENIED", "ACCESSDENIED", "SIGNATURE_DOES_NOT_MATCH",
                                      "SIGNATUREDOESNOTMATCH", "INVALIDACCESSKEYID", "INVALID_ACCESS_KEY_ID",
                                      "FORBIDDEN", "EXPIREDTOKEN")):
        reason = ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) "
                  "and their permissions")
    elif "NOSUCHBUCKET" in upper or "NO_SUCH_BUCKET" in upper:
        reason = f"bucket '{_bucket(location)}' does not exist"
    elif "NETWORK_CONNECTION" in upper or "CURLCODE" in upper or "TIMEOUT" in upper or "TIMED OUT" in upper:
        reason = f"endpoint {_endpoint(location)} unreachable"
    else:
        reason = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    return InputError(scrub(f"cannot access {location}: {reason}"))


def _bucket(location: Location) -> str:
    return location.uri.split("://", 1)[1].split("/", 1)[0]


def _endpoint(location: Location) -> str:
    if location.scheme in ("s3", "s3a"):
        return s3_endpoint() or "of AWS S3"
    return f"of {location.scheme}://"


def check_access(path: str | Path | Location, write: bool = False) -> None:
    """Fail in seconds, with one line naming the URI, where an object-store location cannot be used:
    refused credentials, a missing bucket, an unreachable endpoint, a missing input (`write=False`: it
    must exist), or an output that cannot be written (`write=True`: a probe object is written and deleted).
    Local paths pass: the stages check those as before."""
    location = Location.of(path)
    if location.is_local:
        return
    fs, key = location.filesystem(fail_fast=True)
    bucket = key.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise InputError(f"cannot access {location}: bucket '{bucket}' does not exist")
        info = fs.get_file_info(key)
        if write:
            _probe_write(fs, key.rpartition("/")[0] if info.type == pafs.FileType.File else key)
            return
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"cannot access {location}: no such file or folder")
    except OSError as err:
        raise access_error(location, err) from None


def _probe_write(fs: pafs.FileSystem, folder: str) -> None:
    """Write and delete a small object under `folder`: the credentials may write there."""
    probe = f"{folder}/.psp-access-check-{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as out:
        out.write(b"psp access check\n")
    fs.delete_file(probe)


def exists(path: str | Path | Location) -> bool:
    """Whether a file or folder exists at `path` (on an object store: an object, or objects under the prefix)."""
    location = Location.of(path)
    if location.is_local:
        return location.path.exists()
    fs, key = location.filesystem()
    return fs.get_file_info(key).type != pafs.FileType.NotFound


def read_bytes(path: str | Path | Location) -> bytes:
    """The bytes of a file (FileNotFoundError where there is none); on an object store, one version of it
    even while a writer replaces it (see `_read_whole_object`)."""
    location = Location.of(path)
    if location.is_local:
        return location.path.read_bytes()
    fs, key = location.filesystem()
    return _read_whole_object(fs, key)


def _read_whole_object(fs: pafs.FileSystem, key: str) -> bytes:
    """Read an object whole, retried while it changes under the reader.

    pyarrow reads an object as a size lookup and then a ranged GET of that many bytes: an object replaced
    in between by one of another size would come back cut or padded. The object's size and modification
    time before and after the read must agree with what was read; a replacement of the same size is no
    harm (the one ranged GET returns one version whole). Rereads back off exponentially so that a reader
    racing a busy writer gets a quiet moment."""
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(READ_RETRY_SECONDS * 2 ** (attempt - 1))
        before = fs.get_file_info(key)
        if before.type != pafs.FileType.File:
            raise FileNotFoundError(f"{key}: no such file")
        try:
            with fs.open_input_file(key) as handle:
                data = handle.read()
        except OSError:
            data = None
        after = fs.get_file_info(key)
        if data is not None and len(data) == before.size and (after.size, after.mtime_ns) == (before.size, before.mtime_ns):
            return data
    raise OSError(f"{key} kept changing while it was read ({READ_ATTEMPTS} tries)")


def digest(path: str | Path | Location) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (a local file by `pipelines.services.storage.files.file_digest`)."""
    location = Location.of(path)
    if location.is_local:
        return file_digest(location.path)
    fs, key = location.filesystem()
    hashed = hashlib.sha256()
    with fs.open_input_stream(key) as source:
        for chunk in iter(lambda: source.read(1 << 22), b""):
            hashed.update(chunk)
    return hashed.hexdigest()


def open_input_file(path: str | Path | Location) -> Any:
    """A seekable binary file (what `pyarrow.parquet.ParquetFile` and `torch.load` read)."""
    location = Location.of(path)
    if location.is_local:
        return open(location.path, "rb")
    fs, key = location.filesystem()
    return fs.open_input_file(key)


@contextmanager
def atomic_output(path: str | Path | Location) -> Iterator[BinaryIO]:
    """A binary stream whose bytes appear under `path` only when the block completes (see the module
    docstring: locally a temporary file renamed, on an object store a temporary key moved)."""
    location = Location.of(path)
    if location.is_local:
        with atomic_path(location.path) as tmp, open(tmp, "wb") as out:
            yield out
        return
    fs, key = location.filesystem()
    folder, _, name = key.rpartition("/")
    tmp = f"{folder}/{temporary_prefix(name)}{uuid.uuid4().hex[:12]}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        fs.move(tmp, key)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _delete_quietly(fs: pafs.FileSystem, key: str) -> None:
    try:
        fs.delete_file(key)
    except OSError:
        pass


def write_bytes_atomic(path: str | Path | Location, data: bytes) -> None:
    """Write `data` to `path` atomically (a reader sees the old bytes or the new ones, never part)."""
    with atomic_output(path) as out:
        out.write(data)


def write_json_atomic(path: str | Path | Location, value: Any) -> None:
    """Write a JSON document (`pipelines.services.storage.files.json_document`) to a local path or a URI atomically."""
    write_bytes_atomic(path, json_document(value))


def list_files(path: str | Path | Location) -> list[str]:
    """Every file under a folder, as sorted POSIX paths relative to it; hidden entries (a leading `.`
    anywhere in the relative path: markers, temporary keys) are left out. A missing folder lists nothing."""
    location = Location.of(path)
    fs, key = location.filesystem()
    selector = pafs.FileSelector(key, recursive=True, allow_not_found=True)
    prefix = key.rstrip("/") + "/"
    names = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
        if not any(part.startswith(".") for part in relative.split("/")):
            names.append(relative)
    return sorted(names)


def delete_file(path: str | Path | Location) -> None:
    """Delete one file (missing is fine)."""
    location = Location.of(path)
    if location.is_local:
        location.path.unlink(missing_ok=True)
        return
    fs, key = location.filesystem()
    try:
        fs.delete_file(key)
    except FileNotFoundError:
        pass
