"""An inversion folder written by hand and a tiny registered model, for the edit stage's tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import REPO
from helpers.tracking import tracking_store
from pipelines.cli import main
from pipelines.services.storage import OUTPUT_MARKER
from psp_core import PSP, PSPArchitecture, save_psp
from psp_core.data.shards import LATENT_TYPE, MODEL_METADATA_KEY

ROOT = REPO
N_STYLES = 6   # a 16 px generator
UNITS = {"shard-00000": 3, "shard-00001": 2}   # codes per invert output file


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = PSP(PSPArchitecture(output_size=16, encoder_input_size=32))
    net.set_latent_avg(net.decoder.mean_latent(256, torch.Generator().manual_seed(0))[0])
    assert net.n_styles == N_STYLES
    return save_psp(net, tmp_path_factory.mktemp("model") / "tiny.pt")


def decode_png(net: PSP, latent: torch.Tensor) -> np.ndarray:
    """A code [S, 512] decoded (stored noise) as the uint8 image [H, W, 3] a PNG of it holds."""
    with torch.no_grad():
        image, _ = net.decoder([latent[None]], input_is_latent=True, randomize_noise=False)
    return ((image[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)


def write_inversion(folder: Path, net: PSP, model_ref: str) -> dict[str, torch.Tensor]:
    """An output folder as `psp invert` writes it (`reconstructions: false`): marker, manifest, one Parquet file
    per unit with rows {id, variant, source_path, latent, reconstruction, l2, lpips, error, model}; each unit also holds a
    style-mixed variant row and a rejected image (its error set), which are not edited, and the manifest
    lists an empty unit (invert writes no file for it). Returns the codes to edit by id. The rejected row's
    latent is null, as invert writes it (`psp_core.data.shards.LATENT_TYPE`)."""
    folder.mkdir(parents=True)
    (folder / OUTPUT_MARKER).write_text(json.dumps({"stage": "invert"}))
    generator = torch.Generator().manual_seed(1)
    codes: dict[str, torch.Tensor] = {}
    for unit, count in UNITS.items():
        rows = []
        for k in range(count):
            image_id = f"{unit[-1]}{k:02d}" + "ab" * 31
            latent = net.latent_avg + 0.5 * torch.randn(N_STYLES, 512, generator=generator)
            codes[image_id] = latent
            for variant, code in ((0, latent), (1, latent + 1.0)):
                rows.append({"id": image_id, "variant": variant, "source_path": f"{image_id}.png", "latent": code.numpy(),
                             "reconstruction": None, "l2": 0.1, "lpips": 0.2, "error": None})
        rows.append({"id": f"{unit[-1]}99" + "cd" * 31, "variant": 0, "source_path": "broken.png",
                     "latent": None,
                     "reconstruction": None, "l2": None, "lpips": None, "error": "undecodable image: OSError"})
        table = pa.table({
            "id": [r["id"] for r in rows],
            "variant": pa.array([r["variant"] for r in rows], pa.int16()),
            "source_path": [r["source_path"] for r in rows],
            "latent": pa.array([None if r["latent"] is None else list(r["latent"]) for r in rows], LATENT_TYPE),
            "reconstruction": pa.array([r["reconstruction"] for r in rows], pa.binary()),
            "l2": pa.array([r["l2"] for r in rows], pa.float32()),
            "lpips": pa.array([r["lpips"] for r in rows], pa.float32()),
            "error": pa.array([r["error"] for r in rows], pa.string()),
            "model": [model_ref] * len(rows),
        }).replace_schema_metadata({MODEL_METADATA_KEY: model_ref.encode()})
        pq.write_table(table, folder / f"{unit}.parquet")
    files = [{"file": f"{u}.parquet", "rows": 2 * c + 1} for u, c in UNITS.items()] + [{"file": "shard-00002.parquet", "rows": 0}]
    (folder / "manifest.json").write_text(json.dumps({"model": model_ref, "files": files, "n_outputs": 1}))
    return codes


def write_edit_params(root: Path, **values) -> Path:
    section = {"input": "latents", "output_dir": "edits", "report": "reports/edit.json", "batch_size": 2,
               "cpus_per_actor": 1, "grid_images": 4, "grid_tile": 32, "precision": "fp32", **values}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"edit": section}))
    return path


@pytest.fixture(scope="module")
def registered(tmp_path_factory, model_file) -> dict[str, str]:
    """The tiny model registered as models:/psp-encoder/1 in a fresh SQLite store; the env selecting that store."""
    root = tmp_path_factory.mktemp("store")
    with tracking_store(root) as uri:
        assert main(["import-checkpoint", str(model_file)]) == 0
    return {"MLFLOW_TRACKING_URI": uri}
