"""`psp evaluate`: reconstruction quality of an encoder on the test split of the shards.

Per image: L2, LPIPS, MS-SSIM and identity similarity of the 256px output against the 256px target,
plus seconds per image of the model forward. Writes a DVC metrics file, a per-image CSV (DVC plots)
and a reconstruction grid. When the model is a registry reference, the results also go onto the
version's MLflow run and into `eval_*` version tags, which `psp promote --if-better` compares.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from pipelines.config import load_section
from pipelines.sections import EvaluateConfig
from pipelines.io import atomic_path, file_digest, write_json_atomic
from pipelines.tracking import resolve_model
from psp_core import PSP, load_psp
from psp_core.errors import InputError
from psp_core.losses import require_alexnet
from psp_core.metrics import (
    ArcFaceIdentity, MetricSuite, MetricTable, identity_backend, lpips_network, reconstruction_grid,
)
from psp_core.presets import PresetTransform, TaskPreset, get_preset
from psp_core.shards import MANIFEST_FILE, ShardBatch, iter_shard_batches, read_manifest, shard_paths

log = logging.getLogger(__name__)

METRICS = ("l2", "lpips", "ms_ssim", "id_similarity")
GRID_IMAGES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    keys = ", ".join(EvaluateConfig.model_fields)
    parser.epilog = (f"Keys of the evaluate section: {keys}. "
                     "Writes the `report`, `per_image` and `grid` files. An id_similarity "
                     "from dlib_resnet_v1 (used when the IR-SE50 file is absent) is not comparable with ArcFace "
                     "numbers; lpips_backbone=random gives values that are not LPIPS. For a models:/ reference "
                     "the results are also logged to the version's MLflow run and set as eval_* version tags.")


def run(args: argparse.Namespace) -> int:
    cfg = load_section("evaluate", EvaluateConfig, args.overrides, args.params)
    report = evaluate(cfg)
    shown = ", ".join(f"{k}={_format(report[k])}" for k in (*METRICS, "seconds_per_image"))
    print(f"evaluated {report['model']} on {report['n_images']} {cfg.split} images: {shown} "
          f"(identity: {report['id_backend']}, LPIPS backbone: {report['lpips_backbone']})")
    if report["lpips_backbone"] == "random":
        print("note: LPIPS ran on a RANDOM AlexNet backbone: the lpips values are not LPIPS")
    return 0


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def pick_device(choice: str) -> torch.device:
    """`auto`: CUDA when available, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("evaluate.device=cuda but no CUDA device is available")
    return torch.device(choice)


def batch_pair(batch: ShardBatch, preset: TaskPreset) -> tuple[Tensor, Tensor]:
    """(source, target) uint8 [N, C, H, W] of a shard batch: the paired source image when the shards
    have one (first channel only for sketches), else the target itself."""
    target = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
    if batch.source_images is None:
        return target, target
    source = torch.from_numpy(batch.source_images).permute(0, 3, 1, 2)
    return (source[:, :1] if preset.input_kind == "sketch" else source), target


def limited(batches: Iterator[ShardBatch], max_images: int | None) -> Iterator[ShardBatch]:
    """The batches up to `max_images` rows in all (the last one cut short)."""
    seen = 0
    for batch in batches:
        if max_images is not None and seen + len(batch) > max_images:
            keep = max_images - seen
            batch = ShardBatch(batch.ids[:keep], batch.images[:keep],
                               None if batch.landmarks is None else batch.landmarks[:keep],
                               None if batch.source_images is None else batch.source_images[:keep],
                               batch.source_paths[:keep], batch.splits[:keep])
        if len(batch) == 0:
            return
        seen += len(batch)
        yield batch


@dataclass
class Scores:
    """What one pass over the split produced: per-image metrics, forward time, and the grid's images."""

    table: MetricTable = field(default_factory=MetricTable)
    forward_seconds: float = 0.0
    grid_inputs: list[Tensor] = field(default_factory=list)
    grid_outputs: list[Tensor] = field(default_factory=list)

    def keep_for_grid(self, inputs: Tensor, outputs: Tensor) -> None:
        """Keep the first GRID_IMAGES input/output pairs (on the CPU)."""
        room = GRID_IMAGES - sum(len(t) for t in self.grid_inputs)
        if room > 0:
            self.grid_inputs.append(inputs[:room].cpu())
            self.grid_outputs.append(outputs[:room].cpu())


def timed_forward(net: PSP, source: Tensor) -> tuple[Tensor, float]:
    """The 256px reconstruction (fixed noise, as the reference inference) and the forward's wall seconds."""
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    start = time.perf_counter()
    output = net(source, resize=True, randomize_noise=False)
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    return output, time.perf_counter() - start


