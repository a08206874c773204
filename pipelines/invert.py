"""`psp invert`: batch inversion of images into W+ with Ray Data and a registered (or file) encoder.

Input is a folder of Parquet shards (ours) or a folder of images (aligned first by the align
stage's code unless `aligned: true`). Rows stream through an actor pool that loads the model
once per actor; the driver writes one output Parquet file per input unit (shard, or chunk of
images), atomically, and skips units already written for the same model: an interrupted run,
rerun, writes each output exactly once. Shard input and the output folder may be object-store URIs
(see pipelines.storage); an image folder is local.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines import storage
from pipelines.config import load_section
from pipelines.sections import InvertConfig
from pipelines.io import list_folder, write_json_atomic
from pipelines.tracking import resolve_model
from psp_core.inference import InferenceModel
from psp_core.errors import InputError
from psp_core.losses import require_alexnet
from psp_core.shards import (
    LATENT_TYPE, MODEL_METADATA_KEY, has_paired_sources, is_shard_folder, png_bytes, read_manifest,
)

log = logging.getLogger(__name__)

INVERT_EXPERIMENT = "psp-inversions"


@dataclass(frozen=True)
class Unit:
    """One output file's worth of input: a shard file, or a chunk of image files."""

    name: str
    paths: tuple[str, ...]
    rows: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Starts a local Ray instance unless RAY_ADDRESS is set. Outputs: one Parquet file per "
                     "input unit in invert.output_dir (id, variant, latent [n_styles x 512], reconstruction PNG, "
                     "l2, lpips, ms_ssim, error, model; for ReStyle encoders the last of n_iters steps), "
                     "a manifest.json, and invert.report.")


def run(args: argparse.Namespace) -> int:
    cfg = load_section("invert", InvertConfig, args.overrides, args.params)
    report = invert(cfg)
    print(f"inverted {report['images_written']} images ({report['units_skipped']} files already done) "
          f"into {cfg.output_dir} at {report['images_per_s']:.2f} images/s")
    return 0


def input_units(cfg: InvertConfig) -> list[Unit]:
    """The input split into output units: one per shard, or sorted image files in chunks. Every shard
    is checked first (bytes against the manifest's sha256, footer and columns), so a damaged file
    is one error naming it before any work starts."""
    from psp_core.shards import open_shard, shard_paths

    if shard_input(cfg):
        filesystem, shard_dir = storage.reader_filesystem(cfg.input)
        units = []
        for path in shard_paths(shard_dir, verify=True, filesystem=filesystem):
            shard = open_shard(path, filesystem)
            rows = shard.metadata.num_rows
            if cfg.split is not None:
                splits = shard.read(columns=["split"]).column("split").to_pylist()
                rows = sum(s == cfg.split for s in splits)
            units.append(Unit(Path(str(path)).stem, (str(path),), rows))
        return units
    if storage.is_uri(cfg.input):
        raise InputError(f"invert.input {cfg.input}: not a shard folder (no manifest.json); an image folder must be local")
    if not cfg.input.is_dir():
        raise FileNotFoundError(f"invert.input {cfg.input}: neither a shard folder (manifest.json) nor an image folder")
    files = [str(cfg.input / rel) for rel in list_folder(cfg.input).images]
    if not files:
        raise InputError(f"invert.input {cfg.input}: no image files")
    size = cfg.images_per_file
    return [Unit(f"images-{i // size:05d}", tuple(files[i:i + size]), len(files[i:i + size]))
            for i in range(0, len(files), size)]


def shard_input(cfg: InvertConfig) -> bool:
    """Whether the input is a shard folder (local or in an object store) rather than an image folder."""
    filesystem, path = storage.reader_filesystem(cfg.input)
    return is_shard_folder(path, filesystem)


def aligned_copy(cfg: InvertConfig) -> InvertConfig:
    """For an unaligned image folder: run the align stage's code into output_dir/_aligned, invert that."""
    from pipelines.align import AlignConfig, align_folder

    if storage.is_uri(cfg.output_dir):
        raise InputError(f"invert.output_dir {cfg.output_dir}: unaligned images are aligned into a local output "
                         "folder; align them first (or shard them) to write to an object store")
    target = cfg.output_dir / "_aligned"
    align_folder(AlignConfig(input_dir=str(cfg.input), output_dir=str(target),
                             report=str(cfg.output_dir / "_align.json")))
    return cfg.model_copy(update={"input": target, "aligned": True})


