"""Atomic file and directory output: write under a temporary name in the same folder, then rename.

A stage killed half-way never leaves a partial file (or folder) under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, value: Any) -> None:
    """Write a JSON document (indented, keys in insertion order) to `path` atomically."""
    write_bytes_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


@contextmanager
def atomic_dir(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces the folder `path`.

    An existing non-empty `path` is only replaced if it holds `marker` (a file the stage writes),
    so a misconfigured path never deletes someone's folder.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise ValueError(f"{path} exists and is not an output of this stage (no {marker}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
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


def _umask() -> int:
    """The process umask (temporary files get the permissions a plain open() would give)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
