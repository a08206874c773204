"""`psp edit`: latent edits (InterFaceGAN, GANSpace, SeFa) of the W+ codes `psp invert` wrote, with Ray Data.

Input is invert's output folder: its manifest names the model that made the codes, and each of its
Parquet files is one unit here. Codes stream through an actor pool that loads the generator once per
actor and decodes every code at every strength of every direction; the driver writes the edited
images (PNG) as they arrive and each unit's edited latents (Parquet) once the unit is complete,
atomically, then one grid per direction. A unit already written under the same unit key (model, edits,
direction files, precision and the input file's bytes: `pipelines.services.ray.units.unit_key`) is skipped,
so an interrupted run, rerun, writes each output exactly once, and a changed setting or input redoes it. The input and the output
folder may be object-store URIs (see pipelines.services.storage.objects).

The codes are decoded by the generator of the model that made them: `edit.model` defaults to the
invert manifest's `models:/NAME/VERSION`; a manifest naming a checkpoint file (`file:NAME@sha256:...`)
needs `edit.model` set to that file, which is checked against the recorded hash. A HyperStyle model's codes are
decoded with their image's weight offsets, recomputed in the actors from the input image invert kept
(`target_image`); `edit.generator` decodes with another generator of the same architecture (domain adaptation).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from pipelines.params.loading import load_section
from pipelines.params.schema import SAFE_NAME, EditConfig
from pipelines.services import storage, tracking
from pipelines.services.ray import ActorPool, UnitCollector, connect, map_units
from pipelines.services.ray.units import UNIT_KEY_METADATA, output_metadata, output_settings, recorded_key, unit_key
from pipelines.services.storage import OUTPUT_MARKER, file_digest, write_json_atomic
from pipelines.services.tracking import ResolvedModel, resolve_model
from pipelines.stages.edit_actor import (
    GRIDS,
    IMAGE_PATH,
    LATENTS,
    Direction,
    Editor,
    check_codes,
    grid_path,
    read_codes,
)
from pipelines.stages.edit_directions import build_directions, direction_files
from psp_core import PSP, HyperStyle, load_generator, load_psp
from psp_core.data.shards import MODEL_METADATA_KEY, TARGET_IMAGE
from psp_core.errors import InputError
from psp_core.inference import keep_layers
from psp_core.inference.model import refine_iterations
from psp_core.nets.checkpoints import check_same_generator
from psp_core.viz import edit_grid

log = logging.getLogger(__name__)


LEGACY_KEY_METADATA = b"psp.edit"   # where earlier versions recorded an output file's key: still ours
IGNORED_SETTINGS = ("input", "output_dir", "report", "model", "generator", "grid_images", "grid_tile")
"""Edit settings that do not enter a unit's key: paths, the model and generator (they enter resolved, by their
bytes) and the grids' layout."""


@dataclass(frozen=True)
class EditUnit:
    """One input Parquet file of invert and the edit output file made from it."""

    name: str
    path: storage.Location
    ids: tuple[str, ...]   # the codes to edit: variant 0 rows without an error
    key: str


@dataclass(frozen=True)
class InvertedFolder:
    """What an invert output folder holds: the model that made the codes, the refinement steps it ran (a HyperStyle
    edit recomputes the weight offsets with as many) and its Parquet files."""

    folder: storage.Location
    model: str
    n_iters: int | None
    files: tuple[storage.Location, ...]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Starts a local Ray instance unless RAY_ADDRESS is set. Reads invert's output folder; writes into "
                     "edit.output_dir: images/DIRECTION/ID_STRENGTH.png, latents/UNIT.parquet (id, edit, kind, "
                     "direction, index, strength, latent [n_styles x 512], image), grids/DIRECTION.png (rows = codes, "
                     "columns = strengths) and manifest.json; edit.report. The shipped directions (age, smile, pose, "
                     "ganspace ffhq) fit only the FFHQ 1024 px generator; SeFa fits any. HyperStyle codes are decoded "
                     "with their image's weight offsets, recomputed from the input image invert kept; edit.generator "
                     "decodes with a fine-tuned copy of the generator instead (domain adaptation).")


