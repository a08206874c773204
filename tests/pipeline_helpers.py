"""Shared set-up for the pipeline tests: small real shards, a tiny training config, the `psp` CLI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipelines.shard import ShardConfig, write_shards

PSP = str(Path(sys.executable).parent / "psp")

TINY_TRAIN = {
    "preset": "encode",
    "loss": {"id_lambda": 0.0},
    "lpips_backbone": "random",
    "output_size": 16,
    "encoder_input_size": 32,
    "train_decoder": True,
    "batch_size": 2,
    "max_steps": 6,
    "log_interval": 1,
    "image_interval": 3,
    "val_interval": 3,
    "save_interval": 2,
    "num_workers": 2,
    "cpus_per_worker": 1,
    "max_failures": 2,
}


def face_like_png(seed: int, size: int = 64) -> bytes:
    """A smooth, seeded colour image (training needs structure, not real faces)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
                for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    path = Image.fromarray(pixels)
    import io
    buffer = io.BytesIO()
    path.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(root: Path, images: int = 16, test_fraction: float = 0.3) -> Path:
    """A folder of `images` PNGs sharded into root/shards (train and test rows); returns the shard folder."""
    folder = root / "aligned"
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(images):
        (folder / f"face{seed:03d}.png").write_bytes(face_like_png(seed))
    write_shards(ShardConfig(input_dir=str(folder), output_dir=str(root / "shards"),
                             report=str(root / "reports" / "shard.json"), test_fraction=test_fraction))
    return root / "shards"


def write_params(root: Path, **train: object) -> Path:
    """params.yaml with a `train` section: the tiny config plus overrides."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "shards": "shards", **train}}))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MLflow settings (`mlflow.set_tracking_uri` in an earlier
    test exports MLFLOW_TRACKING_URI), plus `extra`: a `psp` process uses the store it is given."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**inherited, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def run_psp(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    """Run the `psp` console script; the output is kept for assertion messages."""
    return subprocess.run([PSP, *args], cwd=cwd, env=clean_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
