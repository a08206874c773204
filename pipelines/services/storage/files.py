"""Files in and out: atomic writes (temporary name in the same folder, then rename), output folders
a stage owns, and the listing of an input folder that accounts for every entry.

A stage killed half-way never leaves a partial file (or folder) under the final name, and never
writes into (or deletes from) a folder of someone else's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from psp_core.data.shards import IMAGE_EXTENSIONS
from psp_core.errors import InputError

OUTPUT_MARKER = ".psp-output.json"
"""Written first into every output folder a stage creates: whose folder it is."""

TEMPORARY_TOKEN = "psp-partial"
"""In the name of every temporary file and folder written through this package (`atomic_path`, `atomic_dir`,
`atomic_output`: `.<final name>.psp-partial-<random>.tmp`): what proves a leftover of a killed run is the stage's
own, so cleaning up never touches a user's `.x.tmp`."""
_OWN_TEMPORARY = re.compile(rf"^\..+\.{TEMPORARY_TOKEN}-[A-Za-z0-9_]+\.tmp$")
_OWN_TEMPORARY_GLOB = f".*.{TEMPORARY_TOKEN}-*.tmp"


def temporary_prefix(name: str) -> str:
    """The start of the temporary name under which `name` is written (the random part and `.tmp` follow)."""
    return f".{name}.{TEMPORARY_TOKEN}-"


def remove_own_temporaries(folder: Path, recursive: bool = False) -> int:
    """Delete the temporary files a killed run of a stage left in `folder` (below it too if `recursive`), and only
    those: names carrying TEMPORARY_TOKEN. Returns how many went."""
    removed = 0
    for path in folder.rglob(_OWN_TEMPORARY_GLOB) if recursive else folder.glob(_OWN_TEMPORARY_GLOB):
        if _OWN_TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed += 1
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def json_document(value: Any) -> bytes:
    """The bytes of every JSON file the stages write: indented, keys in insertion order, a final newline."""
    return (json.dumps(value, indent=2) + "\n").encode()


@contextmanager
def atomic_dir(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces the folder `path`.

    An existing non-empty `path` is only replaced if it holds `marker` (a file the stage writes),
    so a misconfigured path never deletes someone's folder.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise InputError(f"{path} exists and is not an output of this stage (no {marker}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_folder(path: str | Path, stage: str) -> Iterator[Path]:
    """Use `path` as `stage`'s output folder for the block: a new or empty folder is claimed (its marker
    written first), a folder holding the stage's marker is reused, and any other non-empty folder is
    refused: the stage never mixes its files with
    someone else's. A folder this call created is removed again if the block fails before
    anything but the marker was written in it.
    """
    path = Path(path)
    marker = path / OUTPUT_MARKER
    created = not path.exists()
    if path.exists() and not path.is_dir():
        raise InputError(f"{stage} output {path} is a file, not a folder")
    if not created and not marker.is_file():
        if any(path.iterdir()):
            raise InputError(f"{path} is not empty and is not an output folder of `psp {stage}` (no {OUTPUT_MARKER}); "
                             "refusing to write into it: choose a new or empty folder")
    elif marker.is_file():
        owner = _read_owner(marker)
        if owner != stage:
            raise InputError(f"{path} is the output folder of `psp {owner}`, not of `psp {stage}`; choose another folder")
    path.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        with atomic_path(marker) as tmp:
            tmp.write_bytes(json_document({"stage": stage}))
    try:
        yield path
    except BaseException:
        if created and {p.name for p in path.iterdir()} <= {OUTPUT_MARKER}:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _read_owner(marker: Path) -> str:
    try:
        return str(json.loads(marker.read_text())["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


@dataclass
class FolderListing:
    """Every entry under an input folder: image files to use, other regular files, and what was passed
    over with the reason (hidden, broken_link, symlinked_folder, not_regular_file, unreadable_folder)."""

    images: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        """Passed-over entries by reason."""
        return dict(sorted(Counter(reason for _, reason in self.skipped).items()))

    def reportable_skips(self) -> list[tuple[str, str]]:
        """The passed-over entries a user must see by name: image files and folders."""
        return [(rel, reason) for rel, reason in self.skipped
                if is_image_name(rel) or reason in ("symlinked_folder", "unreadable_folder")]


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_folder(folder: str | Path) -> FolderListing:
    """Walk `folder` (sorted, relative POSIX paths, names kept as the OS gives them) without opening a
    file: regular files and links to them are listed; hidden entries, broken links, links to
    folders (not followed: no cycles, no surprises), pipes, sockets and devices are passed over."""
    listing = FolderListing()
    _walk(str(folder), "", listing)
    return listing


def _walk(root: str, prefix: str, listing: FolderListing) -> None:
    try:
        entries = sorted(os.scandir(os.path.join(root, prefix) if prefix else root), key=lambda e: e.name)
    except OSError:
        listing.skipped.append((prefix.rstrip("/"), "unreadable_folder"))
        return
    for entry in entries:
        rel = prefix + entry.name
        if entry.name.startswith("."):
            listing.skipped.append((rel, "hidden"))
            continue
        try:
            if entry.is_symlink():
                try:
                    mode = os.stat(entry.path).st_mode
                except OSError:
                    listing.skipped.append((rel, "broken_link"))
                    continue
                if stat.S_ISDIR(mode):
                    listing.skipped.append((rel, "symlinked_folder"))
                    continue
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            listing.skipped.append((rel, "broken_link"))
            continue
        if stat.S_ISDIR(mode):
            _walk(root, rel + "/", listing)
        elif not stat.S_ISREG(mode):
            listing.skipped.append((rel, "not_regular_file"))
        else:
            (listing.images if is_image_name(rel) else listing.others).append(rel)


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of a regular file; a pipe, socket or device raises OSError at once instead of blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fsdecode(path)} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (SHA-256 unless `algorithm` names another hashlib one, e.g. DVC's md5),
    read in chunks (checkpoints are gigabytes)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask (temporary files get the permissions a plain open() would give)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