def run(args: argparse.Namespace) -> int:
    cfg = load_section("edit", EditConfig, args.overrides, args.params)
    report = edit(cfg)
    grids = ", ".join(str(storage.Location.of(cfg.output_dir) / d["grid"]) for d in report["directions"][:3])
    more = f" and {len(report['directions']) - 3} more" if len(report["directions"]) > 3 else ""
    print(f"edited {report['codes_edited']} codes into {report['images_written']} images "
          f"({report['units_skipped']} files already done) in {cfg.output_dir}; grids: {grids}{more}")
    return 0


def read_inversion(path: str | Path) -> InvertedFolder:
    """The invert output folder's manifest, checked: the folder is invert's, and every file it lists with
    rows is there and was written by the manifest's model (a half-rerun inversion is refused)."""
    folder = storage.Location.of(path)
    if not storage.exists(folder):
        raise FileNotFoundError(f"edit.input {folder} not found: run `psp invert` first")
    try:
        owner = json.loads(storage.read_bytes(folder / OUTPUT_MARKER))["stage"]
        manifest = json.loads(storage.read_bytes(folder / "manifest.json"))
        model, entries = str(manifest["model"]), [(e["file"], int(e["rows"])) for e in manifest["files"]]
        n_iters = manifest.get("n_iters")
        if n_iters is not None and (isinstance(n_iters, bool) or not isinstance(n_iters, int)):
            raise ValueError(n_iters)
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"edit.input {folder}: not a finished `psp invert` output (no readable manifest.json)") from None
    if owner != "invert":
        raise InputError(f"edit.input {folder} is the output folder of `psp {owner}`, not of `psp invert`")
    root = storage.Location.of(folder.path.resolve()) if folder.is_local else folder   # absolute: for the Ray workers
    keys = {str(e["file"]): e.get("key") for e in manifest["files"] if isinstance(e, dict)}
    files = []
    for name, rows in entries:
        path = root / name
        if rows == 0:
            continue
        try:
            written_by = (storage.parquet_schema(path).metadata or {}).get(MODEL_METADATA_KEY, b"").decode()
        except FileNotFoundError:
            raise InputError(f"{path}: listed in {folder / 'manifest.json'} but missing; rerun `psp invert`") from None
        except (OSError, pa.ArrowException):
            raise InputError(f"{path}: not a readable Parquet file; rerun `psp invert`") from None
        if written_by != model:
            raise InputError(f"{path} was written by {written_by or 'an unknown model'}, the manifest names {model}: "
                             "finish `psp invert` first")
        if keys.get(name) is not None and recorded_key(path) != keys[name]:
            raise InputError(f"{path} is not the file {folder / 'manifest.json'} describes (another run's settings "
                             "or input): rerun `psp invert`")
        files.append(path)
    return InvertedFolder(folder, model, n_iters, tuple(files))


def edit_model(cfg: EditConfig, inversion: InvertedFolder) -> ResolvedModel:
    """The model whose generator decodes the codes: the one that made them, by reference or checked by hash."""
    if cfg.model is None:
        if not inversion.model.startswith("models:/"):
            raise InputError(f"the codes in {inversion.folder} were made by {inversion.model}: set edit.model to that "
                             "checkpoint file")
        return resolve_model(inversion.model)
    model = resolve_model(cfg.model)
    if model.pinned != inversion.model:
        raise InputError(f"edit.model {cfg.model} is {model.pinned}, but the codes in {inversion.folder} were made by "
                         f"{inversion.model}; they decode only with that model's generator")
    return model


def adapted_generator(cfg: EditConfig, net: PSP | HyperStyle) -> Path | None:
    """Domain adaptation's generator (`edit.generator`) as a local file, checked to decode in place of the model's
    own; None without one. `edit.offset_layers` is checked against the model here too."""
    if cfg.offset_layers is not None:
        if not isinstance(net, HyperStyle):
            raise InputError(f"edit.offset_layers keeps some of HyperStyle's weight offsets; this model is "
                             f"{net.arch.family}, which has none")
        keep_layers([None] * len(net.decoder.modulated_convs()), cfg.offset_layers)
    if cfg.generator is None:
        return None
    path = tracking.fetch_weights(cfg.generator)
    check_same_generator(load_generator(path), net.decoder, cfg.generator)
    return path