def done_units(units: list[Unit], output_dir: storage.Location, model_ref: str) -> set[str]:
    """Units whose output file exists and was written by the same model (others are redone)."""
    done = set()
    present = set(storage.list_files(output_dir))
    for unit in units:
        name = f"{unit.name}.parquet"
        if name in present:
            try:
                meta = storage.parquet_schema(output_dir / name).metadata or {}
            except (OSError, pa.ArrowException):
                continue
            if meta.get(MODEL_METADATA_KEY, b"").decode() == model_ref:
                done.add(unit.name)
    return done


def invert(cfg: InvertConfig) -> dict[str, Any]:
    """Run the stage; returns (and writes) the report. The model and every input are checked before
    any work; the output folder is one this stage owns (a failed first run leaves none behind)."""
    storage.check_access(cfg.input)
    storage.check_access(cfg.output_dir, write=True)
    model = resolve_model(cfg.model)
    # strict, here: a wrong or damaged checkpoint, or one the preset cannot feed, fails before Ray starts
    checked = InferenceModel.load(model.checkpoint, cfg.preset, "cpu")
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    units = input_units(cfg)
    with storage.claimed_folder(cfg.output_dir, "invert") as folder:
        if not shard_input(cfg) and not cfg.aligned:
            cfg = aligned_copy(cfg)
            units = input_units(cfg)
        return invert_units(cfg, folder, units, model.checkpoint, model.pinned, checked)


def invert_units(cfg: InvertConfig, folder: storage.Location, units: list[Unit], checkpoint: Path, model_ref: str,
                 model: InferenceModel) -> dict[str, Any]:
    """Invert every unit not yet written for this model into the output folder `folder`."""
    from pipelines import raycluster
    from psp_core.devices import resolve_precision
    from psp_core.inference import should_compile

    if folder.is_local:
        for stale in folder.path.glob(".*.parquet.*.tmp"):   # left by a run that was killed mid-write
            stale.unlink()
    skip = done_units(units, folder, model_ref)
    todo = [u for u in units if u.name not in skip and u.rows > 0]
    log.info("%d of %d output files to write (%d already done for %s)", len(todo), len(units), len(skip), model_ref)
    written, seconds, images = 0, 0.0, sum(u.rows for u in todo)
    if todo:
        raycluster.connect(cfg.num_actors * cfg.cpus_per_actor)
        dataset = rows_dataset(cfg, todo)
        start = time.perf_counter()
        written = write_outputs(cfg, folder, inverted(cfg, dataset, checkpoint, model_ref, images), todo, model_ref)
        seconds = time.perf_counter() - start
    manifest = {"model": model_ref, "files": [{"file": f"{u.name}.parquet", "rows": u.rows} for u in units],
                "n_outputs": cfg.n_outputs}
    storage.write_json_atomic(folder / "manifest.json", manifest)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")   # as the actors resolve them, on this hardware
    settings = {"precision": resolve_precision(cfg.precision, device),
                "compiled": should_compile(model.net, device, cfg.compile, images // cfg.num_actors, cfg.n_iters)}
    report = {"model": model_ref, **settings, "units": len(units), "units_skipped": len(skip), "images_written": written,
              "rows_written": written * (1 + cfg.n_outputs), "seconds": round(seconds, 3),
              "images_per_s": written / seconds if seconds else 0.0}
    write_json_atomic(cfg.report, report)
    if model_ref.startswith("models:/"):
        log_inversion(cfg, report)
    return report


def log_inversion(cfg: InvertConfig, report: dict[str, Any]) -> None:
    """An MLflow run (experiment `psp-inversions`) for an inversion by a registered encoder: its settings,
    the shards it read (an MLflow dataset, context `inference`), speed and counts, the report."""
    import mlflow

    from pipelines import lineage, tracking

    experiment_id = tracking.ensure_experiment(INVERT_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"invert-{storage.Location.of(cfg.input).name}") as run:
        mlflow.log_params({k: str(v) for k, v in cfg.model_dump(mode="json").items() if k != "model"}
                          | {"model": report["model"]})
        mlflow.set_tags({"psp.model_version": report["model"], "psp.precision": report["precision"],
                         "psp.compiled": str(report["compiled"]).lower(), "psp.units_skipped": str(report["units_skipped"]),
                         "psp.images_written": str(report["images_written"])})
        mlflow.log_metric("images_per_s", report["images_per_s"])
        if shard_input(cfg):
            filesystem, shard_dir = storage.reader_filesystem(cfg.input)
            dataset = lineage.shard_datasets(cfg.input, read_manifest(shard_dir, filesystem))[cfg.split or "total"]
            lineage.log_datasets(run.info.run_id, {"input": (dataset, "inference")})
        mlflow.log_artifact(str(cfg.report))


def rows_dataset(cfg: InvertConfig, todo: list[Unit]):
    """A Ray dataset of {unit, id, image (encoded bytes), source_path} rows for the pending units, one
    block per unit: each unit's results reach the driver (and its file is written) as soon as that
    unit is done, so a stopped run keeps every finished unit."""
    import ray

    items = [{"unit": u.name, "paths": list(u.paths)} for u in todo]
    shards = shard_input(cfg)
    filesystem, shard_dir = storage.reader_filesystem(cfg.input)
    paired = shards and has_paired_sources(read_manifest(shard_dir, filesystem))
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_unit, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"shards": shards, "split": cfg.split, "paired": paired, "filesystem": filesystem})


