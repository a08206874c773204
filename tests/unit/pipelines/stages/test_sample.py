"""The embedded sample: deterministic, made of real photos, every awkward case present and handled."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.stages.align import AlignConfig, align_folder
from pipelines.stages.sample import MANIFEST_FILE, Augmentation, SampleConfig, build_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sample") / "raw"
    build_sample(SampleConfig(output_dir=str(folder), augmented_copies=2, lfw_faces=3))
    return folder


def test_sample_is_deterministic_and_listed(sample, tmp_path):
    again = tmp_path / "raw"
    build_sample(SampleConfig(output_dir=str(again), augmented_copies=2, lfw_faces=3))
    names = sorted(p.relative_to(sample).as_posix() for p in sample.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert all((sample / n).read_bytes() == (again / n).read_bytes() for n in names)
    manifest = json.loads((sample / MANIFEST_FILE).read_text())
    assert sorted(e["file"] for e in manifest["files"]) == sorted(n for n in names if n != MANIFEST_FILE)
    assert len(names) - 1 == 2 * 3 + 3 + 12  # 2 photos x (original + 2 copies), 3 LFW faces, 12 awkward files


def test_awkward_cases_are_what_they_claim(sample):
    assert Image.open(sample / "astronaut" / "alpha_astronaut.png").mode == "RGBA"
    assert Image.open(sample / "grace_hopper" / "palette_grace_hopper.png").mode == "P"
    assert Image.open(sample / "astronaut" / "cmyk_astronaut.jpg").mode == "CMYK"
    assert Image.open(sample / "astronaut" / "gray16_astronaut.png").mode.startswith("I")
    assert Image.open(sample / "grace_hopper" / "grayscale_grace_hopper.jpg").mode == "L"
    assert Image.open(sample / "grace_hopper" / "exif_rotated_grace_hopper.jpg").getexif()[0x0112] == 6
    with pytest.raises(OSError):
        Image.open(sample / "grace_hopper" / "truncated_grace_hopper.jpg").load()
    assert Image.open(sample / "grace_hopper" / "two_faces.jpg").size == (1024, 600)


def test_one_folder_per_identity(sample):
    """Every variant of a base photo sits in that photo's folder, each LFW person in a folder of their own."""
    manifest = json.loads((sample / MANIFEST_FILE).read_text())["files"]
    for entry in manifest:
        folder = entry["file"].rpartition("/")[0]
        if entry["file"].endswith("two_faces.jpg"):   # faces=largest keeps Grace Hopper's face
            assert folder == "grace_hopper"
        elif entry["made"].startswith(("astronaut", "grace_hopper")):
            assert folder == entry["made"].split()[0], entry
        elif entry["made"].startswith("lfw_subset"):
            assert folder.startswith("lfw/lfw_") and sum(e["file"].startswith(folder + "/") for e in manifest) == 1
        elif entry["expect"] == "face":
            assert folder in ("astronaut", "grace_hopper"), entry


def test_default_sample_size_is_small():
    cfg = SampleConfig()
    assert 40 <= 2 * (cfg.augmented_copies + 1) + cfg.lfw_faces + 12 <= 60


def test_augmentation_matrix_moves_points_as_the_image():
    change = Augmentation(angle=10, scale=0.8, shift=(0.1, -0.05))
    ys, xs = np.mgrid[:100, :200]
    blob = np.exp(-((xs - 60.0) ** 2 + (ys - 30.0) ** 2) / 18.0) * 255
    image = Image.fromarray(np.repeat(blob.astype(np.uint8)[..., None], 3, axis=2))
    moved = np.asarray(change.apply(image).convert("L"), float)
    ys, xs = np.nonzero(moved > 140)  # the uncovered canvas is 118 grey
    weights = moved[ys, xs] - 140
    expected = change.forward_matrix((200, 100)) @ [60.5, 30.5, 1]  # pixel centres at +0.5
    centre = [(xs * weights).sum() / weights.sum() + 0.5, (ys * weights).sum() / weights.sum() + 0.5]
    np.testing.assert_allclose(centre, expected[:2], atol=0.3)


def test_alignment_meets_every_expectation_in_the_manifest(sample, tmp_path):
    out = tmp_path / "aligned"
    align_folder(AlignConfig(input_dir=str(sample), output_dir=str(out), report=str(tmp_path / "align.json"),
                             output_size=64, workers=1))
    aligned = {row["source_path"] for row in pq.read_table(out / "index.parquet").to_pylist()}
    with open(out / "rejects.csv", newline="") as handle:
        rejects = [(row["path"], row["reason"]) for row in csv.DictReader(handle)]
    for entry in json.loads((sample / MANIFEST_FILE).read_text())["files"]:
        if entry["expect"] == "face":
            assert entry["file"] in aligned, entry
            extra = entry.get("faces", 1) - 1
            assert sum(1 for path, reason in rejects if path == entry["file"] and reason == "extra_face") == extra
        else:
            assert entry["file"] not in aligned and (entry["file"], entry["expect"]) in rejects, entry
