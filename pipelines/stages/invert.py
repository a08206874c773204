"""`psp invert`: batch inversion of images into W+ with Ray Data and a registered (or file) encoder.

Input is a folder of Parquet shards (ours) or a folder of images (aligned first by the align
stage's code unless `aligned: true`). Iterative encoders (ReStyle, HyperStyle) store their last step's code
and image and each step's scores; HyperStyle's weight offsets are not stored but recomputed from the input image,
which its rows keep (`OFFSETS_NOT_STORED`).
Rows stream through an actor pool that loads the model once per actor; the driver writes one output
Parquet file per input unit (shard, or chunk of images), atomically, and skips a unit whose file was written
under the same unit key (model, the settings that change the output, the unit's input content:
`pipelines.services.ray.units.unit_key`): an interrupted run, rerun, writes each output exactly once, and a
changed setting or input redoes what it changes. Shard input and the output folder may be object-store URIs
(see pipelines.services.storage.objects); an image folder is local.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipelines.params.loading import load_section
from pipelines.params.schema import AlignConfig, InvertConfig
from pipelines.services import storage, tracking
from pipelines.services.ray import ActorPool, UnitCollector, connect, map_units
from pipelines.services.ray.units import UNIT_KEY_METADATA, output_metadata, output_settings, recorded_key, unit_key
from pipelines.services.storage import list_folder, write_json_atomic
from pipelines.services.tracking import resolve_model
from pipelines.stages.align import align_folder
from pipelines.stages.invert_actor import Inverter, read_unit
from psp_core.data.shards import MODEL_METADATA_KEY, TARGET_IMAGE, open_shard
from psp_core.errors import InputError
from psp_core.inference import InferenceModel, should_compile
from psp_core.options import HYPERSTYLE
from psp_core.runtime.devices import resolve_precision
from psp_core.training.losses import require_alexnet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputUnit:
    """One output file's worth of input: a shard file, or a chunk of image files."""

    name: str
    paths: tuple[str, ...]
    rows: int
    content: str   # digest of the unit's input: a shard's sha256, or an image chunk's names, sizes and mtimes


OFFSETS_NOT_STORED = (
    "not stored (about 0.15 GB per image for a 1024 px model): a HyperStyle image is its code decoded by a generator "
    "whose weights the hypernetwork offsets for that input image; each row keeps the input image's bytes "
    f"({TARGET_IMAGE}), and `psp edit` recomputes the offsets from the same input image with the same n_iters "
    "(InferenceModel.invert: Inversion.offsets) and decodes the edited codes with them (InferenceModel.decode)")
"""What the manifest of a HyperStyle inversion says under `weight_offsets`."""