def edit_settings(model_ref: str, cfg: EditConfig, generator: Path | None = None) -> dict[str, Any]:
    """What decides the edited outputs besides each input file (`output_settings`): the model, the edits, the
    precision of the decode (as resolved on this hardware) and the bytes of every direction file and of the
    domain adaptation's generator."""
    files = {name: file_digest(path) for name, path in direction_files(cfg).items()}
    if generator is not None:
        files["generator"] = file_digest(generator)
    return output_settings({**cfg.model_dump(mode="json"), "direction_files": files}, model_ref, IGNORED_SETTINGS)


def plan_units(inversion: InvertedFolder, settings: dict[str, Any]) -> list[EditUnit]:
    """Each input file as a unit: the ids of its codes (variant 0, no error) and its own key (`settings` + its bytes)."""
    units = []
    for path in inversion.files:
        table = storage.parquet_columns(path, ["id", "variant", "error"])
        keep = pc.and_(pc.equal(table.column("variant"), 0), pc.is_null(table.column("error")))
        ids = tuple(table.filter(keep).column("id").to_pylist())
        bad = next((i for i in ids if not re.match(SAFE_NAME, i)), None)
        if bad is not None:
            raise InputError(f"{path}: id {bad!r} cannot name an image file")
        units.append(EditUnit(Path(path.name).stem, path, ids, unit_key(settings, storage.digest(path))))
    return units


def edit(cfg: EditConfig) -> dict[str, Any]:
    """Run the stage; returns (and writes) the report. The input, the model and every direction are checked
    before any work; the output folder is one this stage owns (a failed first run leaves none behind)."""
    storage.check_access(cfg.input)
    storage.check_access(cfg.output_dir, write=True)
    inversion = read_inversion(cfg.input)
    model = edit_model(cfg, inversion)     # pinned to inversion.model from here on
    net = load_psp(model.checkpoint)
    for path in inversion.files:
        check_codes(path, net.n_styles, with_targets=isinstance(net, HyperStyle))
    generator = adapted_generator(cfg, net)
    directions = build_directions(cfg, net.decoder, net.n_styles)
    units = plan_units(inversion, edit_settings(inversion.model, cfg, generator))
    if not any(u.ids for u in units):
        raise InputError(f"edit.input {cfg.input}: no codes to edit (no image of the inversion has a code)")
    decoding = Decoding(model, generator, refine_iterations(inversion.n_iters) if isinstance(net, HyperStyle) else None)
    with storage.claimed_folder(cfg.output_dir, "edit") as out:
        return edit_units(cfg, out, units, directions, decoding, inversion.model)


@dataclass(frozen=True)
class Decoding:
    """What the edited codes are decoded with: the model, the domain adaptation's generator (None: the model's own)
    and, for HyperStyle, the refinement steps its weight offsets are recomputed with (invert's; None otherwise)."""

    model: ResolvedModel
    generator: Path | None
    offset_steps: int | None

    def describe(self, cfg: EditConfig) -> dict[str, Any]:
        """What the manifest and report say about the decoding: the generator (null: the model's own) and, for
        HyperStyle, how the weight offsets were had."""
        described: dict[str, Any] = {"generator": None if cfg.generator is None else str(cfg.generator)}
        if self.offset_steps is not None:
            layers = "every tuned layer" if cfg.offset_layers is None else f"layers {cfg.offset_layers}"
            described["weight_offsets"] = (f"recomputed from each image's {TARGET_IMAGE} in {self.offset_steps} "
                                           f"steps, as invert ran; applied at {layers}")
        return described


