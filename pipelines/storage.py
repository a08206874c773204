"""Where data lives: a local path, or a URI of an object store (`s3://bucket/key`, and whatever else
pyarrow's or fsspec's filesystems resolve, e.g. `gs://`). The one owner of "a data path is a URI".

Local paths stay `pathlib` paths and behave exactly as before. Object stores are reached through
`pyarrow.fs` with each store's standard credentials: for S3 the AWS environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `~/.aws/credentials`) and endpoint and region
(`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's `endpoint_url`, `AWS_REGION`,
`AWS_DEFAULT_REGION`). Credentials never come from params or URIs, and `scrub` removes them from every
message this module raises.

Publishing on an object store. S3 has no rename, and a pyarrow upload that fails half-way is still
completed under its name (closing the stream commits it). So:
- one object (`atomic_output`, `write_bytes_atomic`): written under a hidden temporary key beside its
  final name (`.<name>.<random>.tmp`), then moved (server-side copy + delete) to the final key; a failed
  write deletes the temporary key. Readers never see a partial object under a final name.
- a folder of files and its manifest (`published_folder`): the files go under a fresh generation
  prefix (`<folder>/<generation>/<name>`), the manifest (`<folder>/<manifest>`) is written last and lists
  them relative to the folder, then every other object under the folder (the previous generation, the
  leftovers of failed runs) is deleted. Readers trust only what the manifest lists, so they see the
  previous complete version or the new one, never a mix; a failed run leaves the previous one published.
  A reader still reading a version that a newer one replaced finds its files gone (FileNotFoundError):
  it reads the manifest again (locally the same holds: the folder is swapped whole).
- reading (`read_bytes`): pyarrow reads an object by its size, then a ranged GET; an object replaced in
  between is read again, so a manifest is always read whole.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.io import OUTPUT_MARKER, atomic_dir, atomic_path, file_digest, json_document, output_folder
from psp_core.errors import InputError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
"""Seconds to wait for a TCP connection to an object store before an attempt fails."""
CHECK_TIMEOUT_S = 4.0
"""Seconds `check_access` waits for a connection and for an answer (one attempt, no retries): a dead
endpoint fails in seconds."""
READ_ATTEMPTS = 5
"""Tries of `read_bytes` on an object replaced while it is read."""
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
"""Environment variables whose values never appear in a message."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SIGNED_QUERY = re.compile(r"(?i)\b(X-Amz-(?:Credential|Signature|Security-Token)|Signature|AWSAccessKeyId)=[^&\s]+")
_REGISTRY = re.compile(r"^(models|runs):/")


def is_uri(path: str | Path | Location) -> bool:
    """Whether `path` names something in an object store (`scheme://...`) rather than a local path.

    `file://` URIs and `pathlib` paths count as local paths.
    """
    if isinstance(path, Location):
        return not path.is_local
    if isinstance(path, Path):
        return False
    match = _SCHEME.match(path)
    return match is not None and match.group(1).lower() != "file"


