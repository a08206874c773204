"""`psp invert`'s driver without Ray: which output units are done, what is redone, what the manifest says.
The actor pool is replaced by a fake that writes each row's settings into it (the real one:
tests/e2e/test_invert_on_ray.py, and here, for HyperStyle, one slow run through a local Ray instance)."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from helpers.hyperstyle import write_hyperstyle
from helpers.pipelines import make_shards
from pipelines.cli import main
from pipelines.params.schema import InvertConfig
from pipelines.services import storage
from pipelines.stages import invert as stage
from psp_core import PSPArchitecture
from psp_core.data.shards import TARGET_IMAGE, decode_image
from psp_core.data.tensors import png_bytes
from psp_core.inference import InferenceModel, keep_layers, offsets_of, scored
from psp_core.nets.checkpoints import save_generator

MODEL = "models:/psp-encoder/1"


def add_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(folder / name)


@pytest.fixture
def fake_pool(monkeypatch):
    """Ray replaced: `inverted` yields, for every pending unit, its rows (1 + n_outputs variants per image) with
    the n_iters that made them; the calls are recorded."""
    calls: list[list[str]] = []

    def inverted(cfg, source, todo, checkpoint, model_ref, n_images=0):
        calls.append([u.name for u in todo])
        for unit in todo:
            rows = [(Path(p).name, v) for p in unit.paths for v in range(1 + cfg.n_outputs)]
            yield pa.table({"unit": [unit.name] * len(rows), "id": [r[0] for r in rows],
                            "variant": pa.array([r[1] for r in rows], pa.int16()),
                            "n_iters": [cfg.n_iters] * len(rows)})

    monkeypatch.setattr(stage, "inverted", inverted)
    monkeypatch.setattr(stage, "connect", lambda request: None)
    return calls


def run_invert(tmp_path: Path, **settings) -> dict:
    cfg = InvertConfig(input=tmp_path / "images", output_dir=tmp_path / "out", report=tmp_path / "invert.json",
                       precision="fp32", compile=False, lpips_backbone="random", **settings)
    source = storage.StageInput.of(cfg.input)
    model = SimpleNamespace(net=SimpleNamespace(arch=PSPArchitecture(output_size=16, encoder_input_size=32)))
    with storage.claimed_folder(cfg.output_dir, "invert") as folder:
        return stage.invert_units(cfg, source, folder, stage.input_units(cfg, source), Path("unused.pt"), MODEL, model)


def manifest_agrees_with_files(out: Path) -> dict:
    """Every file the manifest lists holds the rows it says, in the variants its n_outputs says."""
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["rows"]:
            table = pq.read_table(out / entry["file"])
            assert table.num_rows == entry["rows"] * (1 + manifest["n_outputs"]), entry
    return manifest


def test_a_changed_setting_or_a_grown_image_folder_redoes_the_unit_and_the_manifest_tells_the_truth(tmp_path,
                                                                                                    fake_pool):
    add_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    first = run_invert(tmp_path, n_iters=1, n_outputs=0)
    assert (first["units_skipped"], first["images_written"]) == (0, 3)

    again = run_invert(tmp_path, n_iters=1, n_outputs=0)            # nothing changed: nothing redone
    assert (again["units_skipped"], again["images_written"], len(fake_pool)) == (1, 0, 1)

    more = run_invert(tmp_path, n_iters=3, n_outputs=2)             # other settings: the file is redone
    assert (more["units_skipped"], more["images_written"]) == (0, 3)
    table = pq.read_table(tmp_path / "out" / "images-00000.parquet")
    assert set(table.column("n_iters").to_pylist()) == {3} and table.num_rows == 9
    assert manifest_agrees_with_files(tmp_path / "out")["n_outputs"] == 2

    add_images(tmp_path / "images", ["d.png", "e.png"])              # the folder grows: the unit is redone
    grown = run_invert(tmp_path, n_iters=3, n_outputs=2)
    assert (grown["units_skipped"], grown["images_written"]) == (0, 5)
    manifest = manifest_agrees_with_files(tmp_path / "out")
    assert [e["rows"] for e in manifest["files"]] == [5]

    units = stage.input_units(InvertConfig(input=tmp_path / "images"), storage.StageInput.of(tmp_path / "images"))
    base = {"n_iters": 3, "n_outputs": 2, "precision": "fp32", "lpips_backbone": "random"}

    def key(model: str = MODEL, family: str = "psp", **setting) -> str:
        return stage.unit_keys(InvertConfig(**{**base, **setting}), units, model, family)["images-00000"]

    assert key() == manifest["files"][0]["key"]
    assert key(batch_size=3, num_actors=2, compile=True, output_dir=tmp_path / "elsewhere") == key()
    for setting in ({"seed": 1}, {"mix_alpha": 0.5}, {"latent_mask": [1, 2]}, {"precision": "bf16"},
                    {"reconstructions": False}, {"split": "test"}, {"preset": "frontalize"}):
        assert key(**setting) != key(), setting                    # each changes what the file holds
    assert key("models:/psp-encoder/2") != key()
    assert key(family="hyperstyle") != key()                      # its rows keep their input image


def test_a_file_of_a_unit_left_without_rows_goes_and_foreign_files_stay(tmp_path, fake_pool):
    add_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    run_invert(tmp_path, images_per_file=2)                          # images-00000 (2) and images-00001 (1)
    out = tmp_path / "out"
    pq.write_table(pa.table({"x": [1]}), out / "mine.parquet")       # the user's, without our key
    (tmp_path / "images" / "c.png").unlink()
    report = run_invert(tmp_path, images_per_file=2)
    assert report["units_skipped"] == 1
    assert not (out / "images-00001.parquet").exists() and (out / "mine.parquet").exists()
    assert [e["file"] for e in manifest_agrees_with_files(out)["files"]] == ["images-00000.parquet"]


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


@pytest.mark.slow
def test_hyperstyle_inverts_and_edits_through_ray_data_with_each_images_offsets(tmp_path, monkeypatch, request):
    """A HyperStyle checkpoint (its W encoder beside it) through the real actor pool: each image's code,
    reconstruction and per-iteration scores are the inference core's, a style-mixed variant is decoded with its
    image's weight offsets, and the manifest says the offsets are not stored. Then `psp edit` of that inversion on
    the same Ray instance, with domain adaptation (another generator, the offsets of one layer kept): every edited
    image is its code decoded by that generator with the offsets the core predicts for its input image."""
    import ray

    from pipelines.services.ray.cluster import WORKER_ENV

    for key, value in WORKER_ENV.items():   # the local Ray's workers inherit them: set here, undone after the test
        monkeypatch.setenv(key, value)
    checkpoint, _ = write_hyperstyle(tmp_path / "model")
    shards = make_shards(tmp_path, images=2, test_fraction=0.5)
    section = {"model": str(checkpoint), "input": str(shards), "output_dir": str(tmp_path / "latents"),
               "report": str(tmp_path / "invert.json"), "n_iters": 2, "n_outputs": 1, "batch_size": 2,
               "cpus_per_actor": 1, "lpips_backbone": "random", "precision": "fp32", "compile": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"invert": section}))
    request.addfinalizer(ray.shutdown)   # the local instance invert starts, edit joins
    assert main(["invert", "--params", str(tmp_path / "params.yaml")]) == 0

    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["family"] == "hyperstyle" and manifest["n_iters"] == 2
    assert "recomputes the offsets from the same input image" in manifest["weight_offsets"]
    rows = pq.read_table(sorted((tmp_path / "latents").glob("*.parquet"))).to_pylist()
    originals = [r for r in rows if r["variant"] == 0]
    assert len(originals) == 2 and len(rows) == 4 and all(r["error"] is None for r in rows)
    images = {r["id"]: r["image"] for r in pq.read_table(sorted(shards.glob("*.parquet"))).to_pylist()}
    pixels = torch.from_numpy(np.stack([decode_image(images[r["id"]]) for r in originals])).permute(0, 3, 1, 2)
    core = InferenceModel.load(checkpoint, device="cpu")
    source, target = core.prepare(pixels, pixels)
    steps = core.invert(source, 2)
    for k, row in enumerate(originals):
        torch.testing.assert_close(torch.tensor(row["latent"]), steps[-1].latents[k], rtol=1e-4, atol=1e-4)
        per_step = row["per_iteration"]
        assert len(per_step) == 2 and per_step[-1] == {m: row[m] for m in ("l2", "lpips", "ms_ssim")}
        for scores, step in zip(per_step, steps):
            l2 = (scored(step.images[k:k + 1]) - target[k:k + 1]).pow(2).mean()
            assert scores["l2"] == pytest.approx(float(l2), rel=1e-4)
        ours = png_pixels(png_bytes(steps[-1].images[k]))
        assert np.abs(png_pixels(row["reconstruction"]) - ours).max() <= 1
    assert per_step[0]["l2"] != pytest.approx(per_step[1]["l2"], rel=1e-6), "each step is scored on its own image"

    variant = next(r for r in rows if r["variant"] == 1)
    k = [r["id"] for r in originals].index(variant["id"])
    offsets = [None if o is None else o[k:k + 1] for o in steps[-1].offsets]
    mixed = core.decode(torch.tensor(variant["latent"])[None], offsets)[0]
    assert variant["per_iteration"] is None
    assert np.abs(png_pixels(variant["reconstruction"]) - png_pixels(png_bytes(mixed))).max() <= 1
    assert all(r[TARGET_IMAGE] == images[r["id"]] for r in originals) and variant[TARGET_IMAGE] is None

    torch.manual_seed(1)
    adapted = copy.deepcopy(core.net.decoder)   # a "fine-tuned" copy: the same architecture, other weights
    with torch.no_grad():
        for weight in adapted.parameters():
            weight.add_(0.2 * weight.abs().mean() * torch.randn_like(weight))
    save_generator(adapted, None, tmp_path / "adapted.pt")
    section = {"input": str(tmp_path / "latents"), "model": str(checkpoint), "output_dir": str(tmp_path / "edits"),
               "report": str(tmp_path / "edit.json"), "generator": str(tmp_path / "adapted.pt"), "offset_layers": [1],
               "edits": [{"kind": "sefa", "top_k": 1, "start": -2, "end": 2, "steps": 2}], "batch_size": 3,
               "cpus_per_actor": 1, "precision": "fp32", "compile": False, "grid_tile": 32}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"edit": section}))
    assert main(["edit", "--params", str(tmp_path / "params.yaml")]) == 0

    report = json.loads((tmp_path / "edit.json").read_text())
    assert report["images_written"] == 4 and report["generator"] == section["generator"]
    assert report["weight_offsets"].startswith("recomputed from each image's target_image in 2 steps")
    edits = pq.read_table(sorted((tmp_path / "edits" / "latents").glob("*.parquet"))).to_pylist()
    assert len(edits) == 4
    ids = [r["id"] for r in originals]
    kept = keep_layers(steps[-1].offsets, [1])
    assert kept[0] is None and kept[1] is not None
    for row in edits:
        k = torch.tensor([ids.index(row["id"])])
        code = torch.tensor(row["latent"])[None]
        edited = png_pixels((tmp_path / "edits" / row["image"]).read_bytes())
        expected = png_pixels(png_bytes(core.decode(code, offsets_of(kept, k), adapted)[0]))
        assert np.abs(edited - expected).max() <= 1 and edited.std() > 10   # an image, not a constant
        for other in (core.decode(code, None, adapted), core.decode(code, offsets_of(kept, k)),
                      core.decode(code, offsets_of(steps[-1].offsets, k), adapted)):
            assert np.abs(edited - png_pixels(png_bytes(other[0]))).max() > 8   # offsets, generator, layers matter
