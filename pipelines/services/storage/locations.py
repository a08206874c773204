"""Where data lives and what kind of reference a setting holds: a local path, a URI of an object store
(`s3://bucket/key`, and whatever pyarrow's or fsspec's filesystems resolve), or an MLflow registry
reference (`models:/`, `runs:/`). The one owner of that decision (`reference_kind`) and of `Location`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipelines.services.storage.credentials import scrub
from pipelines.services.storage.s3 import fsspec_filesystem, s3_filesystem
from psp_core.errors import InputError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_REGISTRY = re.compile(r"^(models|runs):/")

ReferenceKind = Literal["local", "uri", "registry"]


def reference_kind(reference: str | Path) -> ReferenceKind:
    """What a path-like setting names: an MLflow registry artifact (`models:/...`, `runs:/...`), an
    object-store URI (`scheme://...` other than `file://`), or a local path (`pathlib` paths always)."""
    if isinstance(reference, Path):
        return "local"
    if _REGISTRY.match(reference):
        return "registry"
    match = _SCHEME.match(reference)
    return "uri" if match is not None and match.group(1).lower() != "file" else "local"


def is_registry_reference(reference: str | Path) -> bool:
    """Whether a setting names an MLflow registry artifact (`models:/`, `runs:/`)."""
    return reference_kind(reference) == "registry"


def is_remote(reference: str | Path) -> bool:
    """Whether a setting names something not on this machine's disk: an object-store URI or a registry artifact."""
    return reference_kind(reference) != "local"


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
            return fsspec_filesystem(self.uri)
