"""Ray Train checkpoints written whole and read back whole.

Ray's own upload copies a checkpoint folder file by file under the final names, so a stage stopped
mid-copy (SIGTERM while a 1.7 GB `last.pt` is copied) leaves a partial file under a final name. Here every
file goes to a temporary name beside its final one (`pipelines.services.storage.temporary_prefix`) and is
moved there once whole (`persist_whole`, Ray's `checkpoint_upload_fn`); a stopped upload leaves only
temporary files, which the next run removes. On one filesystem a file is hard-linked rather than copied
(`link_or_copy`). Resuming walks the run's checkpoints newest first (`resume_candidates`), so a checkpoint that does
not read whole is passed over for the one before it.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import ray.train

from pipelines.services import storage

CHECKPOINT_PREFIX = "checkpoint_"   # Ray Train's checkpoint folder names: this, then a sortable timestamp


def upload_whole(source_fs: pafs.FileSystem, source: str, fs: pafs.FileSystem, destination: str) -> None:
    """Copy (or hard-link, `link_or_copy`) the files of folder `source` into folder `destination`, each under a
    temporary name first and moved to its own once complete: a reader never finds a partial file under a final
    name. An object store needs no detour: an object appears only once its upload completes, and its "move" is a
    server-side copy (a second full write that S3-compatible stores may fail on large multipart objects)."""
    fs.create_dir(destination, recursive=True)
    atomic_writes = not isinstance(fs, pafs.LocalFileSystem)
    for info in source_fs.get_file_info(pafs.FileSelector(source, recursive=False)):
        if info.type != pafs.FileType.File:
            continue
        if atomic_writes:
            pafs.copy_files(info.path, f"{destination}/{info.base_name}", source_filesystem=source_fs,
                            destination_filesystem=fs)
            continue
        tmp = f"{destination}/{storage.temporary_prefix(info.base_name)}{uuid.uuid4().hex[:12]}.tmp"
        try:
            if isinstance(source_fs, pafs.LocalFileSystem):
                link_or_copy(info.path, tmp)
            else:
                pafs.copy_files(info.path, tmp, source_filesystem=source_fs, destination_filesystem=fs)
            fs.move(tmp, f"{destination}/{info.base_name}")
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise


def persist_whole(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
    """Ray Train's `checkpoint_upload_fn`: the checkpoint folder into the run's storage as `dir_name`, file by
    file through `upload_whole`."""
    context = ray.train.get_context().get_storage()
    destination = context.build_checkpoint_path_from_name(dir_name)
    upload_whole(checkpoint.filesystem, checkpoint.path, context.storage_filesystem, destination)
    return ray.train.Checkpoint(path=destination, filesystem=context.storage_filesystem)


def earlier_checkpoints(fs: pafs.FileSystem, run_path: str, latest: str | None) -> list[str]:
    """The checkpoint folders in a run's storage other than `latest`, newest first (their names sort by time)."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, recursive=False, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    latest_name = None if latest is None else latest.rstrip("/").rpartition("/")[2]
    return [f"{run_path}/{name}" for name in names if name != latest_name]


def resume_candidates() -> list[ray.train.Checkpoint]:
    """The checkpoints a worker may resume from, best first: the latest Ray reported, then the run's earlier
    ones still in storage (a latest one that does not read whole falls back to them); [] for a fresh run."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return []
    context = ray.train.get_context().get_storage()
    fs = context.storage_filesystem
    earlier = earlier_checkpoints(fs, context.experiment_fs_path, latest.path)
    return [latest, *(ray.train.Checkpoint(path=path, filesystem=fs) for path in earlier)]


def remove_stopped_uploads() -> int:
    """Delete the temporary files an upload stopped mid-way left in the run's local storage (their names carry
    the storage package's token: never anything else). Returns how many went."""
    context = ray.train.get_context().get_storage()
    if not isinstance(context.storage_filesystem, pafs.LocalFileSystem):
        return 0
    return storage.remove_own_temporaries(Path(context.experiment_fs_path), recursive=True)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Give the new name `target` the bytes of local file `source`: a hard link where both are on one filesystem
    (nothing written: a 1.4 GB checkpoint reaches Ray's local storage with no copy), else a copy. A link is safe
    because no checkpoint file changes in place: every save writes a new file and renames it over the old one."""
    try:
        os.link(source, target)
    except OSError:   # another filesystem, or one without hard links
        shutil.copyfile(source, target)


def copy_whole(source: Path, target: Path) -> None:
    """Give `target` the bytes of local file `source` (`link_or_copy`) under a temporary name, renamed once whole."""
    with storage.atomic_path(target) as tmp:
        tmp.unlink()
        link_or_copy(source, tmp)
