"""Shared set-up for the pipeline tests: small real shards, a tiny training config, the `psp` CLI."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pipelines.stages.shard import ShardConfig, write_shards
from psp_core import PSPArchitecture, build_psp
from psp_core.nets.psp import PSP as PSPNetwork

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

SMALL_MODEL = {"encoder_type": "BackboneEncoderUsingLastLayerIntoW", "train_decoder": False}
"""The smallest model the train section builds, for runs whose encoder does not matter: one W code from the IR-SE50
body, the generator frozen. At 64 px its trained weights are 31 M, the default encoder's 81 M, so each checkpoint
(weights and optimiser state) Ray writes, uploads and the run registers is 0.6 GB instead of 1.4 GB."""


def near_copy_png(seed: int) -> bytes:
    """`face_like_png(0)` with seeded noise of up to 4 levels per pixel: images alike enough that what a model learns
    on some of them shows on the others (a validation loss that can fall in a few steps)."""
    base = np.asarray(Image.open(io.BytesIO(face_like_png(0))).convert("RGB"), dtype=np.int16)
    noisy = np.clip(base + np.random.default_rng(seed).integers(-4, 5, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    return buffer.getvalue()


def face_like_png(seed: int, size: int = 64) -> bytes:
    """A smooth, seeded colour image (training needs structure, not real faces)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
                for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    path = Image.fromarray(pixels)
    buffer = io.BytesIO()
    path.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(root: Path, images: int = 16, test_fraction: float = 0.3,
                png: Callable[[int], bytes] = face_like_png) -> Path:
    """A folder of `images` PNGs (`png(seed)` each) sharded into root/shards (train and test rows); returns the
    shard folder."""
    folder = root / "aligned"
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(images):
        (folder / f"face{seed:03d}.png").write_bytes(png(seed))
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


def interruptible() -> None:
    """`preexec_fn` of a `psp` that a test stops with Ctrl-C: SIGINT back to its default in the child. A test run
    started as a background job of a non-interactive shell ignores SIGINT, an ignored signal stays ignored across
    exec, and a Python started so never raises KeyboardInterrupt: the stage would run on to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_lpips():
    """LPIPS straight from the `lpips` package (AlexNet, v0.1 heads, random backbone drawn from the
    project's LPIPS seed): an independent second copy of what the stages call "random" LPIPS."""
    import lpips
    import torch

    from psp_core.evaluation.metrics import LPIPS_RANDOM_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LPIPS_RANDOM_SEED)
        net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    return net.eval().requires_grad_(False)


def per_image_metrics(outputs, targets, lpips_net) -> list[dict[str, float]]:
    """L2, LPIPS and MS-SSIM of each (output, target) pair, one image at a time, after clamping both to
    [-1, 1]: LPIPS by `lpips_net`, MS-SSIM by `pytorch_msssim` on [0, 1] images (5 scales)."""
    import torch
    from pytorch_msssim import ms_ssim

    values = []
    with torch.no_grad():
        outputs, targets = outputs.float().clamp(-1, 1), targets.float().clamp(-1, 1)
        for output, target in zip(outputs, targets):
            x, y = output[None], target[None]
            assert min(x.shape[-2:]) >= 161, "MS-SSIM with 5 scales needs a side over 160 px"
            values.append({
                "l2": float(((x - y) ** 2).mean()),
                "lpips": float(lpips_net(x, y)),
                "ms_ssim": float(ms_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, size_average=False)),
            })
    return values


def check_mixed_variants(net, rows: list[dict], mask: list[int], alpha: float | None, seed: int = 0) -> int:
    """Every style-mixed row (variant > 0) of `psp invert` keeps its image's code outside `mask` bit for bit
    and moves each `mask` layer toward (alpha None: onto) one code w = mapping(z), z drawn from the seed of
    (run seed, image id, variant); returns how many variants were checked."""
    import torch

    from pipelines.stages.invert_actor import seed_for

    by_id: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["variant"]] = row
    keep = [i for i in range(net.n_styles) if i not in mask]
    assert keep and mask, (keep, mask)
    checked = 0
    for image_id, variants in by_id.items():
        base = torch.tensor(variants[0]["latent"])
        codes = []
        for variant in sorted(v for v in variants if v > 0):
            mixed = torch.tensor(variants[variant]["latent"])
            assert torch.equal(mixed[keep], base[keep]), f"{image_id} variant {variant}: the kept layers changed"
            z = torch.randn(net.arch.style_dim, generator=torch.Generator().manual_seed(seed_for(seed, image_id, variant)))
            with torch.no_grad():
                w = net.decoder.style(z[None])[0]
            a = 1.0 if alpha is None else alpha
            expected = a * w.expand(len(mask), -1) + (1 - a) * base[mask]
            torch.testing.assert_close(mixed[mask], expected, rtol=1e-4, atol=1e-5)
            assert float((mixed[mask] - base[mask]).norm(dim=1).min()) > 0.05 * float(base[mask].norm(dim=1).min())
            codes.append(mixed[mask])
            checked += 1
        assert all(not torch.allclose(a, b) for i, a in enumerate(codes) for b in codes[i + 1:])
    return checked


def noisy_psp(arch: PSPArchitecture) -> PSPNetwork:
    """A random pSp (seed 0) whose noise strengths are non-zero, so every training step draws from the
    global RNG (what exact-resume tests must restore)."""
    torch.manual_seed(0)
    net = build_psp(arch, mean_latent_samples=1000)
    for name, p in net.decoder.named_parameters():
        if name.endswith("noise.weight"):
            p.data.fill_(0.05)
    return net


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Low-frequency images [n, 3, 256, 256] in [0, 1] that a 16 px generator can approach."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=256, mode="bicubic").clamp(0, 1)


def wait_until(condition: Callable[[], Any], proc: subprocess.Popen, timeout: float, what: str,
               log: Path | None = None, every: float = 0.2) -> Any:
    """Poll `condition()` until it is truthy and return its value; fail if the process `proc` ends or the
    time runs out first (with the end of its `log`, or of its stderr when it has no log file)."""
    def tail() -> str:
        if log is not None:
            return log.read_text()[-3000:]
        return proc.stderr.read()[-3000:] if proc.poll() is not None and proc.stderr else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"{proc.args[1:3]} ended (exit {proc.returncode}) before {what}: {tail()}"
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: {tail()}")


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every process below process `pid` (default: this one); none once it has ended."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def ray_actors(name: str, pid: int | None = None) -> list[psutil.Process]:
    """The processes of Ray actors of class `name` among the descendants of process `pid` (default: this one)."""
    actors = []
    for p in descendants(pid):
        try:
            if name in " ".join(p.cmdline()):
                actors.append(p)
        except psutil.Error:
            pass
    return actors


def ray_train_workers(pid: int | None = None) -> list[psutil.Process]:
    """The Ray Train worker actors among the descendants of process `pid` (default: this one)."""
    return ray_actors("RayTrainWorker", pid)
