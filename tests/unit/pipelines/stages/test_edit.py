"""`psp edit`: InterFaceGAN / GANSpace / SeFa edits of an inversion's codes through Ray Data, its outputs,
the MLflow run, resuming, and one-line errors for directions that do not fit the model."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from PIL import Image

from helpers.editing import N_STYLES, ROOT, UNITS, decode_png, write_edit_params, write_inversion
from pipelines.cli import main
from pipelines.params.schema import EditConfig
from pipelines.services import storage
from pipelines.services.ray.cluster import WORKER_ENV
from pipelines.services.tracking import resolve_model
from pipelines.stages.edit import edit_settings, plan_units, read_inversion
from pipelines.stages.edit_actor import check_codes
from pipelines.stages.edit_directions import build_directions
from psp_core import PSP, PSPArchitecture, load_psp, save_psp
from psp_core.data.shards import TARGET_IMAGE
from psp_core.editing.directions import FFHQ_DIRECTIONS, GanspacePCA, ganspace, sefa_directions
from psp_core.errors import InputError
from psp_core.inference import keep_layers, offsets_of
from psp_core.nets.checkpoints import save_generator
from psp_core.nets.stylegan2 import Generator


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def edit_here(tmp_path, registered, monkeypatch, capsys):
    """`psp edit` run by the console script's `main` in this process, from `tmp_path`, tracked in the `registered`
    store: returns (exit code, stdout, stderr). The first run starts a local Ray instance the later ones join; it
    ends with the test."""
    monkeypatch.chdir(tmp_path)
    for key, value in {**WORKER_ENV, **registered}.items():   # the local Ray's workers inherit them
        monkeypatch.setenv(key, value)

    def edit() -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["edit"])
        return code, *capsys.readouterr()

    yield edit
    ray.shutdown()


@pytest.mark.slow
def test_edits_decode_log_and_resume(tmp_path, model_file, registered, edit_here):
    env = registered
    net = load_psp(model_file)
    codes = write_inversion(tmp_path / "latents", net, "models:/psp-encoder/1")
    ig = torch.randn(1, N_STYLES, 512, generator=torch.Generator().manual_seed(2))
    torch.save(ig, tmp_path / "wplus.pt")
    comp = torch.linalg.qr(torch.randn(512, 4, generator=torch.Generator().manual_seed(3)))[0].T.reshape(4, 1, 512)
    torch.save({"mean": torch.zeros(1, 512), "comp": comp, "std": torch.full((4,), 2.0)}, tmp_path / "pca.pt")
    edits = [{"kind": "sefa", "top_k": 2, "start": -6.0, "end": 6.0, "steps": 3},
             {"kind": "interfacegan", "direction": str(tmp_path / "wplus.pt"), "start": 0.0, "end": 1.5, "steps": 2},
             {"kind": "ganspace", "pca": str(tmp_path / "pca.pt"), "directions": [[1, 0, 3, -2.0], [1, 0, 3, 2.0]]}]
    write_edit_params(tmp_path, edits=edits)

    code, _, err = edit_here()
    assert code == 0, err[-3000:]
    out = tmp_path / "edits"
    report = json.loads((tmp_path / "reports" / "edit.json").read_text())
    names = ["sefa-0", "sefa-1", "wplus", "ganspace-pc1-0-3"]
    assert [d["name"] for d in report["directions"]] == names
    per_code = 3 + 3 + 2 + 2
    assert report["images_written"] == len(codes) * per_code and report["codes_edited"] == len(codes) == 5

    # latents: one file per invert file, the codes of variant 0 without error only, each edit as specified
    rows = pq.read_table(sorted((out / "latents").glob("*.parquet"))).to_pylist()
    assert sorted({p.stem for p in (out / "latents").glob("*.parquet")}) == sorted(UNITS)
    assert {r["id"] for r in rows} == set(codes) and len(rows) == len(codes) * per_code
    _, vectors = sefa_directions(net.decoder, range(N_STYLES - 1))
    pca = GanspacePCA.load(tmp_path / "pca.pt")
    unedited = {image_id: decode_png(net, code) for image_id, code in codes.items()}
    for row in rows:
        latent, code, s = torch.tensor(row["latent"]), codes[row["id"]], row["strength"]
        assert latent.shape == (N_STYLES, 512)
        if row["kind"] == "sefa":
            expected = code.clone()
            expected[:N_STYLES - 1] += s * vectors[row["index"]]
        elif row["kind"] == "interfacegan":
            expected = code + s * ig[0]
        else:
            expected = ganspace(code[None], pca, 1, 0, 3, s)[0]
        torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)
        stored = np.asarray(Image.open(out / row["image"]))
        assert stored.shape == (16, 16, 3)
        if row["kind"] == "sefa" and s == 0:
            # strength 0: the code itself, decoded into its reconstruction
            assert torch.equal(latent, code)
            assert np.abs(stored.astype(int) - unedited[row["id"]].astype(int)).max() <= 1
        elif row["kind"] == "sefa":
            assert np.abs(stored.astype(int) - unedited[row["id"]].astype(int)).mean() > 2, "a visible edit"
    assert len(list((out / "images").rglob("*.png"))) == len(rows)

    # one grid per direction: the first 4 codes by id as rows, the strengths as columns
    for direction in report["directions"]:
        grid = Image.open(out / direction["grid"])
        assert grid.size == (len(direction["strengths"]) * 34 + 2, 4 * 34 + 2), direction["name"]
    first = sorted(codes)[0]
    cell = np.asarray(Image.open(out / "grids/sefa-0.png"))[2:34, 34 + 2:34 + 34]   # row 0, column 1 (strength 0)
    expected_cell = np.asarray(Image.fromarray(unedited[first]).resize((32, 32), Image.NEAREST))
    assert np.abs(cell.astype(int) - expected_cell.astype(int)).max() <= 1

    # MLflow: a run in psp-edits with the model version and the grids
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("psp-edits")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.tags["psp.model_version"] == "models:/psp-encoder/1"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "grids")) == [f"grids/{n}.png" for n in sorted(names)]

    # a rerun writes nothing: every file is left exactly as it was, a user's temporary-looking files too; only a
    # temporary file of a killed edit goes
    for foreign in (".backup.tmp", "images/.draft.tmp", "images/mine/.x.tmp", "latents/.shard-00001.parquet.x.tmp",
                    "images/sefa-0/.mine.png.abc.tmp"):
        (out / foreign).parent.mkdir(parents=True, exist_ok=True)
        (out / foreign).write_text("the user's")
    before = snapshot(out)
    ours = out / "images" / "sefa-0" / f"{storage.temporary_prefix('1.png')}k3x9q2.tmp"
    ours.write_bytes(b"half a png")
    code, stdout, err = edit_here()
    assert code == 0, err[-3000:]
    assert "(2 files already done)" in stdout
    assert snapshot(out) == before and not ours.exists()
    assert json.loads((tmp_path / "reports" / "edit.json").read_text())["images_written"] == 0

    # a run stopped half-way (one unit's latents file and one of its images missing) redoes that unit only
    (out / "latents" / "shard-00001.parquet").unlink()
    lost = next(p for p in (out / "images" / "sefa-1").glob("1*.png"))
    lost.unlink()
    code, _, err = edit_here()
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "reports" / "edit.json").read_text())
    assert report["units_skipped"] == 1 and report["images_written"] == UNITS["shard-00001"] * per_code
    after = snapshot(out)
    assert set(after) == set(before)
    redone = {name for name in before if name == "latents/shard-00001.parquet"
              or (name.startswith("images/") and name.rsplit("/", 1)[1].startswith("1"))}
    assert len(redone) == 1 + UNITS["shard-00001"] * per_code
    assert all(after[name] == before[name] for name in set(before) - redone), "the rest is left exactly as it was"
    assert all(after[name][0] == before[name][0] for name in redone if name.endswith(".png")), "the same images again"
    assert pq.read_table(out / "latents" / "shard-00001.parquet").equals(pq.read_table(io.BytesIO(
        before["latents/shard-00001.parquet"][0])))


def test_directions_that_do_not_fit_the_model_are_one_line_errors(tmp_path, model_file, capsys):
    net = load_psp(model_file)
    write_inversion(tmp_path / "latents", net, resolve_model(str(model_file)).pinned)
    torch.save(torch.zeros(3, 7), tmp_path / "odd.pt")
    cases = [
        ({"kind": "interfacegan", "direction": str(tmp_path / "odd.pt")}, r"odd\.pt: direction of shape \[3, 7\]"),
        ({"kind": "interfacegan", "direction": "age"}, r"interfacegan_age\.pt: an FFHQ direction .* 6 styles"),
        ({"kind": "ganspace", "directions": [[0, 0, 4, 1.0]]}, r"ganspace_ffhq_pca\.pt: an FFHQ direction .* 6 styles"),
    ]
    params = tmp_path / "params.yaml"
    for entry, message in cases:
        write_edit_params(tmp_path, model=str(model_file), edits=[entry], input=str(tmp_path / "latents"),
                          output_dir=str(tmp_path / "edits"))
        assert main(["edit", "--params", str(params)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("psp edit: error: ") and "\n" not in error, error
        assert re.search(message, error), error
        assert not (tmp_path / "edits").exists(), "nothing is written before the edits are checked"

    # the codes decode only with the generator that made them
    other = PSP(PSPArchitecture(output_size=16, encoder_input_size=32))
    other.set_latent_avg(torch.zeros(512))
    save_psp(other, tmp_path / "other.pt")
    write_edit_params(tmp_path, model=str(tmp_path / "other.pt"), input=str(tmp_path / "latents"),
                      output_dir=str(tmp_path / "edits"))
    assert main(["edit", "--params", str(params)]) == 2
    assert "were made by file:tiny.pt@sha256:" in capsys.readouterr().err

    # domain adaptation: a generator of another architecture; weight offsets asked of a model that has none
    save_generator(Generator(32, 512, 8, 2), None, tmp_path / "g32.pt")
    for setting, message in (({"generator": str(tmp_path / "g32.pt")},
                              r"g32\.pt: a 32 px generator whose .* it must be the model generator's architecture"),
                             ({"offset_layers": [1]}, "edit.offset_layers keeps some of HyperStyle's weight offsets; "
                                                      "this model is psp, which has none")):
        write_edit_params(tmp_path, model=str(model_file), input=str(tmp_path / "latents"),
                          output_dir=str(tmp_path / "edits"), **setting)
        assert main(["edit", "--params", str(params)]) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and re.search(message, error), error
        assert not (tmp_path / "edits").exists()


def test_a_hyperstyle_edit_needs_the_input_images_and_offset_layers_of_the_generator(tmp_path, model_file):
    """A HyperStyle inversion file without its input images (an earlier version's) cannot give weight offsets
    back: refused before any work, as is a layer the generator does not have."""
    net = load_psp(model_file)
    write_inversion(tmp_path / "latents", net, resolve_model(str(model_file)).pinned)
    path = storage.Location.of(tmp_path / "latents" / "shard-00000.parquet")
    check_codes(path, N_STYLES, with_targets=False)
    with pytest.raises(InputError, match="no 'target_image' column to recompute HyperStyle's weight offsets from"):
        check_codes(path, N_STYLES, with_targets=True)
    table = pq.read_table(path.path)
    pq.write_table(table.append_column(TARGET_IMAGE, pa.array([None] * table.num_rows, pa.binary())), path.path)
    with pytest.raises(InputError, match=r"3 rows to edit \(variant 0, no error\) have no target_image; rerun"):
        check_codes(path, N_STYLES, with_targets=True)
    offsets = [torch.ones(2, 1), None, torch.zeros(2, 1)]
    assert keep_layers(offsets, [2]) == [None, None, offsets[2]] and keep_layers(offsets, None) == offsets
    assert offsets_of(offsets, torch.tensor([1, 1, 0]))[0].shape == (3, 1)
    with pytest.raises(InputError, match=r"layer 3 is not a layer of this generator \(0\.\.2\)"):
        keep_layers(offsets, [0, 3])


def test_direction_files_and_styles_are_checked_against_the_model(tmp_path, model_file):
    net = load_psp(model_file)
    torch.save(torch.zeros(1, 18, 512), tmp_path / "ffhq_wplus.pt")
    torch.save({"mean": torch.zeros(1, 512), "comp": torch.zeros(4, 1, 512), "std": torch.ones(4)}, tmp_path / "pca.pt")
    cases = [
        ({"kind": "interfacegan", "direction": str(tmp_path / "ffhq_wplus.pt")},
         r"ffhq_wplus\.pt: direction of shape \[1, 18, 512\]; expected \[1, 512\] or \[1, 6, 512\]"),
        ({"kind": "ganspace", "pca": str(tmp_path / "pca.pt"), "directions": [[4, 0, 2, 1.0]]},
         r"pca\.pt: has 4 components, edit\.edits asks for pca_index 4"),
        ({"kind": "ganspace", "pca": str(tmp_path / "pca.pt"), "directions": [[0, 3, 7, 1.0]]},
         r"styles 3\.\.6 outside the model's 0\.\.5"),
        ({"kind": "sefa", "styles": [5]}, r"SeFa styles must be in 0\.\.4"),
    ]
    for entry, message in cases:
        with pytest.raises(InputError, match=message):
            build_directions(EditConfig(edits=[entry]), net.decoder, net.n_styles)
    torch.save(torch.ones(1, 512), tmp_path / "w.pt")
    twice = [{"kind": "interfacegan", "direction": str(tmp_path / "w.pt")}] * 2
    with pytest.raises(InputError, match="two edits make a direction named w: give one of them another name"):
        build_directions(EditConfig(edits=twice), net.decoder, net.n_styles)


def test_a_unit_key_covers_the_model_the_edits_the_precision_and_the_input_bytes(tmp_path, model_file):
    net = load_psp(model_file)
    model_ref = resolve_model(str(model_file)).pinned
    write_inversion(tmp_path / "latents", net, model_ref)
    inversion = read_inversion(tmp_path / "latents")

    def keys(model: str = model_ref, **settings) -> list[str]:
        cfg = EditConfig(**{"precision": "fp32", **settings})
        return [u.key for u in plan_units(inversion, edit_settings(model, cfg))]

    assert keys(batch_size=3, num_actors=2, grid_images=2, grid_tile=64, output_dir=tmp_path / "x") == keys()
    for setting in ({"precision": "bf16"}, {"edits": [{"kind": "sefa", "top_k": 2}]},
                    {"edits": [{"kind": "sefa", "start": -1.0}]}):
        assert all(a != b for a, b in zip(keys(**setting), keys())), setting
    assert all(a != b for a, b in zip(keys("models:/psp-encoder/9"), keys()))
    save_generator(net.decoder, None, tmp_path / "g.pt")
    adapted = [u.key for u in plan_units(inversion, edit_settings(model_ref, EditConfig(precision="fp32"),
                                                                  tmp_path / "g.pt"))]
    assert all(a != b for a, b in zip(adapted, keys())), "the domain adaptation's generator enters by its bytes"
    before = keys()
    table = pq.read_table(tmp_path / "latents" / "shard-00001.parquet")
    pq.write_table(table.slice(1), tmp_path / "latents" / "shard-00001.parquet")   # that input file changed
    inversion = read_inversion(tmp_path / "latents")
    assert [a == b for a, b in zip(keys(), before)] == [True, False]


def test_an_inversion_file_that_is_not_the_one_its_manifest_describes_is_refused(tmp_path, model_file):
    net = load_psp(model_file)
    write_inversion(tmp_path / "latents", net, resolve_model(str(model_file)).pinned)
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    manifest["files"][0]["key"] = "0" * 64          # the key invert wrote it under; the file has none (or another)
    (tmp_path / "latents" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"shard-00000\.parquet is not the file .*manifest\.json describes"):
        read_inversion(tmp_path / "latents")


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.drop(["variant"]), r"shard-00000\.parquet: no 'variant' column"),
    (lambda t: t.drop(["error"]), r"shard-00000\.parquet: no 'error' column"),
    (lambda t: t.set_column(t.schema.get_field_index("error"), "error", pa.nulls(t.num_rows, pa.string())),
     r"shard-00000\.parquet: 1 row to edit \(variant 0, no error\) has no latent"),
])
def test_a_damaged_inversion_file_is_one_line_and_exit_2(tmp_path, model_file, capsys, damage, message):
    net = load_psp(model_file)
    write_inversion(tmp_path / "latents", net, resolve_model(str(model_file)).pinned)
    path = tmp_path / "latents" / "shard-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(damage(table).replace_schema_metadata(table.schema.metadata), path)
    params = write_edit_params(tmp_path, model=str(model_file), input=str(tmp_path / "latents"),
                               output_dir=str(tmp_path / "edits"))
    assert main(["edit", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "edits").exists()


def test_the_shipped_ffhq_directions_fit_the_ffhq_generator():
    cfg = EditConfig(edits=[{"kind": "interfacegan", "direction": name} for name in ("age", "smile", "pose")]
                     + [{"kind": "ganspace", "pca": "ffhq", "directions": [[54, 7, 8, 20], [54, 7, 8, -20]]}])
    directions = build_directions(cfg, generator=None, n_styles=18)
    assert [d.name for d in directions] == ["age", "smile", "pose", "ganspace-pc54-7-8"]
    for direction in directions[:3]:
        assert direction.latent_edit.direction.shape == (1, 18, 512)
    raw = {name: torch.load(FFHQ_DIRECTIONS / f"interfacegan_{name}.pt", map_location="cpu", weights_only=True)
           for name in ("age", "smile", "pose")}
    assert raw["age"].shape == raw["smile"].shape == (1, 512) and raw["pose"].shape == (1, 18, 512)
    pca = directions[3].latent_edit.pca
    assert pca.mean.shape == (1, 512) and pca.comp.shape == (80, 1, 512) and pca.std.shape == (80,)
    assert directions[3].strengths == (20.0, -20.0)
    codes = torch.randn(2, 18, 512)
    assert directions[3].moved(codes).shape == (2, 2, 18, 512)


def test_the_demo_edits_with_sefa_what_invert_wrote():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = EditConfig.model_validate(params["edit"])
    assert str(cfg.input) == params["invert"]["output_dir"] and cfg.model is None
    assert [e.kind for e in cfg.edits] == ["sefa"]