def scrub(text: str) -> str:
    """`text` without credentials: values of the AWS secret variables, userinfo in URLs, signed-URL queries."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SIGNED_QUERY.sub(lambda m: f"{m.group(1)}=***", text)


@dataclass(frozen=True)
class Location:
    """A file or folder: a local path, or a URI in an object store; joined (`/`) and shown the same way.

    `uri` is the URI without a trailing slash (`s3://bucket/key`), or the local path as given.
    """

    uri: str
    local: Path | None

    @classmethod
    def of(cls, path: str | Path | Location) -> Location:
        """The location `path` names; a URI carrying credentials or options is refused (they come from the
        store's standard environment, never from a setting)."""
        if isinstance(path, Location):
            return path
        if not is_uri(path):
            text = str(path)
            return cls(uri=text, local=Path(text[len("file://"):] if text.startswith("file://") else text))
        parts = urlsplit(path)
        if "@" in parts.netloc or parts.query or parts.fragment:
            raise InputError(f"{scrub(path)}: credentials and options do not go in a URI; set them in the store's "
                             "standard environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                             "AWS_ENDPOINT_URL, AWS_REGION)")
        if not parts.netloc:
            raise InputError(f"{path}: a URI names its bucket: {parts.scheme}://BUCKET/KEY")
        return cls(uri=path.rstrip("/"), local=None)

    @property
    def is_local(self) -> bool:
        """Whether this is a local path."""
        return self.local is not None

    @property
    def path(self) -> Path:
        """The local path (only for a local location)."""
        if self.local is None:
            raise ValueError(f"{self} is not a local path")
        return self.local

    @property
    def scheme(self) -> str:
        """The URI scheme (`s3`, `gs`, ...); `file` for a local path."""
        return "file" if self.local is not None else urlsplit(self.uri).scheme.lower()

    @property
    def name(self) -> str:
        """The last component (file or folder name)."""
        return self.local.name if self.local is not None else self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The folder holding this location."""
        if self.local is not None:
            return Location(uri=str(self.local.parent), local=self.local.parent)
        if "/" not in self.uri.split("://", 1)[1]:
            raise ValueError(f"{self} is a bucket: it has no parent")
        return Location(uri=self.uri.rsplit("/", 1)[0], local=None)

    def __truediv__(self, name: str) -> Location:
        if self.local is not None:
            return Location(uri=str(self.local / name), local=self.local / name)
        return Location(uri=f"{self.uri}/{name.strip('/')}", local=None)

    def __str__(self) -> str:
        return self.uri

    def filesystem(self, fail_fast: bool = False) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path in it (`bucket/key` for S3), for pyarrow, Parquet and Ray Data
        (`filesystem=`). `fail_fast`: one attempt and short timeouts, for access checks."""
        if self.local is not None:
            return pafs.LocalFileSystem(), str(self.local)
        if self.scheme in ("s3", "s3a"):
            return s3_filesystem(fail_fast), self.uri.split("://", 1)[1]
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except (pafs.ArrowInvalid, pafs.ArrowNotImplementedError):
            return _fsspec_filesystem(self.uri)


def _fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem pyarrow lacks, through fsspec (wrapped for pyarrow)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise InputError(f"{uri}: no filesystem for this scheme ({scrub(str(err))})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


_S3_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", *SECRET_ENV_VARS)
"""The environment an S3 client is built from: a change of any of them builds a new one."""


def s3_filesystem(fail_fast: bool = False) -> pafs.S3FileSystem:
    """pyarrow's S3 client configured from the standard AWS environment (one per configuration: building
    one takes tens of milliseconds).

    The endpoint (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then the profile's `endpoint_url`, which
    pyarrow does not read itself) and the region (AWS_REGION, then AWS_DEFAULT_REGION) are passed
    explicitly; credentials are left to the AWS SDK's own chain (environment, profile, instance role).
    """
    return _s3_filesystem(fail_fast, tuple(os.environ.get(name) for name in _S3_ENV_VARS))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(fail_fast: bool, environment: tuple[str | None, ...]) -> pafs.S3FileSystem:
    """Build the client from the current environment; `environment` (its values) is the cache key only."""
    options: dict[str, Any] = {"connect_timeout": CHECK_TIMEOUT_S if fail_fast else CONNECT_TIMEOUT_S}
    endpoint = _s3_endpoint()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        options["scheme"] = parts.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"
    if fail_fast:
        options["request_timeout"] = CHECK_TIMEOUT_S
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    return pafs.S3FileSystem(**options)


def _s3_endpoint() -> str | None:
    """The S3 endpoint URL the environment names, if any (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or _profile_endpoint()


def _profile_endpoint() -> str | None:
    """The `endpoint_url` of the active AWS profile (`[profile NAME]` or its `s3` sub-section), if any."""
    from botocore.session import Session

    try:
        config = Session().get_scoped_config()
    except Exception:  # a broken or missing profile: the SDK reports it on first use
        return None
    nested = config.get("s3")
    return (nested.get("endpoint_url") if isinstance(nested, dict) else None) or config.get("endpoint_url")


def reader_filesystem(path: str | Path | Location) -> tuple[pafs.FileSystem | None, str]:
    """What `psp_core.shards`' readers take for `path`: (None, the local path) for a local path, or (the
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
        return _s3_endpoint() or "of AWS S3"
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
    harm (the one ranged GET returns one version whole)."""
    for _ in range(READ_ATTEMPTS):
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
    """Hex SHA-256 of a file's bytes, read in chunks (a local file by `pipelines.io.file_digest`)."""
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
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
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
    """Write a JSON document (`pipelines.io.json_document`) to a local path or a URI atomically."""
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
    """`path` as `stage`'s output folder for the block, by the rules of `pipelines.io.output_folder` (a new
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


def cache_root() -> Path:
    """The local cache of fetched weights: $XDG_CACHE_HOME/psp (default ~/.cache/psp)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psp"


def cached_weights(path: str | Path, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local path for a weights file: a local path as it is; a URI (`s3://...`, any store pyarrow or
    fsspec resolves) or an MLflow `runs:/` / `models:/` URI fetched once into a local cache, where a file
    is kept under its sha256 (a logged model, a folder, under its source).

    Processes on one node share the cache: a file lock per source lets one fetch while the others wait
    and reuse. A cached file is re-hashed on every use (a damaged copy is fetched again) and reused only
    while its source is unchanged (same size and modification time; MLflow run artifacts and numbered
    model versions never change; an alias is resolved to its version first). `sha256`, if given, is
    what the file must hash to (else InputError).
    """
    text = str(path)
    cache = cache_dir or cache_root()
    if _REGISTRY.match(text):
        fetched = _cached_registry_artifact(text, cache)
    else:
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

    return _cached(location.uri, {"size": info.size, "mtime_ns": info.mtime_ns}, fetch, cache)


def _cached_registry_artifact(uri: str, cache: Path) -> Path:
    """Fetch an MLflow `runs:/` or `models:/` artifact into the cache (see `cached_weights`)."""
    import mlflow.artifacts

    immutable = _immutable_registry_uri(uri)

    def fetch(staging: Path) -> Path:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=immutable, dst_path=str(staging)))

    return _cached(immutable, {}, fetch, cache)


def _immutable_registry_uri(uri: str) -> str:
    """`models:/NAME@ALIAS[/path]` as `models:/NAME/VERSION[/path]` (what the alias points at now); other
    MLflow URIs as they are."""
    match = re.match(r"^models:/([^/@]+)@([^/]+)(/.*)?$", uri)
    if not match:
        return uri
    from mlflow import MlflowClient

    name, alias, rest = match.group(1), match.group(2), match.group(3) or ""
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except Exception as err:  # MlflowException: a missing model or alias
        raise InputError(f"{uri}: {scrub(str(err).splitlines()[0])}") from None
    return f"models:/{name}/{version}{rest}"


def _cached(source: str, fingerprint: dict, fetch: Callable[[Path], Path], cache: Path) -> Path:
    """The cached copy of `source`: reused if its record matches `fingerprint` and it verifies, else
    fetched with `fetch(staging_folder)` (which returns the file or folder it wrote there) and stored.
    One process at a time per source (file lock)."""
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