IGNORED_SETTINGS = ("model", "input", "output_dir", "report", "images_per_file", "aligned")
"""Invert settings that do not enter a unit's key: the model enters resolved, the input as each unit's content."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Starts a local Ray instance unless RAY_ADDRESS is set. Outputs: one Parquet file per "
                     "input unit in invert.output_dir (id, variant, latent [n_styles x 512], reconstruction PNG, "
                     "l2, lpips, ms_ssim, error, model; for ReStyle and HyperStyle encoders the last of n_iters "
                     "steps, and per_iteration: every step's l2, lpips, ms_ssim), a manifest.json, and "
                     "invert.report. HyperStyle's weight offsets are not stored: an edit recomputes them from the input image.")


def run(args: argparse.Namespace) -> int:
    cfg = load_section("invert", InvertConfig, args.overrides, args.params)
    report = invert(cfg)
    print(f"inverted {report['images_written']} images ({report['units_skipped']} files already done) "
          f"into {cfg.output_dir} at {report['images_per_s']:.2f} images/s")
    return 0


def input_units(cfg: InvertConfig, source: storage.StageInput) -> list[InputUnit]:
    """The input split into output units: one per shard, or sorted image files in chunks. Every shard
    is checked first (bytes against the manifest's sha256, footer and columns), so a damaged file
    is one error naming it before any work starts."""
    if source.is_shards:
        units = []
        for path, entry in zip(source.shard_paths(verify=True), source.shards().shards):
            shard = open_shard(path, source.filesystem)
            rows = shard.metadata.num_rows
            if cfg.split is not None:
                splits = shard.read(columns=["split"]).column("split").to_pylist()
                rows = sum(s == cfg.split for s in splits)
            units.append(InputUnit(Path(str(path)).stem, (str(path),), rows, str(entry["sha256"])))
        return units
    if not source.location.is_local:
        raise InputError(f"invert.input {cfg.input}: not a shard folder (no manifest.json); an image folder must be local")
    folder = source.location.path
    if not folder.is_dir():
        raise FileNotFoundError(f"invert.input {cfg.input}: neither a shard folder (manifest.json) nor an image folder")
    names = list_folder(folder).images
    if not names:
        raise InputError(f"invert.input {cfg.input}: no image files")
    size = cfg.images_per_file
    return [InputUnit(f"images-{i // size:05d}", tuple(str(folder / n) for n in names[i:i + size]),
                      len(names[i:i + size]), files_fingerprint(folder, names[i:i + size]))
            for i in range(0, len(names), size)]


def files_fingerprint(folder: Path, names: list[str]) -> str:
    """Digest of a chunk of image files (their names in `folder`, sizes and modification times): an image added,
    removed or replaced changes it, without reading every image on the driver."""
    stats = []
    for name in names:
        try:
            info = (folder / name).stat()
            stats.append([name, info.st_size, info.st_mtime_ns])
        except OSError:
            stats.append([name, None, None])   # unreadable: a row error in the actor, keyed as such
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def aligned_copy(cfg: InvertConfig) -> InvertConfig:
    """For an unaligned image folder: run the align stage's code into output_dir/_aligned, invert that."""
    if storage.is_uri(cfg.output_dir):
        raise InputError(f"invert.output_dir {cfg.output_dir}: unaligned images are aligned into a local output "
                         "folder; align them first (or shard them) to write to an object store")
    target = cfg.output_dir / "_aligned"
    align_folder(AlignConfig(input_dir=str(cfg.input), output_dir=str(target),
                             report=str(cfg.output_dir / "_align.json")))
    return cfg.model_copy(update={"input": target, "aligned": True})


def unit_keys(cfg: InvertConfig, units: list[InputUnit], model_ref: str, family: str) -> dict[str, str]:
    """Each unit's key: the model, the settings that change its output file, and its input content (a HyperStyle
    file's also that its rows keep their input image, which earlier versions did not)."""
    stored = {"stored": [TARGET_IMAGE]} if family == HYPERSTYLE else {}
    settings = output_settings({**cfg.model_dump(mode="json"), **stored}, model_ref, IGNORED_SETTINGS)
    return {unit.name: unit_key(settings, unit.content) for unit in units}


def done_units(units: list[InputUnit], output_dir: storage.Location, keys: dict[str, str]) -> set[str]:
    """Units with rows whose output file exists and was written under the unit's key now (others are redone)."""
    present = set(storage.list_files(output_dir))
    return {unit.name for unit in units
            if unit.rows > 0 and f"{unit.name}.parquet" in present
            and recorded_key(output_dir / f"{unit.name}.parquet") == keys[unit.name]}


def remove_stale_outputs(folder: storage.Location, units: list[InputUnit]) -> None:
    """Output files of ours (a unit key, or an earlier version's model entry, in their metadata) that the manifest
    will not list: those of units with no rows now, or no longer in the input. Other files are never touched."""
    listed = {f"{u.name}.parquet" for u in units if u.rows > 0}
    for name in storage.list_files(folder):
        if "/" not in name and name.endswith(".parquet") and name not in listed and written_here(folder / name):
            storage.delete_file(folder / name)
            log.info("removed %s: no rows of the input are in it now", folder / name)


def invert(cfg: InvertConfig) -> dict[str, Any]:
    """Run the stage; returns (and writes) the report. The model and every input are checked before
    any work; the output folder is one this stage owns (a failed first run leaves none behind)."""
    # inputs
    storage.check_access(cfg.input)
    storage.check_access(cfg.output_dir, write=True)
    source = storage.StageInput.of(cfg.input)
    model = resolve_model(cfg.model)
    # strict, here: a wrong or damaged checkpoint, or one the preset cannot feed, fails before Ray starts
    checked = InferenceModel.load(model.checkpoint, cfg.preset, "cpu")
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    units = input_units(cfg, source)
    # outputs
    with storage.claimed_folder(cfg.output_dir, "invert") as folder:
        if not source.is_shards and not cfg.aligned:
            cfg = aligned_copy(cfg)
            source = storage.StageInput.of(cfg.input)
            units = input_units(cfg, source)
        return invert_units(cfg, source, folder, units, model.checkpoint, model.pinned, checked)


def invert_units(cfg: InvertConfig, source: storage.StageInput, folder: storage.Location, units: list[InputUnit],
                 checkpoint: Path, model_ref: str,
                 model: InferenceModel) -> dict[str, Any]:
    """Invert every unit not yet written for this model into the output folder `folder`."""
    if folder.is_local:
        storage.remove_own_temporaries(folder.path)   # left by a run that was killed mid-write
    family = model.net.arch.family
    keys = unit_keys(cfg, units, model_ref, family)
    skip = done_units(units, folder, keys)
    todo = [u for u in units if u.name not in skip and u.rows > 0]
    log.info("%d of %d output files to write (%d already done for %s)", len(todo), len(units), len(skip), model_ref)
    if todo or recorded_manifest_files(folder) != manifest_files(units, keys):
        storage.delete_file(folder / "manifest.json")   # it would describe files that are about to change
    remove_stale_outputs(folder, units)
    written, seconds, images = 0, 0.0, sum(u.rows for u in todo)
    if todo:
        connect(ActorPool.of(cfg).request("invert"))
        start = time.perf_counter()
        written = write_outputs(cfg, folder, inverted(cfg, source, todo, checkpoint, model_ref, images), todo, keys,
                                model_ref)
        seconds = time.perf_counter() - start
    manifest = {"model": model_ref, "family": family, "files": manifest_files(units, keys),
                "n_outputs": cfg.n_outputs, "n_iters": cfg.n_iters, "split": cfg.split,
                **({"weight_offsets": OFFSETS_NOT_STORED} if family == HYPERSTYLE else {})}
    storage.write_json_atomic(folder / "manifest.json", manifest)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")   # as the actors resolve them, on this hardware
    settings = {"precision": resolve_precision(cfg.precision, device),
                "compiled": should_compile(model.net, device, cfg.compile, images // cfg.num_actors, cfg.n_iters)}
    report = {"model": model_ref, **settings, "units": len(units), "units_skipped": len(skip), "images_written": written,
              "rows_written": written * (1 + cfg.n_outputs), "seconds": round(seconds, 3),
              "images_per_s": written / seconds if seconds else 0.0}
    write_json_atomic(cfg.report, report)
    if model_ref.startswith("models:/"):
        log_inversion(cfg, source, report)
    return report


def written_here(path: storage.Location) -> bool:
    """Whether a Parquet file in the output folder is an output file of this stage (by its schema metadata)."""
    return bool({UNIT_KEY_METADATA, MODEL_METADATA_KEY} & output_metadata(path).keys())


def manifest_files(units: list[InputUnit], keys: dict[str, str]) -> list[dict[str, Any]]:
    """The manifest's entries: every unit's file, its rows and the key it was written under (none without rows)."""
    return [{"file": f"{u.name}.parquet", "rows": u.rows, "key": keys[u.name] if u.rows else None} for u in units]


def recorded_manifest_files(folder: storage.Location) -> Any:
    """The file entries of the manifest an earlier run wrote (None: none, or unreadable)."""
    try:
        return json.loads(storage.read_bytes(folder / "manifest.json")).get("files")
    except (OSError, ValueError, AttributeError):
        return None


def log_inversion(cfg: InvertConfig, source: storage.StageInput, report: dict[str, Any]) -> None:
    """An MLflow run (experiment `psp-inversions`) for an inversion by a registered encoder: its settings,
    the shards it read (an MLflow dataset, context `inference`), speed and counts, the report."""
    params = {k: str(v) for k, v in cfg.model_dump(mode="json").items() if k != "model"} | {"model": report["model"]}
    tags = {tracking.MODEL_VERSION_TAG: report["model"], tracking.PRECISION_TAG: report["precision"],
            tracking.COMPILED_TAG: str(report["compiled"]).lower(), tracking.UNITS_SKIPPED_TAG: str(report["units_skipped"]),
            tracking.IMAGES_WRITTEN_TAG: str(report["images_written"])}
    dataset = None
    if source.is_shards:
        dataset = (tracking.shard_datasets(source.location, source.shards())[cfg.split or "total"], "inference")
    tracking.record_job(tracking.INVERT_EXPERIMENT, f"invert-{source.location.name}", params, tags,
                        {"images_per_s": report["images_per_s"]}, [cfg.report], dataset=dataset)


def inverted(cfg: InvertConfig, source: storage.StageInput, todo: list[InputUnit], checkpoint: Path, model_ref: str,
             n_images: int = 0):
    """The pending units' rows (one block per unit: each unit's results reach the driver, and its file is
    written, as soon as that unit is done) through the inversion actor pool (`n_images` in all: `compile:
    auto` decides on them): result batches as they finish."""
    items = [{"unit": u.name, "paths": list(u.paths)} for u in todo]
    reader = {"shards": source.is_shards, "split": cfg.split, "filesystem": source.filesystem,
              "columns": source.manifest.columns if source.manifest is not None else []}
    inverter = {"checkpoint": str(checkpoint), "cfg": cfg.model_dump(mode="json"), "model_ref": model_ref,
                "n_images": n_images}
    pool = ActorPool.of(cfg)
    return map_units(items, read_unit, Inverter, pool, read_kwargs=reader, actor_kwargs=inverter)


def write_outputs(cfg: InvertConfig, folder: storage.Location, batches, todo: list[InputUnit], keys: dict[str, str],
                  model_ref: str) -> int:
    """Stream the result `batches`, group them by unit, and write each unit's file once all its rows are in;
    returns the number of images inverted."""
    collector = UnitCollector({u.name: u.rows * (1 + cfg.n_outputs) for u in todo})
    written = 0
    with tqdm(total=sum(u.rows for u in todo), unit="img", desc="invert") as bar:
        for batch in batches:
            bar.update(sum(v == 0 for v in batch.column("variant").to_pylist()))
            for unit, rows in collector.add(batch):
                write_unit(folder / f"{unit}.parquet", rows, model_ref, keys[unit])
                written += rows.num_rows // (1 + cfg.n_outputs)
    collector.check_complete("inversion")
    return written


def write_unit(path: storage.Location, rows: pa.Table, model_ref: str, key: str) -> None:
    """One output file, rows sorted by (id, variant), model reference and unit key in the schema metadata,
    atomically (an earlier file of the unit is replaced whole)."""
    table = rows.drop(["unit"]).sort_by([("id", "ascending"), ("variant", "ascending")])
    table = table.replace_schema_metadata({MODEL_METADATA_KEY: model_ref.encode(), UNIT_KEY_METADATA: key.encode()})
    with storage.atomic_output(path) as out:
        pq.write_table(table, out, row_group_size=100)
