"""`psp invert`'s driver without Ray: which output units are done, what is redone, what the manifest says.
The actor pool is replaced by a fake that writes each row's settings into it (the real one: tests/e2e/test_invert_on_ray.py)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.params.schema import InvertConfig
from pipelines.services import storage
from pipelines.stages import invert as stage
from psp_core import PSPArchitecture

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

    def key(model: str = MODEL, **setting) -> str:
        return stage.unit_keys(InvertConfig(**{**base, **setting}), units, model)["images-00000"]

    assert key() == manifest["files"][0]["key"]
    assert key(batch_size=3, num_actors=2, compile=True, output_dir=tmp_path / "elsewhere") == key()
    for setting in ({"seed": 1}, {"mix_alpha": 0.5}, {"latent_mask": [1, 2]}, {"precision": "bf16"},
                    {"reconstructions": False}, {"split": "test"}, {"preset": "frontalize"}):
        assert key(**setting) != key(), setting                    # each changes what the file holds
    assert key("models:/psp-encoder/2") != key()


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