def edit_units(cfg: EditConfig, out: storage.Location, units: list[EditUnit], directions: list[Direction],
               decoding: Decoding, model_ref: str) -> dict[str, Any]:
    """Edit every unit not yet written for its key into the output folder `out`, then the grids, manifest,
    report (and MLflow run)."""
    if out.is_local:
        storage.remove_own_temporaries(out.path, recursive=True)   # left by a run that was killed mid-write
    remove_stale_units(out, {u.name for u in units if u.ids})
    present = set(storage.list_files(out))
    skip = {u.name for u in units if unit_done(out, u, present)}
    todo = [u for u in units if u.name not in skip and u.ids]
    log.info("%d of %d output files to write (%d already done)", len(todo), len(units), len(skip))
    written, seconds = 0, 0.0
    if todo:
        connect(ActorPool.of(cfg).request("edit"))
        start = time.perf_counter()
        decodes = sum(len(u.ids) for u in todo) * sum(len(d.strengths) for d in directions)
        written = write_outputs(out, edited(cfg, todo, directions, decoding, decodes), todo, directions,
                                model_ref)
        seconds = time.perf_counter() - start
    grid_ids = sorted({i for u in units for i in u.ids})[:cfg.grid_images]
    grids = write_grids(out, directions, grid_ids, cfg.grid_tile)
    manifest = {"model": model_ref, "input": str(cfg.input), **decoding.describe(cfg),
                "directions": [d.describe() for d in directions],
                "files": [{"file": f"{LATENTS}/{u.name}.parquet", "codes": len(u.ids)} for u in units if u.ids]}
    if recorded_manifest(out) != manifest:
        storage.write_json_atomic(out / "manifest.json", manifest)
    report = {"model": model_ref, "input": str(cfg.input), "output_dir": str(out), **decoding.describe(cfg),
              "directions": [d.describe() for d in directions], "units": len(units), "units_skipped": len(skip),
              "codes_edited": sum(len(u.ids) for u in todo), "images_written": written,
              "grids_written": grids, "seconds": round(seconds, 3),
              "images_per_s": written / seconds if seconds else 0.0}
    write_json_atomic(cfg.report, report)
    if decoding.model.version is not None:
        log_edits(cfg, out, report)
    return report


def unit_done(out: storage.Location, unit: EditUnit, present: set[str]) -> bool:
    """Whether a unit's output file exists, was made for this unit's key, and every image it lists is there
    (`present`: the files in `out`, relative to it)."""
    name = f"{LATENTS}/{unit.name}.parquet"
    if name not in present:
        return False
    if recorded_key(out / name) != unit.key:
        return False
    try:
        images = storage.parquet_columns(out / name, ["image"]).column("image").to_pylist()
    except (OSError, pa.ArrowException):
        return False
    return all(image in present for image in images)


def is_ours(path: storage.Location) -> bool:
    """Whether a Parquet file is an edit output file (its metadata holds a unit key, or an earlier version's)."""
    return bool({UNIT_KEY_METADATA, LEGACY_KEY_METADATA} & output_metadata(path).keys())


def listed_images(path: storage.Location) -> set[str]:
    """The images an edit output file of ours lists (none for a file that is missing, unreadable or not ours)."""
    if not is_ours(path):
        return set()
    try:
        images = storage.parquet_columns(path, ["image"]).column("image").to_pylist()
    except (OSError, pa.ArrowException):
        return set()
    return {image for image in images if isinstance(image, str) and IMAGE_PATH.match(image)}


def remove_stale_units(out: storage.Location, current: set[str]) -> None:
    """Output files of units the input no longer has, with the images they list (ours by their metadata)."""
    for name in storage.list_files(out / LATENTS):
        path = out / LATENTS / name
        if "/" not in name and name.endswith(".parquet") and Path(name).stem not in current and is_ours(path):
            for image in listed_images(path):
                storage.delete_file(out / image)
            storage.delete_file(path)
            log.info("removed %s: its input file is gone", path)


def edited(cfg: EditConfig, todo: list[EditUnit], directions: list[Direction], decoding: Decoding, n_images: int):
    """The pending units' codes through the editing actor pool (`n_images` decodes in all: `compile: auto`
    decides on them): result batches as they finish."""
    items = [{"unit": u.name, "path": str(u.path), "targets": decoding.offset_steps is not None} for u in todo]
    editor = {"checkpoint": str(decoding.model.checkpoint), "directions": directions, "batch_size": cfg.batch_size,
              "use_gpu": cfg.use_gpu, "cpus": cfg.cpus_per_actor, "precision": cfg.precision, "compile": cfg.compile,
              "compile_cache": cfg.compile_cache, "n_images": n_images // cfg.num_actors,
              "generator": None if decoding.generator is None else str(decoding.generator),
              "offset_steps": decoding.offset_steps, "offset_layers": cfg.offset_layers}
    pool = ActorPool.of(cfg)
    return map_units(items, read_codes, Editor, pool, actor_kwargs=editor)


