"""`psp evaluate`: reconstruction quality of encoders on the test split of the shards.

Per image: L2, LPIPS, MS-SSIM and identity similarity of the 256px output against the 256px target,
plus seconds per image of the model forward; for ReStyle and HyperStyle encoders, at every refinement
step (the curves of their papers). Writes a DVC metrics file, a per-image CSV (DVC plots) and a
reconstruction grid; with `compare`, several models scored on the same images into one table
(JSON, Markdown) and a side-by-side grid. For registry references, the results also go onto each
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
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from pipelines.params.loading import load_section
from pipelines.params.schema import EvaluateConfig
from pipelines.services import storage, tracking
from pipelines.services.storage import atomic_path, write_json_atomic
from pipelines.services.tracking import METRICS, ResolvedModel, resolve_model
from psp_core.data.shards import ShardBatch, ShardManifest, iter_shard_batches
from psp_core.data.tensors import batch_pair
from psp_core.errors import InputError
from psp_core.evaluation.metrics import ArcFaceIdentity, MetricSuite, MetricTable, identity_backend, lpips_network
from psp_core.inference import InferenceModel, choose_device, scored
from psp_core.training.losses import require_alexnet
from psp_core.viz import reconstruction_grid

log = logging.getLogger(__name__)

GRID_IMAGES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes the `report`, `per_image` and `grid` files (with `compare`, also the comparison "
                     "table and grid). An id_similarity from dlib_resnet_v1 (used when the IR-SE50 file is absent) "
                     "is not comparable with ArcFace numbers; lpips_backbone=random gives values that are not "
                     "LPIPS. For models:/ references the results are also logged to each version's MLflow run "
                     "and set as eval_* version tags.")


def run(args: argparse.Namespace) -> int:
    cfg = load_section("evaluate", EvaluateConfig, args.overrides, args.params)
    report = evaluate(cfg)
    shown = ", ".join(f"{k}={_format(report[k])}" for k in (*METRICS, "seconds_per_image"))
    steps = f" after {report['n_iters']} refinement steps" if report["per_iteration"] else ""
    print(f"evaluated {report['model']} on {report['n_images']} {cfg.split} images{steps}: {shown} "
          f"(identity: {report['id_backend']}, LPIPS backbone: {report['lpips_backbone']})")
    if cfg.compare:
        print(f"comparison of {1 + len(cfg.compare)} models: {cfg.comparison.with_suffix('.md')}")
    if report["lpips_backbone"] == "random":
        print("note: LPIPS ran on a RANDOM AlexNet backbone: the lpips values are not LPIPS")
    return 0


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def limited(batches: Iterable[ShardBatch], max_images: int | None) -> Iterator[ShardBatch]:
    """The batches up to `max_images` rows in all (the last one cut short)."""
    seen = 0
    for batch in batches:
        if max_images is not None and seen + len(batch) > max_images:
            batch = batch.head(max_images - seen)
        if len(batch) == 0:
            return
        seen += len(batch)
        yield batch


@dataclass
class Scores:
    """One model's pass over the split: per-image metrics at every refinement step (one table for a
    single-pass encoder), forward time, and the grid's inputs and outputs (every step)."""

    tables: list[MetricTable] = field(default_factory=list)
    forward_seconds: float = 0.0
    grid_inputs: list[Tensor] = field(default_factory=list)
    grid_outputs: list[list[Tensor]] = field(default_factory=list)

    def keep_for_grid(self, inputs: Tensor, outputs: list[Tensor]) -> None:
        """Keep the first GRID_IMAGES inputs and their outputs at each step (on the CPU)."""
        room = GRID_IMAGES - sum(len(t) for t in self.grid_inputs)
        if room > 0:
            self.grid_inputs.append(inputs[:room].cpu())
            self.grid_outputs.append([o[:room].cpu() for o in outputs])

    def grid_rows(self) -> tuple[Tensor, list[Tensor]]:
        """The kept inputs [K, C, E, E] and one row of outputs per step, each [K, 3, 256, 256]."""
        steps = zip(*self.grid_outputs)
        return torch.cat(self.grid_inputs), [torch.cat(step) for step in steps]

    @property
    def final(self) -> MetricTable:
        """The table of the last refinement step: the encoder's answer."""
        return self.tables[-1]