def score_split(net: PSP, batches: Iterator[ShardBatch], transform: PresetTransform, suite: MetricSuite,
                device: torch.device, total: int) -> Scores:
    """Run the model over every batch and collect per-image metrics (progress bar over batches)."""
    scores = Scores()
    rng = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in tqdm(batches, total=total, desc="evaluate", unit="batch"):
            source, target = transform(*batch_pair(batch, transform.preset), rng)
            source, target = source.to(device), target.to(device)
            output, seconds = timed_forward(net, source)
            scores.forward_seconds += seconds
            scores.table.add(suite(output, target), batch.ids)
            scores.keep_for_grid(source, output)
    return scores


def finite_or_none(value: float) -> float | None:
    """JSON-safe metric value: NaN (no image had a value) becomes null."""
    return None if value is None or not math.isfinite(value) else float(value)


def dataset_id(shards: Path, split: str, n_images: int, preset: str) -> str:
    """What the numbers were measured on: manifest hash, split, image count and preset (compared by promote)."""
    digest = file_digest(shards / MANIFEST_FILE)[:16]
    return f"{digest}/{split}/{n_images}/{preset}"


def write_per_image_csv(path: Path, table: MetricTable) -> None:
    """One row per image: id and the four metrics (an empty cell where a value is missing)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *METRICS])
        for row in table.rows():
            writer.writerow([row["id"], *("" if finite_or_none(row[m]) is None else repr(row[m]) for m in METRICS)])


def write_grid(path: Path, scores: Scores) -> None:
    """The reconstruction grid PNG: inputs over outputs."""
    image = reconstruction_grid(torch.cat(scores.grid_inputs), torch.cat(scores.grid_outputs), GRID_IMAGES)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the configured model on the split, write the report, CSV and grid, and (for a
    registry reference with log_to_mlflow) record the results on the model version. Returns the report."""
    preset = get_preset(cfg.preset)
    if preset.input_kind == "segmentation":
        raise InputError(f"evaluate does not support preset {cfg.preset}: label-map sources are not decoded here")
    manifest = read_manifest(cfg.shards)
    available = manifest["rows"].get(cfg.split, 0)
    if available == 0:
        raise InputError(f"{cfg.shards}: the {cfg.split} split is empty; nothing to evaluate")
    paths = shard_paths(cfg.shards, verify=True)
    n_expected = min(available, cfg.max_images or available)

    model = resolve_model(cfg.model)
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    device = pick_device(cfg.device)
    net = load_psp(model.checkpoint, device)
    if net.arch.input_nc != preset.input_nc:
        raise InputError(f"{cfg.model} takes {net.arch.input_nc}-channel input; preset {cfg.preset} "
                         f"gives {preset.input_nc} channels")
    identity = identity_backend(cfg.irse50)
    if isinstance(identity, ArcFaceIdentity):
        identity.loss.to(device)
    suite = MetricSuite(lpips_network(cfg.lpips_backbone).to(device), identity)
    transform = PresetTransform(preset, net.arch.encoder_input_size, train=False)
    batches = limited(iter_shard_batches(paths, cfg.batch_size, split=cfg.split), cfg.max_images)
    scores = score_split(net, batches, transform, suite, device, math.ceil(n_expected / cfg.batch_size))

    summary = scores.table.summary()
    n_images = int(summary["n_images"])
    random_weights = ["lpips_alexnet"] if cfg.lpips_backbone == "random" else []
    report: dict[str, Any] = {
        "model": model.pinned,
        "registered_model": model.version.name if model.version else None,
        "model_version": str(model.version.version) if model.version else None,
        "preset": cfg.preset,
        "split": cfg.split,
        "n_images": n_images,
        **{m: finite_or_none(summary[m]) for m in METRICS},
        "id_backend": identity.name,
        "lpips_backbone": cfg.lpips_backbone,
        **{f"{m}_missing": int(summary[f"{m}_missing"]) for m in METRICS},
        "seconds_per_image": scores.forward_seconds / n_images,
        "device": str(device),
        "random_weights": random_weights,
        "dataset": dataset_id(cfg.shards, cfg.split, n_images, cfg.preset),
    }
    for name in random_weights:
        log.warning("RANDOM WEIGHTS: %s runs on random weights: its metric is not comparable with published numbers",
                    name)
    write_json_atomic(cfg.report, report)
    write_per_image_csv(cfg.per_image, scores.table)
    write_grid(cfg.grid, scores)
    if model.version is not None and cfg.log_to_mlflow:
        from pipelines.tracking import record_evaluation

        from pipelines.lineage import shard_datasets

        metrics = {k: report[k] for k in (*METRICS, "seconds_per_image")}
        counts = {k: report[k] for k in ("n_images", *(f"{m}_missing" for m in METRICS))}
        conditions = {"dataset": report["dataset"], "id_backend": identity.name,
                      "lpips_backbone": cfg.lpips_backbone, "preset": cfg.preset}
        dataset = shard_datasets(cfg.shards, manifest)[cfg.split]
        record_evaluation(model.version, metrics, counts, conditions, [cfg.report, cfg.per_image, cfg.grid], dataset)
        log.info("logged the evaluation to %s version %s (run %s)", model.version.name, model.version.version,
                 model.version.run_id)
    return report
