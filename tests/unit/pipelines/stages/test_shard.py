"""Parquet shards: lossless round trip, stable split, duplicates, paired sources, corrupt data."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.stages.align import write_index
from pipelines.stages.shard import ShardConfig, write_shards
from psp_core.data.shards import (
    SHARD_SCHEMA,
    ShardError,
    assign_split,
    content_id,
    decode_images,
    iter_shard_batches,
    read_manifest,
    shard_paths,
)
from psp_core.data.tensors import images_to_tensor


def noise_png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def make_folder(folder: Path, seeds: range) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"img{seed:03d}.png": noise_png(seed) for seed in seeds}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def config(tmp_path: Path, input_dir: Path, **overrides) -> ShardConfig:
    values = dict(input_dir=str(input_dir), output_dir=str(tmp_path / "shards"), report=str(tmp_path / "shard.json"),
                  rows_per_shard=7, row_group_size=3, test_fraction=0.3)
    return ShardConfig(**{**values, **overrides})


def read_all(shard_dir: Path, **options) -> dict[str, tuple]:
    rows = {}
    for batch in iter_shard_batches(shard_paths(shard_dir, verify=True), batch_size=4, **options):
        assert len(batch) <= 4 and batch.images.dtype == np.uint8
        for i, image_id in enumerate(batch.ids):
            rows[image_id] = (batch.images[i], batch.splits[i], batch.source_paths[i],
                              None if batch.landmarks is None else batch.landmarks[i])
    return rows


def test_round_trip_is_lossless_and_bytes_are_stored_as_is(tmp_path):
    files = make_folder(tmp_path / "aligned", range(20))
    report = write_shards(config(tmp_path, tmp_path / "aligned"))
    manifest = read_manifest(tmp_path / "shards")
    assert manifest.rows["total"] == 20 == report["rows"]["train"] + report["rows"]["test"]
    assert [s["rows"] for s in manifest.shards] == [7, 7, 6]
    shard = pq.ParquetFile(tmp_path / "shards" / "shard-00000.parquet")
    assert shard.schema_arrow.remove_metadata() == SHARD_SCHEMA.remove_metadata()
    assert shard.metadata.num_row_groups == 3  # 7 rows in groups of 3

    stored = {row["source_path"]: row["image"] for p in shard_paths(tmp_path / "shards")
              for row in pq.read_table(p, columns=["source_path", "image"]).to_pylist()}
    assert stored == files  # PNG bytes unchanged (no recompression)

    rows = read_all(tmp_path / "shards")
    assert len(rows) == 20
    for name, data in files.items():
        image, split, source_path, landmarks = rows[content_id(data)]
        np.testing.assert_array_equal(image, pixels_of(data))
        assert source_path == name and split == assign_split(name, 0.3) and landmarks is None


def test_split_filter_and_stability_when_rows_are_added(tmp_path):
    make_folder(tmp_path / "aligned", range(30))
    write_shards(config(tmp_path, tmp_path / "aligned"))
    before = {image_id: row[1] for image_id, row in read_all(tmp_path / "shards").items()}
    test_only = read_all(tmp_path / "shards", split="test")
    assert set(test_only) == {i for i, s in before.items() if s == "test"} and 0 < len(test_only) < 30

    make_folder(tmp_path / "aligned", range(30, 60))
    write_shards(config(tmp_path, tmp_path / "aligned"))
    after = {image_id: row[1] for image_id, row in read_all(tmp_path / "shards").items()}
    assert len(after) == 60 and all(after[i] == s for i, s in before.items())
    assert 0.15 < sum(s == "test" for s in after.values()) / 60 < 0.45


def test_duplicates_dropped_and_bad_files_reported(tmp_path):
    files = make_folder(tmp_path / "aligned", range(5))
    (tmp_path / "aligned" / "copy_of_img001.png").write_bytes(files["img001.png"])
    (tmp_path / "aligned" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = write_shards(config(tmp_path, tmp_path / "aligned"))
    manifest = read_manifest(tmp_path / "shards")
    assert report["rows"]["total"] == 5
    assert report["duplicates_dropped"] == 1 and manifest.document["duplicates"] == [
        {"file": "img001.png", "source_path": "img001.png", "same_as": "copy_of_img001.png"}]
    assert report["rejected"] == 1 and manifest.document["rejects"][0]["file"] == "broken.png"


def test_jpeg_setting_reencodes_and_keeps_jpegs(tmp_path):
    folder = tmp_path / "aligned"
    make_folder(folder, range(3))
    smooth = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    smooth.save(folder / "already.jpg", quality=90)
    write_shards(config(tmp_path, folder, image_format="jpeg", jpeg_quality=95))
    stored = {row["source_path"]: row["image"] for p in shard_paths(tmp_path / "shards")
              for row in pq.read_table(p, columns=["source_path", "image"]).to_pylist()}
    assert all(data.startswith(b"\xff\xd8\xff") for data in stored.values())
    assert stored["already.jpg"] == (folder / "already.jpg").read_bytes()


def test_landmarks_from_align_index_and_paired_sources(tmp_path):
    folder, sources = tmp_path / "aligned", tmp_path / "sketches"
    files = make_folder(folder, range(4))
    make_folder(sources, range(100, 104))
    for seed, name in zip(range(100, 104), sorted(files)):  # pair by stem: photoN.jpg <-> photoN.png
        (sources / f"img{seed:03d}.png").rename(sources / f"photo{name[3:6]}.png")
    landmarks = {name: np.random.default_rng(i).random((68, 2)).astype(np.float32) * 32 for i, name in enumerate(files)}
    records = [{"source": f"photo{name[3:6]}.jpg", "rejects": [], "faces": [
        {"file": name, "face": 0, "score": 1.0, "width": 32, "height": 32, "landmarks": landmarks[name].tolist()}]}
        for name in sorted(files)]
    write_index(folder / "index.parquet", records)
    write_shards(config(tmp_path, folder, source_dir=str(sources)))

    batches = list(iter_shard_batches(shard_paths(tmp_path / "shards"), batch_size=10))
    assert len(batches) == 1 and batches[0].source_images.shape == (4, 32, 32, 3)
    batch = batches[0]
    for i, source_path in enumerate(batch.source_paths):
        name = f"img{source_path[5:8]}.png"
        np.testing.assert_array_equal(batch.landmarks[i], landmarks[name])
        np.testing.assert_array_equal(batch.source_images[i], pixels_of((sources / f"{Path(source_path).stem}.png").read_bytes()))

    (sources / "photo001.png").unlink()
    report = write_shards(config(tmp_path, folder, source_dir=str(sources)))
    rejects = read_manifest(tmp_path / "shards").document["rejects"]
    assert report["rows"]["total"] == 3 and "no paired source" in rejects[0]["reason"]


def test_corrupt_row_and_corrupt_file_raise_shard_error_naming_them(tmp_path):
    rows = [{"id": content_id(noise_png(i)), "image": noise_png(i), "width": 32, "height": 32, "source_path": f"{i}.png",
             "landmarks": None, "split": "train", "source_image": None} for i in range(5)]
    rows[3]["image"] = b"\x89PNG\r\n\x1a\n not really"
    path = tmp_path / "shard-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path, row_group_size=2)
    with pytest.raises(ShardError, match=r"shard-00000\.parquet: row 3: image cannot be decoded"):
        list(iter_shard_batches([path], batch_size=2))

    bogus = tmp_path / "bogus.parquet"
    bogus.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(ShardError, match="bogus.parquet: not a readable Parquet shard"):
        list(iter_shard_batches([bogus], batch_size=2))

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ShardError, match="missing columns"):
        list(iter_shard_batches([foreign], batch_size=2))


def test_manifest_checks_catch_a_changed_shard(tmp_path):
    make_folder(tmp_path / "aligned", range(3))
    write_shards(config(tmp_path, tmp_path / "aligned"))
    shard = tmp_path / "shards" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        shard_paths(tmp_path / "shards", verify=True)
    with pytest.raises(ShardError, match="not found"):
        read_manifest(tmp_path / "nowhere")


def ramp_png(size: int) -> bytes:
    """A smooth image: red rises left to right, green top to bottom, blue constant."""
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([x * 240, y * 240, np.full_like(x, 90)], -1).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_images_and_tensor_range():
    batch = decode_images([noise_png(1, 32), noise_png(2, 48)], size=16)
    assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.uint8
    # the resize scales the whole picture: a 48 px ramp becomes the ramp sampled at the 16 px pixel centres
    ramp = decode_images([ramp_png(48), ramp_png(16)], size=16)
    centres = (np.arange(16) + 0.5) * 3 - 0.5          # 16 px pixel centres in 48 px coordinates
    expected_red = np.broadcast_to(centres / 48 * 240, (16, 16))
    assert np.abs(ramp[0, ..., 0] - expected_red).max() <= 1.5
    assert np.abs(ramp[0, ..., 1] - expected_red.T).max() <= 1.5
    assert np.all(ramp[0, ..., 2] == 90)
    np.testing.assert_array_equal(ramp[1], pixels_of(ramp_png(16)))   # already at size: untouched
    with pytest.raises(ShardError, match="different sizes"):
        decode_images([noise_png(1, 32), noise_png(2, 48)])
    with pytest.raises(ShardError, match="image 1 of the batch"):
        decode_images([noise_png(1), b"junk"])
    tensor = images_to_tensor(np.array([[[[0, 255, 127]]]], dtype=np.uint8))
    assert tensor.shape == (1, 3, 1, 1) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    make_folder(tmp_path / "aligned", range(2))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        write_shards(config(tmp_path, tmp_path / "aligned"))
    assert (tmp_path / "shards" / "precious.txt").read_text() == "keep me"
