"""Paired sources (label maps, sketches) from shards to the encoder: one decoder in psp_core.data.shards feeds
evaluate, invert and training the same (source, target) pair for every input kind."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image

from helpers.pipelines import face_like_png
from pipelines.cli import main
from pipelines.params.schema import InvertConfig, ShardConfig
from pipelines.stages.invert_actor import Inverter, read_unit
from pipelines.stages.shard import write_shards
from psp_core import PSP, PSPArchitecture, save_psp
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.data.shards import (
    ShardError,
    iter_shard_batches,
    read_manifest,
    shard_paths,
)
from psp_core.data.tensors import batch_pair, pair_tensors

N_IMAGES = 6


def label_png(seed: int, size: int = 48) -> bytes:
    """A single-channel label map: blocks of class ids 0..18."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, 19, (size // 8, size // 8)), np.ones((8, 8))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(labels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory) -> Path:
    """Photos with their label maps (same stems), sharded with `source_dir`, half of them in test."""
    root = tmp_path_factory.mktemp("pairs")
    photos, labels = root / "aligned", root / "labels"
    photos.mkdir()
    labels.mkdir()
    for i in range(N_IMAGES):
        (photos / f"face{i}.png").write_bytes(face_like_png(i, 48))
        (labels / f"face{i}.png").write_bytes(label_png(i))
    write_shards(ShardConfig(input_dir=str(photos), output_dir=str(root / "shards"), source_dir=str(labels),
                             report=str(root / "shard.json"), test_fraction=0.5))
    return root


def labels_of(source_path: str, root: Path) -> np.ndarray:
    with Image.open(root / "labels" / Path(source_path).name) as image:
        return np.asarray(image).astype(np.int64)


def tiny_seg_model(root: Path) -> tuple[PSP, Path]:
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(input_nc=19, output_size=16, encoder_input_size=32))
    net.set_latent_avg(torch.zeros(512))
    return net.eval(), save_psp(net, root / "seg.pt")


def test_label_maps_decode_as_class_ids(seg_shards):
    manifest = read_manifest(seg_shards / "shards")
    assert manifest.paired_sources and manifest.rows["total"] == N_IMAGES
    batch = next(iter_shard_batches(shard_paths(seg_shards / "shards"), N_IMAGES, source_kind="segmentation"))
    source, target = batch_pair(batch, "segmentation")
    assert source.dtype == torch.int64 and source.shape == (N_IMAGES, 1, 48, 48)
    assert target.dtype == torch.uint8 and target.shape == (N_IMAGES, 3, 48, 48)
    for i, path in enumerate(batch.source_paths):
        np.testing.assert_array_equal(source[i, 0].numpy(), labels_of(path, seg_shards))
    sketches = next(iter_shard_batches(shard_paths(seg_shards / "shards"), 2, source_kind="sketch"))
    assert batch_pair(sketches, "sketch")[0].shape == (2, 1, 48, 48)
    with pytest.raises(ShardError, match="needs paired label maps"):
        pair_tensors(batch.images, None, "segmentation")


def by_hand(net: PSP, labels: list[np.ndarray], photos: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """The seg_to_face forward computed here: one-hot labels at 32 px, the 256 px target."""
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(p)).convert("RGB"))).permute(2, 0, 1)
                          for p in photos])
    source = torch.from_numpy(np.stack(labels))[:, None]
    source, target = PresetTransform(get_preset("seg_to_face"), 32, train=False)(source, images, torch.Generator())
    with torch.no_grad():
        output, latents = net(source, resize=False, randomize_noise=False, return_latents=True)
    return latents, torch.nn.functional.adaptive_avg_pool2d(output, 256).clamp(-1, 1).sub(target).pow(2).flatten(1).mean(1)


def test_evaluate_and_invert_feed_label_maps_to_a_seg_model(seg_shards):
    net, checkpoint = tiny_seg_model(seg_shards)
    report = seg_shards / "eval.json"
    params = seg_shards / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {
        "model": str(checkpoint), "shards": str(seg_shards / "shards"), "preset": "seg_to_face", "device": "cpu",
        "lpips_backbone": "random", "precision": "fp32", "irse50": str(seg_shards / "absent.pth"), "report": str(report),
        "per_image": str(seg_shards / "eval.csv"), "grid": str(seg_shards / "grid.png")}}))
    assert main(["evaluate", "--params", str(params)]) == 0
    result = json.loads(report.read_text())

    shard = shard_paths(seg_shards / "shards")[0]
    table = read_unit(pa.table({"unit": ["u"], "paths": [[str(shard)]]}), shards=True, split="test",
                      columns=read_manifest(seg_shards / "shards").columns)
    labels = [labels_of(p, seg_shards) for p in table.column("source_path").to_pylist()]
    latents, l2 = by_hand(net, labels, table.column("image").to_pylist())
    assert result["n_images"] == table.num_rows > 0
    assert result["l2"] == pytest.approx(float(l2.mean()), rel=1e-4)

    cfg = InvertConfig(model=str(checkpoint), preset="seg_to_face", lpips_backbone="random", n_outputs=0,
                       precision="fp32")
    rows = Inverter(str(checkpoint), cfg.model_dump(mode="json"), "test")(table).to_pylist()
    assert [r["error"] for r in rows] == [None] * table.num_rows
    np.testing.assert_allclose(np.array([r["latent"] for r in rows]), latents.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["l2"] for r in rows], l2.numpy(), rtol=1e-4)

    no_source = table.set_column(table.column_names.index("source_image"), "source_image",
                                 pa.array([None] * table.num_rows, pa.binary()))
    rows = Inverter(str(checkpoint), cfg.model_dump(mode="json"), "test")(no_source).to_pylist()
    assert {r["error"] for r in rows} == {"no paired source image"}
