"""`dvc repro` of the whole pipeline (sample -> align -> shard -> train -> evaluate -> invert -> edit) on a
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

from helpers import REPO
from helpers.pipelines import check_mixed_variants, per_image_metrics, reference_lpips
from psp_core.data.presets import PresetTransform, get_preset
from psp_core.data.shards import iter_shard_batches, shard_paths

COPIED = ["dvc.yaml", "params.yaml", ".dvc", ".dvcignore", ".gitignore", "pipelines", "psp_core", "pyproject.toml"]


def sh(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
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
    # fp32: the checks below recompute metrics and decodes by hand in fp32
    params["evaluate"].update(batch_size=4, precision="fp32")
    params["invert"].update(batch_size=4, n_outputs=1, cpus_per_actor=1, precision="fp32")
    params["edit"].update(edits=[{"kind": "sefa", "top_k": 1, "start": -2, "end": 2, "steps": 3}], grid_images=2,
                          cpus_per_actor=1, precision="fp32")
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
    check_lineage(root, env, manifest)

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
    # edit decoded that code at SeFa strength 0 to the same picture, and drew its grid
    edited = pq.read_table(sorted((root / "data/edits/latents").glob("*.parquet"))).to_pylist()
    unmoved = next(r for r in edited if r["id"] == originals[0]["id"] and r["strength"] == 0)
    stored_edit = np.asarray(Image.open(root / "data/edits" / unmoved["image"]), dtype=np.int16)
    assert np.abs(stored_edit - stored).max() <= 1
    assert Image.open(root / "data/edits/grids/sefa-0.png").size[0] > 0

    # the metrics, recomputed per image: evaluate's CSV (L2, LPIPS, MS-SSIM of the clamped 256 px output)
    # and invert's rows (L2, LPIPS of the pooled output), with the lpips and pytorch_msssim packages
    params = yaml.safe_load((root / "params.yaml").read_text())
    lpips_net = reference_lpips()
    transform = PresetTransform(get_preset(params["evaluate"]["preset"]), net.arch.encoder_input_size, train=False)
    shard_images = {}
    for batch in iter_shard_batches(shard_paths(root / "data/shards"), batch_size=8):
        shard_images.update(zip(batch.ids, zip(batch.images, batch.splits)))
    with (root / "reports/eval_images.csv").open() as f:
        scored = list(csv.DictReader(f))
    assert {r["id"] for r in scored} == {i for i, (_, split) in shard_images.items() if split == "test"}
    for row in scored + originals[:6]:
        pixels = torch.from_numpy(shard_images[row["id"]][0]).permute(2, 0, 1)[None]
        source, target = transform(pixels, pixels, torch.Generator())
        with torch.no_grad():
            output = net(source, resize=True, randomize_noise=False)
        from_csv = "variant" not in row
        expected = per_image_metrics(output, target, lpips_net)[0]
        for metric in ("l2", "lpips", "ms_ssim") if from_csv else ("l2", "lpips"):
            assert float(row[metric]) == pytest.approx(expected[metric], rel=1e-4, abs=1e-6), (metric, row["id"])
    assert evaluation["lpips"] == pytest.approx(np.mean([float(r["lpips"]) for r in scored]), rel=1e-6)
    assert evaluation["ms_ssim"] == pytest.approx(np.mean([float(r["ms_ssim"]) for r in scored]), rel=1e-6)

    # style-mixed variants keep the layers outside the mask and move the mask layers toward one mapped code
    invert = params["invert"]
    mask = invert["latent_mask"] or list(range(8, net.n_styles)) or list(range(net.n_styles // 2, net.n_styles))
    assert check_mixed_variants(net, rows, mask, invert["mix_alpha"], invert["seed"]) == len(rows) - len(originals) > 0


def check_lineage(root: Path, env: dict, manifest: dict) -> None:
    """`psp lineage` of the version the repro registered: every link against the files themselves,
    then a tampered shard reported as not matching (and put back)."""
    import hashlib

    from helpers.pipelines import PSP

    def lineage() -> tuple[int, dict]:
        done = subprocess.run([PSP, "lineage", "models:/psp-encoder/1", "--json"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 1), done.stderr[-2000:]
        return done.returncode, json.loads(done.stdout)

    code, chain = lineage()
    assert code == 0
    train = json.loads((root / "reports/train.json").read_text())
    head = sh(["git", "rev-parse", "HEAD"], root, env).strip()
    assert chain["run"]["id"] == train["mlflow_run_id"] and chain["run"]["git_commit"] == head
    assert chain["run"]["params"]["max_steps"] == "3"
    digest = hashlib.sha256((root / "data/shards/manifest.json").read_bytes()).hexdigest()
    datasets = {d["name"]: d for d in chain["datasets"]}
    assert {name: d["context"] for name, d in datasets.items()} == {"shards/train": "training",
                                                                    "shards/test": "evaluation"}
    for split in ("train", "test"):
        dataset = datasets[f"shards/{split}"]
        assert dataset["digest"] == digest[:32] and dataset["rows"] == manifest["rows"][split]
        assert Path(dataset["source"]) == (root / "data/shards").resolve()
        assert len(dataset["checks"]) == 1 + len(manifest["shards"])
        assert {c["verdict"] for c in dataset["checks"]} == {"matches"}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    stages = chain["dvc_stages"]["stages"]
    assert set(stages) == {"shard", "align", "sample"}
    assert chain["dvc_stages"]["verified"] == f"matches (data/shards: {1 + len(manifest['shards'])} files)"
    for name in stages:
        assert stages[name]["outs"] == {o["path"]: o["md5"] for o in lock[name]["outs"]}
    assert {w["network"]: w["recorded"] for w in chain["weights"]} == {
        "generator": "random", "irse50": "random", "lpips_alexnet": "random"}
    evaluation = json.loads((root / "reports/eval.json").read_text())
    assert float(chain["evaluation"]["eval_l2"]) == pytest.approx(evaluation["l2"], rel=1e-9)
    assert chain["evaluation"]["eval_n_images"] == str(evaluation["n_images"])
    assert "RANDOM WEIGHTS: GENERATOR" in chain["version"]["description"]
    assert digest[:16] in chain["version"]["description"] and "Evaluation: " in chain["version"]["description"]

    shard = root / "data/shards" / manifest["shards"][0]["file"]
    original = shard.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    shard.write_bytes(bytes(tampered))
    try:
        code, chain = lineage()
    finally:
        shard.write_bytes(original)
    assert code == 1
    assert chain["dvc_stages"]["verified"].startswith("DOES NOT MATCH (data/shards: 1 of")
    verdicts = {c["what"]: c["verdict"] for c in chain["datasets"][0]["checks"]}
    assert verdicts[f"{shard.resolve()} sha256"] == "DOES NOT MATCH"
    assert sum(v == "DOES NOT MATCH" for v in verdicts.values()) == 1