def read_unit(item: pa.Table, shards: bool, split: str | None, paired: bool, filesystem: Any = None) -> pa.Table:
    """One unit's rows: a shard file's (of `split`, if given; with the paired sources when the shards
    have them; in `filesystem` if given), or an image chunk's file bytes (decoded later, in the actor)
    with their content hash as id."""
    unit, paths = item.column("unit")[0].as_py(), item.column("paths")[0].as_py()
    if shards:
        columns = ["id", "image", "source_path", "split"] + (["source_image"] if paired else [])
        table = pq.read_table(paths[0], columns=columns, filesystem=filesystem)
        if split is not None:
            table = table.filter(pc.equal(table.column("split"), split))
        table = table.drop(["split"])
    else:
        datas = []
        for path in paths:
            try:
                datas.append(Path(path).read_bytes())
            except OSError:
                datas.append(b"")
        table = pa.table({"id": [hashlib.sha256(d).hexdigest() for d in datas], "image": pa.array(datas, pa.binary()),
                          "source_path": paths})
    return table.add_column(0, "unit", pa.array([unit] * table.num_rows, pa.string()))


def inverted(cfg: InvertConfig, dataset, checkpoint: Path, model_ref: str, n_images: int = 0):
    """The dataset mapped through the inversion actor pool (`n_images` in all: `compile: auto` decides on them)."""
    from ray.data import ActorPoolStrategy

    return dataset.map_batches(
        Inverter, fn_constructor_kwargs={"checkpoint": str(checkpoint), "cfg": cfg.model_dump(mode="json"),
                                         "model_ref": model_ref, "n_images": n_images},
        compute=ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size, batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0)


