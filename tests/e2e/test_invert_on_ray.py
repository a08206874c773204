"""`psp invert`: Ray Data batch inversion and its outputs (stopping and resuming: tests/e2e/test_data_safety.py)."""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from helpers.parity import FIXTURES, write_released_psp
from helpers.pipelines import PSP, check_mixed_variants, clean_env, make_shards, per_image_metrics, reference_lpips
from psp_core import PSP as PSPNet
from psp_core import PSPArchitecture, load_psp, save_psp
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.data.shards import decode_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = PSPNet(PSPArchitecture(output_size=16, encoder_input_size=32))
    net.set_latent_avg(torch.randn(512) * 0.1)
    return save_psp(net, tmp_path_factory.mktemp("model") / "tiny.pt")


def write_invert_params(root: Path, model: Path | str, **values) -> None:
    section = {"model": str(model), "input": "shards", "output_dir": "latents", "report": "reports/invert.json",
               "batch_size": 3, "lpips_backbone": "random", "cpus_per_actor": 1, "precision": "fp32", **values}
    (root / "params.yaml").write_text(yaml.safe_dump({"invert": section}))


def read_outputs(folder: Path):
    return pq.read_table(sorted(folder.glob("*.parquet"))).to_pylist()


def test_latents_decode_to_the_reconstruction_variants_mix_and_an_imported_checkpoint_gives_its_codes(tmp_path,
                                                                                                     model_file):
    make_shards(tmp_path, images=10)
    write_invert_params(tmp_path, model_file, n_outputs=2, mix_alpha=0.5)
    done = subprocess.run([PSP, "invert"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_outputs(tmp_path / "latents")
    assert len(rows) == 10 * 3 and all(r["error"] is None for r in rows)
    net = load_psp(model_file)
    transform = PresetTransform(get_preset("encode"), 32, train=False)
    shard = pq.read_table(sorted((tmp_path / "shards").glob("*.parquet"))).to_pylist()
    images = {r["id"]: r["image"] for r in shard}
    lpips_net = reference_lpips()
    originals = [r for r in rows if r["variant"] == 0]
    assert sorted(r["id"] for r in originals) == sorted(images)
    for n, row in enumerate(originals):
        latent = torch.tensor(row["latent"])
        assert latent.shape == (net.n_styles, 512)
        with torch.no_grad():
            pixels = torch.from_numpy(decode_image(images[row["id"]]).copy()).permute(2, 0, 1)[None]
            source, target = transform(pixels, pixels, torch.Generator())
            encoded = net.encode(source)[0]
            output = net(source, resize=True, randomize_noise=False)
        torch.testing.assert_close(latent, encoded, rtol=1e-4, atol=1e-4)
        # per-image metrics, recomputed one image at a time with the lpips package
        expected = per_image_metrics(output, target, lpips_net)[0]
        assert row["l2"] == pytest.approx(expected["l2"], rel=1e-4)
        assert row["lpips"] == pytest.approx(expected["lpips"], rel=1e-4, abs=1e-6)
        if n < 4:
            with torch.no_grad():
                decoded, _ = net.decoder([latent[None]], input_is_latent=True, randomize_noise=False)
            stored = np.asarray(Image.open(io.BytesIO(row["reconstruction"])), dtype=np.int16)
            ours = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)
            assert np.abs(stored - ours).max() <= 1
    assert len({r["lpips"] for r in originals}) == len(originals), "one LPIPS per image, not a batch mean"

    # style mixing: the coarse layers 0-2 stay; each mixed layer 3-5 moves half way (mix_alpha 0.5) toward
    # one code w = mapping(z), z drawn from the seed of (run seed, image id, variant)
    assert check_mixed_variants(net, rows, mask=[3, 4, 5], alpha=0.5) == 2 * 10
    row = next(r for r in rows if r["variant"] == 1)
    with torch.no_grad():
        decoded, _ = net.decoder([torch.tensor(row["latent"])[None]], input_is_latent=True, randomize_noise=False)
    stored = np.asarray(Image.open(io.BytesIO(row["reconstruction"])), dtype=np.int16)
    ours = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(stored - ours).max() <= 1, "a variant's image is its mixed code decoded"

    # other settings and another model redo every file (none is "already done"), and the manifest describes the files
    # it lists: the released pSp of the parity rule, registered with `psp import-checkpoint`, gives through Ray Data
    # the codes it gives in-process (its fixture input is not an image, values in [-5, 4.6], so it cannot pass
    # through image files: the registered model's match with the fixture is test_registry's job)
    ref = np.load(FIXTURES / "ref_gradual64.npz")
    released = write_released_psp(tmp_path / "psp_gradual64.pt")
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    imported = subprocess.run([PSP, "import-checkpoint", str(released)], cwd=tmp_path, env=clean_env(**store),
                              capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    write_invert_params(tmp_path, "models:/psp-encoder/1", n_outputs=0, split="test", reconstructions=False)
    done = subprocess.run([PSP, "invert"], cwd=tmp_path, env=clean_env(**store), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "(0 files already done)" in done.stdout, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    rows = read_outputs(tmp_path / "latents")
    assert manifest["n_outputs"] == 0 and {r["variant"] for r in rows} == {0}
    assert sum(e["rows"] for e in manifest["files"]) == len(rows) == sum(r["split"] == "test" for r in shard) > 0
    assert {r["model"] for r in rows} == {"models:/psp-encoder/1"}

    net = load_psp(released)
    with torch.no_grad():   # the reference function on the fixture input, then on the real images
        torch.testing.assert_close(net(torch.from_numpy(ref["input"]), resize=False, randomize_noise=False,
                                       return_latents=True)[1], torch.from_numpy(ref["latent"]), rtol=0,
                                   atol=1e-4 * max(1.0, float(np.abs(ref["latent"]).max())))
        transform = PresetTransform(get_preset("encode"), 256, train=False)
        for row in rows:
            pixels = torch.from_numpy(decode_image(images[row["id"]]).copy()).permute(2, 0, 1)[None]
            source, _ = transform(pixels, pixels, torch.Generator())
            torch.testing.assert_close(torch.tensor(row["latent"]), net.encode(source)[0], rtol=1e-4, atol=1e-4)