def write_outputs(out: storage.Location, batches, todo: list[EditUnit], directions: list[Direction], model_ref: str) -> int:
    """Stream the result `batches` into `out`: write each edited image as it arrives and each unit's latents
    file once all its rows are in; returns the number of images written."""
    per_code = sum(len(d.strengths) for d in directions)
    units = {u.name: u for u in todo}
    collector = UnitCollector({u.name: len(u.ids) * per_code for u in todo})
    written = 0
    with tqdm(total=sum(collector.expected.values()), unit="img", desc="edit") as bar:
        for batch in batches:
            for image, png in zip(batch.column("image").to_pylist(), batch.column("png").to_pylist()):
                storage.write_bytes_atomic(out / image, png)
            written += batch.num_rows
            bar.update(batch.num_rows)
            for unit, rows in collector.add(batch.drop(["png"])):
                write_unit(out, units[unit], rows, model_ref)
    collector.check_complete("editing")
    return written


def write_unit(out: storage.Location, unit: EditUnit, rows: pa.Table, model_ref: str) -> None:
    """One unit's latents file, rows sorted by (id, direction, strength), model and key in the schema metadata,
    atomically; then the images an earlier version of the file listed and this one does not are removed."""
    path = out / LATENTS / f"{unit.name}.parquet"
    previous = listed_images(path)
    table = rows.drop(["unit"]).sort_by(
        [("id", "ascending"), ("direction", "ascending"), ("strength", "ascending")])
    table = table.replace_schema_metadata({MODEL_METADATA_KEY: model_ref.encode(), UNIT_KEY_METADATA: unit.key.encode()})
    with storage.atomic_output(path) as stream:
        pq.write_table(table, stream, row_group_size=100)
    for image in previous - set(table.column("image").to_pylist()):
        storage.delete_file(out / image)


def write_grids(out: storage.Location, directions: list[Direction], ids: list[str], tile: int) -> list[str]:
    """One grid per direction (rows = `ids`, columns = strengths) from the edited images written; a grid is
    rewritten only when its picture changed, and grids of directions no longer configured are removed.
    Returns the grids written."""
    current = {d.name for d in directions}
    for old in recorded_directions(out) - current:
        storage.delete_file(out / grid_path(old))
    written = []
    for direction in directions:
        if not ids:
            break
        paths = [[out / direction.image_path(i, k) for k in range(len(direction.strengths))] for i in ids]
        cells = [[np.asarray(Image.open(io.BytesIO(storage.read_bytes(p))).convert("RGB")) for p in row] for row in paths]
        images = torch.from_numpy(np.stack([np.stack(row) for row in cells])).permute(0, 1, 4, 2, 3)   # [R, C, 3, H, W]
        buffer = io.BytesIO()
        edit_grid(images.float() / 127.5 - 1, tile).save(buffer, format="PNG")
        path = out / grid_path(direction.name)
        try:
            unchanged = storage.read_bytes(path) == buffer.getvalue()
        except OSError:
            unchanged = False
        if not unchanged:
            storage.write_bytes_atomic(path, buffer.getvalue())
            written.append(grid_path(direction.name))
    return written


def recorded_manifest(out: storage.Location) -> dict[str, Any] | None:
    """The output folder's manifest from an earlier run (None when there is none, or it is unreadable)."""
    try:
        manifest = json.loads(storage.read_bytes(out / "manifest.json"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def recorded_directions(out: storage.Location) -> set[str]:
    """The direction names an earlier run's manifest lists (their grids are this stage's files)."""
    try:
        names = {str(d["name"]) for d in (recorded_manifest(out) or {}).get("directions", [])}
    except (KeyError, TypeError):
        return set()
    return {name for name in names if re.match(SAFE_NAME, name)}


def log_edits(cfg: EditConfig, out: storage.Location, report: dict[str, Any]) -> None:
    """An MLflow run (experiment `psp-edits`) for edits decoded by a registered model's generator: the edits,
    the model version, the grids and the report."""
    settings = cfg.model_dump(mode="json", exclude={"edits", "model"})
    params = ({k: str(v) for k, v in settings.items()} | {"model": report["model"]}
              | {f"edit_{i}": json.dumps(e) for i, e in enumerate(cfg.model_dump(mode="json")["edits"])})
    tags = {tracking.MODEL_VERSION_TAG: report["model"], tracking.UNITS_SKIPPED_TAG: str(report["units_skipped"]),
            tracking.IMAGES_WRITTEN_TAG: str(report["images_written"])}
    tracking.record_job(tracking.EDIT_EXPERIMENT, f"edit-{storage.Location.of(cfg.input).name}", params, tags,
                        {"images_per_s": report["images_per_s"]}, [cfg.report], folders={GRIDS: out / GRIDS})