def score_split(model: InferenceModel, batches: Iterable[ShardBatch], suite: MetricSuite, n_iters: int | None,
                total: int, name: str) -> Scores:
    """Run the model over every batch and collect per-image metrics (progress bar over batches)."""
    scores = Scores()
    for batch in tqdm(batches, total=total, desc=f"evaluate {name}", unit="batch"):
        source, target = model.prepare(*batch_pair(batch, model.input_kind))
        start = time.perf_counter()
        inversions = model.invert(source, n_iters)
        if source.device.type == "cuda":
            torch.cuda.synchronize(source.device)
        scores.forward_seconds += time.perf_counter() - start
        outputs = [scored(inversion.images) for inversion in inversions]
        if not scores.tables:
            scores.tables = [MetricTable() for _ in outputs]
        for table, output in zip(scores.tables, outputs):
            table.add(suite(output, target), batch.ids)
        scores.keep_for_grid(source, outputs)
    return scores


def finite_or_none(value: float) -> float | None:
    """JSON-safe metric value: NaN (no image had a value) becomes null."""
    return None if value is None or not math.isfinite(value) else float(value)


def dataset_id(manifest: ShardManifest, split: str, n_images: int, preset: str) -> str:
    """What the numbers were measured on: manifest digest, split, image count and preset (compared by promote)."""
    return f"{manifest.digest}/{split}/{n_images}/{preset}"


def metric_values(table: MetricTable) -> dict[str, float | None]:
    """The mean of each metric over the images (null where no image had a value)."""
    summary = table.summary()
    return {m: finite_or_none(summary[m]) for m in METRICS}


def model_report(cfg: EvaluateConfig, manifest: ShardManifest, model: ResolvedModel, inference: InferenceModel,
                 scores: Scores, identity_name: str, n_images: int) -> dict[str, Any]:
    """The DVC metrics file's content for one model: the final step's means, per-step means for an iterative
    encoder (ReStyle, HyperStyle)."""
    summary = scores.final.summary()
    per_iteration = ([{"iteration": i, **metric_values(t)} for i, t in enumerate(scores.tables, start=1)]
                     if inference.iterative else [])
    return {
        "model": model.pinned,
        "registered_model": model.version.name if model.version else None,
        "model_version": str(model.version.version) if model.version else None,
        "family": inference.net.arch.family,
        "n_iters": len(scores.tables),
        "preset": cfg.preset,
        "split": cfg.split,
        "n_images": n_images,
        **metric_values(scores.final),
        "per_iteration": per_iteration,
        "id_backend": identity_name,
        "lpips_backbone": cfg.lpips_backbone,
        **{f"{m}_missing": int(summary[f"{m}_missing"]) for m in METRICS},
        "seconds_per_image": scores.forward_seconds / n_images,
        "device": str(inference.device),
        "precision": inference.precision,
        "compiled": inference.compiled,
        "random_weights": ["lpips_alexnet"] if cfg.lpips_backbone == "random" else [],
        "dataset": dataset_id(manifest, cfg.split, n_images, cfg.preset),
    }


def write_per_image_csv(path: Path, table: MetricTable) -> None:
    """One row per image: id and the four metrics (an empty cell where a value is missing)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *METRICS])
        for row in table.rows():
            writer.writerow([row["id"], *("" if finite_or_none(row[m]) is None else repr(row[m]) for m in METRICS)])


def write_grid(path: Path, inputs: Tensor, rows: list[Tensor]) -> None:
    """A PNG of the inputs over each row of outputs."""
    image = reconstruction_grid(inputs, rows, GRID_IMAGES)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def comparison_markdown(reports: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table: one row per model (its final step), best value in bold."""
    columns = (*METRICS, "seconds_per_image")
    best = {}
    for c in columns:
        values = [r[c] for r in reports if r[c] is not None]
        best[c] = (max if tracking.higher_is_better(c) else min)(values) if values else None
    lines = ["| model | family | steps | " + " | ".join(columns) + " |", "|" + " --- |" * (3 + len(columns))]
    for r in reports:
        cells = [("**%.4g**" if r[c] == best[c] and len(reports) > 1 else "%.4g") % r[c] if r[c] is not None else "n/a"
                 for c in columns]
        lines.append(f"| {r['model']} | {r['family']} | {r['n_iters']} | " + " | ".join(cells) + " |")
    first = reports[0]
    lines.append(f"\n{first['n_images']} {first['split']} images ({first['dataset']}); identity: {first['id_backend']}; "
                 f"LPIPS backbone: {first['lpips_backbone']}. Lower is better except ms_ssim and id_similarity.")
    return "\n".join(lines) + "\n"