class Inverter:
    """Ray Data actor: loads the encoder once (the inference core), then turns batches of encoded
    images into W+ codes, reconstructions, per-image L2 / LPIPS / MS-SSIM and style-mixed variants;
    a row that cannot be decoded becomes a row with an error, never a crashed stage."""

    def __init__(self, checkpoint: str, cfg: dict[str, Any], model_ref: str, n_images: int = 0):
        from psp_core.inference import InferenceModel, default_mix_layers
        from psp_core.metrics import MetricSuite, lpips_network

        self.cfg = InvertConfig.model_validate(cfg)
        device = "cuda" if self.cfg.use_gpu else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(self.cfg.cpus_per_actor)))
        self.model = InferenceModel.load(checkpoint, self.cfg.preset, device, self.cfg.precision, self.cfg.compile,
                                         self.cfg.compile_cache, n_images // self.cfg.num_actors, self.cfg.n_iters)
        self.suite = MetricSuite(lpips_network(self.cfg.lpips_backbone).to(self.model.device), identity=None)
        self.model_ref = model_ref
        self.latent_mask = self.cfg.latent_mask if self.cfg.latent_mask is not None else \
            default_mix_layers(self.model.n_styles)

    def decode_row(self, table: pa.Table, i: int) -> tuple[np.ndarray, np.ndarray | None] | str:
        """Row i's target image (RGB) and paired source (as the preset's input kind), or why not."""
        from psp_core.shards import decode_image, decode_source

        try:
            image = decode_image(table.column("image")[i].as_py())
        except Exception as err:  # noqa: BLE001 - any undecodable file is a row error
            return f"undecodable image: {type(err).__name__}"
        if "source_image" not in table.column_names:
            return image, None
        data = table.column("source_image")[i].as_py()
        if data is None:
            return "no paired source image"
        try:
            return image, decode_source(data, self.model.input_kind)
        except Exception as err:  # noqa: BLE001
            return f"undecodable source image: {type(err).__name__}"

    def __call__(self, table: pa.Table) -> pa.Table:
        from psp_core.inference import scored
        from psp_core.presets import TARGET_SIZE
        from psp_core.shards import pair_tensors, stack_mixed

        ids = table.column("id").to_pylist()
        decoded = [self.decode_row(table, i) for i in range(len(ids))]
        errors = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
        good = [i for i in range(len(ids)) if i not in errors]
        rows = {i: {"variant": 0, "latent": None, "reconstruction": None, "l2": None, "lpips": None, "ms_ssim": None}
                for i in range(len(ids))}
        extra: list[dict] = []
        if good:
            images = stack_mixed([decoded[i][0] for i in good], TARGET_SIZE)
            sources = stack_mixed([decoded[i][1] for i in good], TARGET_SIZE) if decoded[good[0]][1] is not None else None
            source, target = self.model.prepare(*pair_tensors(images, sources, self.model.input_kind))
            final = self.model.invert(source, self.cfg.n_iters)[-1]
            values = self.suite(scored(final.images), target)
            for k, i in enumerate(good):
                rows[i].update(latent=final.latents[k].float().cpu().numpy(),
                               reconstruction=png_bytes(final.images[k]) if self.cfg.reconstructions else None,
                               **{m: float(values[m][k]) for m in ("l2", "lpips", "ms_ssim")})
            for variant in range(1, self.cfg.n_outputs + 1):
                seeds = [seed_for(self.cfg.seed, ids[i], variant) for i in good]
                mixed = self.model.style_mix(final.latents, seeds, self.latent_mask, self.cfg.mix_alpha)
                for k, i in enumerate(good):
                    extra.append({"index": i, "variant": variant, "latent": mixed.latents[k].float().cpu().numpy(),
                                  "reconstruction": png_bytes(mixed.images[k]) if self.cfg.reconstructions else None,
                                  "l2": None, "lpips": None, "ms_ssim": None})
        ordered = [{"index": i, **rows[i]} for i in range(len(ids))] + extra
        return self.to_table(table, ordered, errors)

    def to_table(self, table: pa.Table, rows: list[dict], errors: dict[int, str]) -> pa.Table:
        column = lambda name: [table.column(name)[r["index"]].as_py() for r in rows]  # noqa: E731
        return pa.table({
            "unit": column("unit"),
            "id": column("id"),
            "variant": pa.array([r["variant"] for r in rows], pa.int16()),
            "source_path": column("source_path"),
            "latent": pa.array([None if r["latent"] is None else list(r["latent"]) for r in rows], LATENT_TYPE),
            "reconstruction": pa.array([r["reconstruction"] for r in rows], pa.binary()),
            "l2": pa.array([r["l2"] for r in rows], pa.float32()),
            "lpips": pa.array([r["lpips"] for r in rows], pa.float32()),
            "ms_ssim": pa.array([r["ms_ssim"] for r in rows], pa.float32()),
            "error": pa.array([errors.get(r["index"]) for r in rows], pa.string()),
            "model": pa.array([self.model_ref] * len(rows), pa.string()),
        })


def seed_for(seed: int, image_id: str, variant: int) -> int:
    """A 63-bit seed from the run seed, the image id and the variant number."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def write_outputs(cfg: InvertConfig, folder: storage.Location, dataset, todo: list[Unit], model_ref: str) -> int:
    """Stream the results, group them by unit, and write each unit's file once all its rows are in;
    returns the number of images inverted."""
    from tqdm import tqdm

    expected = {u.name: u.rows * (1 + cfg.n_outputs) for u in todo}
    pending: dict[str, list[pa.Table]] = {u.name: [] for u in todo}
    counts = dict.fromkeys(expected, 0)
    written = 0
    with tqdm(total=sum(u.rows for u in todo), unit="img", desc="invert") as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for unit in set(batch.column("unit").to_pylist()):
                part = batch.filter(pc.equal(batch.column("unit"), unit))
                pending[unit].append(part)
                counts[unit] += part.num_rows
                bar.update(sum(v == 0 for v in part.column("variant").to_pylist()))
                if counts[unit] == expected[unit]:
                    write_unit(folder / f"{unit}.parquet", pending.pop(unit), model_ref)
                    written += expected[unit] // (1 + cfg.n_outputs)
    unfinished = [u for u in pending if pending[u] or counts[u] < expected[u]]
    if unfinished:
        raise RuntimeError(f"inversion ended with incomplete output files: {unfinished[:3]}")
    return written


def write_unit(path: storage.Location, parts: list[pa.Table], model_ref: str) -> None:
    """One output file, rows sorted by (id, variant), model reference in the schema metadata, atomically."""
    table = pa.concat_tables(parts).drop(["unit"]).sort_by([("id", "ascending"), ("variant", "ascending")])
    table = table.replace_schema_metadata({MODEL_METADATA_KEY: model_ref.encode()})
    with storage.atomic_output(path) as out:
        pq.write_table(table, out, row_group_size=100)
