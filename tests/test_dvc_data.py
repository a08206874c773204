"""`dvc repro` of the whole pipeline (sample -> align -> shard -> train -> evaluate -> invert) on a
tiny configuration in a temporary copy of the repository, then `dvc exp run -S`."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from psp_core.shards import iter_shard_batches, shard_paths

REPO = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", "params.yaml", ".dvc", ".dvcignore", ".gitignore", "pipelines", "psp_core", "pyproject.toml"]


def sh(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def repo(tmp_path) -> tuple[Path, dict]:
    """A git + DVC repository holding only what the data stages need, with a smaller sample."""
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(source, tmp_path / name)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["sample"].update(augmented_copies=2, lfw_faces=4)
    params["train"].update(output_size=16, encoder_input_size=32, batch_size=2, max_steps=3, num_workers=1,
                           log_interval=1, image_interval=3, val_interval=3, save_interval=3)
    params["evaluate"].update(batch_size=4)
    params["invert"].update(batch_size=4, n_outputs=1, cpus_per_actor=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(tmp_path),  # the stages run the copied code
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    sh(["git", "init", "-q", "-b", "main"], tmp_path, env)
    sh(["git", "add", "-A"], tmp_path, env)
    sh(["git", "commit", "-q", "-m", "data stages"], tmp_path, env)
    return tmp_path, env


@pytest.mark.slow
def test_repro_twice_then_experiment(repo):
    root, env = repo
    dvc = [str(Path(sys.executable).parent / "dvc")]
    sh(dvc + ["repro"], root, env)
    align = json.loads((root / "reports/align.json").read_text())
    assert align["photos"] == 2 * 3 + 4 + 12 and align["faces_aligned"] == align["photos_aligned"] == 2 * 3 + 4 + 7  # 7 awkward files hold a usable face
    manifest = json.loads((root / "data/shards/manifest.json").read_text())
    assert manifest["rows"]["total"] == align["faces_aligned"]
    assert "/raw" in (root / "data/.gitignore").read_text()  # DVC git-ignores the stage outputs
    check_training_evaluation_and_inversion(root, manifest)
    first_lock = (root / "dvc.lock").read_text()

    again = sh(dvc + ["repro"], root, env)
    assert "Data and pipelines are up to date" in again, again
    assert (root / "dvc.lock").read_text() == first_lock
    assert "up to date" in sh(dvc + ["status"], root, env)

    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-q", "-m", "repro"], root, env)
    sh(dvc + ["exp", "run", "-S", "align.output_size=128", "shard"], root, env)
    batch = next(iter_shard_batches(shard_paths(root / "data/shards"), batch_size=4))
    assert batch.images.shape == (4, 128, 128, 3)
    assert {Image.open(p).size for p in (root / "data/aligned").glob("*.png")} == {(128, 128)}
    table = list(csv.DictReader(io.StringIO(sh(dvc + ["exp", "show", "--no-pager", "--csv"], root, env))))
    experiment = [row for row in table if row["Experiment"] not in ("", "workspace", "main")]
    assert len(experiment) == 1 and experiment[0]["align.output_size"] == "128"
    assert experiment[0]["faces_aligned"] == str(align["faces_aligned"])  # metrics come back from the DVC cache


def check_training_evaluation_and_inversion(root: Path, manifest: dict) -> None:
    """train registered @candidate, evaluate scored it, invert wrote every image's W+ code, and a
    stored code decodes (with the registered model's generator) to the stored reconstruction."""
    import mlflow
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from psp_core import load_psp

    train = json.loads((root / "reports/train.json").read_text())
    assert train["steps"] == 3 and train["model_version"] == "1"
    evaluation = json.loads((root / "reports/eval.json").read_text())
    assert evaluation["n_images"] == manifest["rows"]["test"] and evaluation["model_version"] == "1"
    assert evaluation["l2"] > 0 and evaluation["seconds_per_image"] > 0
    assert Image.open(root / "reports/eval_grid.png").size[0] > 0
    rows = pq.read_table(sorted((root / "data/latents").glob("*.parquet"))).to_pylist()
    originals = [r for r in rows if r["variant"] == 0]
    assert len(rows) == 2 * manifest["rows"]["total"] and len({r["id"] for r in originals}) == len(originals)
    assert {r["model"] for r in rows} == {"models:/psp-encoder/1"}

    store = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    checkpoint = next(Path(mlflow.artifacts.download_artifacts("models:/psp-encoder/1")).rglob("*.pt"))
    net = load_psp(checkpoint)
    latent = torch.tensor(originals[0]["latent"])[None]
    with torch.no_grad():
        image, _ = net.decoder([latent], input_is_latent=True, randomize_noise=False)
    ours = ((image[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)
    stored = np.asarray(Image.open(io.BytesIO(originals[0]["reconstruction"])), dtype=np.int16)
    assert np.abs(ours - stored).max() <= 1