def write_comparison(prefix: Path, reports: list[dict[str, Any]], scores: list[Scores]) -> list[Path]:
    """`prefix`.json (every model's report), .md (the table) and .png (inputs, then each model's final output)."""
    json_path, md_path, png_path = (prefix.with_suffix(s) for s in (".json", ".md", ".png"))
    write_json_atomic(json_path, {"models": reports})
    with atomic_path(md_path) as tmp:
        tmp.write_text(comparison_markdown(reports))
    inputs, _ = scores[0].grid_rows()
    write_grid(png_path, inputs, [s.grid_rows()[1][-1] for s in scores])
    return [json_path, md_path, png_path]


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the configured model (and the `compare` models, on the same images), write the report,
    CSV and grid (and the comparison), and record each registry version's results. Returns the report."""
    # inputs
    storage.check_access(cfg.shards)
    source = storage.StageInput.of(cfg.shards)
    manifest = source.shards()
    available = manifest.rows.get(cfg.split, 0)
    if available == 0:
        raise InputError(f"{cfg.shards}: the {cfg.split} split is empty; nothing to evaluate")
    paths = source.shard_paths(verify=True)
    n_expected = min(available, cfg.max_images or available)
    models = [resolve_model(reference) for reference in (cfg.model, *cfg.compare)]
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    device = choose_device(cfg.device)
    networks = [InferenceModel.load(m.checkpoint, cfg.preset, str(device), cfg.precision, cfg.compile, cfg.compile_cache,
                                    n_expected, cfg.n_iters) for m in models]

    # metrics
    identity = identity_backend(cfg.irse50)
    if isinstance(identity, ArcFaceIdentity):
        identity.loss.to(device)
    suite = MetricSuite(lpips_network(cfg.lpips_backbone).to(device), identity)
    n_batches = math.ceil(n_expected / cfg.batch_size)
    scores = []
    for model, network in zip(models, networks):
        batches = limited(iter_shard_batches(paths, cfg.batch_size, split=cfg.split, source_kind=network.input_kind,
                                             filesystem=source.filesystem),
                          cfg.max_images)
        scores.append(score_split(network, batches, suite, cfg.n_iters, n_batches, model.pinned))
    n_images = int(scores[0].final.summary()["n_images"])
    reports = [model_report(cfg, manifest, m, n, s, identity.name, n_images) for m, n, s in zip(models, networks, scores)]
    if cfg.lpips_backbone == "random":
        log.warning("RANDOM WEIGHTS: lpips_alexnet runs on random weights: its metric is not comparable with "
                    "published numbers")

    # outputs
    report = reports[0]
    write_json_atomic(cfg.report, report)
    write_per_image_csv(cfg.per_image, scores[0].final)
    write_grid(cfg.grid, *scores[0].grid_rows())
    comparison = write_comparison(cfg.comparison, reports, scores) if cfg.compare else []
    if cfg.log_to_mlflow:
        for model, one in zip(models, reports):
            if model.version is not None:
                files = [cfg.report, cfg.per_image, cfg.grid] if one is report else []
                record(cfg, source, model, one, files + comparison)
    return report


def record(cfg: EvaluateConfig, source: storage.StageInput, model: ResolvedModel, report: dict[str, Any],
           files: list[Path]) -> None:
    """Log one registry version's evaluation: metrics (per refinement step as the metric's steps), counts,
    conditions, the data it read and the files."""
    metrics = {k: report[k] for k in (*METRICS, "seconds_per_image")}
    counts = {k: report[k] for k in ("n_images", *(f"{m}_missing" for m in METRICS))}
    conditions = {"dataset": report["dataset"], "id_backend": report["id_backend"],
                  "lpips_backbone": cfg.lpips_backbone, "preset": cfg.preset, "n_iters": str(report["n_iters"]),
                  "precision": report["precision"], "compiled": str(report["compiled"]).lower()}
    curve = [{m: step[m] for m in METRICS} for step in report["per_iteration"]]
    dataset = tracking.shard_datasets(source.location, source.shards())[cfg.split]
    tracking.record_evaluation(model.version, metrics, counts, conditions, files, dataset, curve)
    log.info("logged the evaluation to %s version %s (run %s)", model.version.name, model.version.version,
             model.version.run_id)
