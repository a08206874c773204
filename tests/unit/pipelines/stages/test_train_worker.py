"""`psp train`'s checkpoints between the engine and Ray's storage, without Ray running: uploaded whole, resumed
only from a file that reads whole (the real Ray runs: tests/e2e/test_train_ray.py)."""
from __future__ import annotations

import copy
import errno
import logging
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.train
import torch

from helpers.pipelines import noisy_psp, smooth_images
from pipelines.services.ray import checkpoints
from pipelines.services.ray.checkpoints import copy_whole, earlier_checkpoints, upload_whole
from pipelines.stages.train_worker import resume_latest_whole
from psp_core import PSPArchitecture
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.nets.checkpoint_io import atomic_torch_save
from psp_core.training.engine import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, TrainingConfig
from psp_core.training.losses import LossWeights, PSPLoss


@pytest.fixture(scope="module")
def tiny_model():
    return noisy_psp(PSPArchitecture(output_size=16, encoder_input_size=32))


def trainer_for(model, steps: int, checkpoint_dir=None) -> Trainer:
    config = TrainingConfig(max_steps=steps, learning_rate=1e-3, save_interval=steps, val_interval=steps,
                            image_interval=100, log_interval=100)
    return Trainer(copy.deepcopy(model), PSPLoss(LossWeights(l2_lambda=1.0, lpips_lambda=0.0)), config,
                   checkpoint_dir=checkpoint_dir, batch_transform=PresetTransform(get_preset("encode"), encoder_size=32))


def test_a_truncated_last_checkpoint_is_not_resumed_from_the_one_before_it_is(tiny_model, tmp_path, caplog):
    """The run's storage holds an older whole checkpoint (step 2) and a newer one whose last.pt was cut short by a
    stop mid-copy: the worker resumes at step 2, and with only the cut one it starts afresh."""
    images = smooth_images(2, seed=1)
    trainer_for(tiny_model, 2, tmp_path / "train").fit(lambda epoch: [(images, images)])
    whole = (tmp_path / "train" / LAST_CHECKPOINT).read_bytes()
    older = tmp_path / "run" / "checkpoint_2026-01-01_00-00-01.000000"
    newer = tmp_path / "run" / "checkpoint_2026-01-01_00-00-02.000000"
    older.mkdir(parents=True)
    newer.mkdir()
    (older / LAST_CHECKPOINT).write_bytes(whole)
    (newer / LAST_CHECKPOINT).write_bytes(whole[: len(whole) * 2 // 3])   # a partial copy under the final name
    (newer / BEST_CHECKPOINT).write_bytes(whole)
    local = tmp_path / "local"
    local.mkdir()
    fs = pafs.LocalFileSystem()
    candidates = [ray.train.Checkpoint(str(newer))] + [
        ray.train.Checkpoint(path) for path in earlier_checkpoints(fs, str(tmp_path / "run"), str(newer))]
    assert [c.path for c in candidates] == [str(newer), str(older)]

    resumed = trainer_for(tiny_model, 4)
    with caplog.at_level(logging.WARNING):
        chosen = resume_latest_whole(resumed, candidates, local)
    assert chosen is candidates[1] and resumed.step == 2
    assert (local / LAST_CHECKPOINT).read_bytes() == whole and not (local / BEST_CHECKPOINT).exists()
    assert any("not resuming from" in r.message and "truncated" in r.message for r in caplog.records)

    fresh = trainer_for(tiny_model, 4)
    assert resume_latest_whole(fresh, candidates[:1], local) is None and fresh.step == 0
    assert not (local / LAST_CHECKPOINT).exists()


def test_a_checkpoint_upload_stopped_mid_file_leaves_no_file_under_its_final_name(tmp_path, monkeypatch):
    """Storage on another filesystem than the checkpoint (no hard link): the copy is stopped part-way."""
    source = tmp_path / "report"
    source.mkdir()
    (source / LAST_CHECKPOINT).write_bytes(b"x" * 4096)
    (source / BEST_CHECKPOINT).write_bytes(b"y" * 4096)
    fs, target = pafs.LocalFileSystem(), str(tmp_path / "storage" / "checkpoint_1")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def stopped(src, dst):
        """The copy writes part of the file, then the stage is stopped."""
        with open(dst, "wb") as out:
            out.write(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.os, "link", cross_device)
    monkeypatch.setattr(checkpoints.shutil, "copyfile", stopped)
    with pytest.raises(KeyboardInterrupt):
        upload_whole(fs, str(source), fs, target)
    assert sorted(p.name for p in (tmp_path / "storage" / "checkpoint_1").iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(checkpoints.os, "link", cross_device)
    upload_whole(fs, str(source), fs, target)
    uploaded = tmp_path / "storage" / "checkpoint_1"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted([BEST_CHECKPOINT, LAST_CHECKPOINT])
    assert (uploaded / LAST_CHECKPOINT).read_bytes() == b"x" * 4096
    assert (uploaded / LAST_CHECKPOINT).stat().st_ino != (source / LAST_CHECKPOINT).stat().st_ino   # copied


def test_on_one_filesystem_a_checkpoint_is_linked_and_the_next_save_leaves_the_stored_one_as_it_was(tmp_path):
    """Report folder and Ray's local storage: no byte copied (one inode); the engine's next save (a new file renamed
    over the old) does not change the stored checkpoint."""
    local, report = tmp_path / "local", tmp_path / "report"
    atomic_torch_save({"step": 2}, local / LAST_CHECKPOINT)
    copy_whole(local / LAST_CHECKPOINT, report / LAST_CHECKPOINT)
    fs, target = pafs.LocalFileSystem(), str(tmp_path / "storage" / "checkpoint_1")
    upload_whole(fs, str(report), fs, target)
    stored = Path(target) / LAST_CHECKPOINT
    assert stored.stat().st_ino == (report / LAST_CHECKPOINT).stat().st_ino == (local / LAST_CHECKPOINT).stat().st_ino
    assert sorted(p.name for p in Path(target).iterdir()) == [LAST_CHECKPOINT]   # no temporary name left
    atomic_torch_save({"step": 4}, local / LAST_CHECKPOINT)
    assert torch.load(stored, weights_only=True) == {"step": 2}
    assert torch.load(local / LAST_CHECKPOINT, weights_only=True) == {"step": 4}
