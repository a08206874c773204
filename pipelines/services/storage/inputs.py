"""A stage's data input, resolved once and passed on: where it is (filesystem and path in it), and whether it
is a shard folder (then its manifest, read once) or a folder of images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.services.storage.locations import Location
from pipelines.services.storage.objects import reader_filesystem
from psp_core.data.shards import MANIFEST_FILE, ShardManifest, is_shard_folder, read_manifest, shard_paths


@dataclass(frozen=True)
class StageInput:
    """An input folder: `filesystem` None and a local `path`, or an object store's filesystem and the path in
    it (`bucket/key`); `manifest` when it is a shard folder, None for a folder of images."""

    location: Location
    filesystem: pafs.FileSystem | None
    path: str
    manifest: ShardManifest | None

    @classmethod
    def of(cls, folder: str | Path | Location) -> "StageInput":
        """Resolve `folder`: one look for a manifest, read when there is one."""
        location = Location.of(folder)
        filesystem, path = reader_filesystem(location)
        manifest = read_manifest(path, filesystem) if is_shard_folder(path, filesystem) else None
        return cls(location, filesystem, path, manifest)

    @property
    def is_shards(self) -> bool:
        """Whether this is a shard folder (it has a manifest)."""
        return self.manifest is not None

    def shards(self) -> ShardManifest:
        """The manifest, or a one-line error when this is no shard folder."""
        if self.manifest is None:
            raise FileNotFoundError(f"{self.location / MANIFEST_FILE} not found: run `psp shard` first")
        return self.manifest

    def shard_paths(self, verify: bool = False) -> list:
        """The shard files the manifest lists, checked (sizes; sha256 with `verify`)."""
        return shard_paths(self.path, verify=verify, filesystem=self.filesystem, manifest=self.shards())
