"""`psp invert`: batch inversion of images into W+ with Ray Data and a registered (or file) encoder.

Input is a folder of Parquet shards (ours) or a folder of images (aligned first by the align
stage's code unless `aligned: true`). Rows stream through an actor pool that loads the model
once per actor; the driver writes one output Parquet file per input unit (shard, or chunk of
images), atomically, and skips units already written for the same model: an interrupted run,
rerun, writes each output exactly once.
"""
from __future__ import annotations

import argparse
import hashlib
import io
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

from pipelines.config import load_section
from pipelines.sections import InvertConfig
from pipelines.io import atomic_path, list_folder, output_folder, write_json_atomic
from pipelines.tracking import resolve_model
from psp_core import load_psp
from psp_core.errors import InputError
from psp_core.losses import require_alexnet

log = logging.getLogger(__name__)

MODEL_METADATA_KEY = b"psp.model"
INVERT_EXPERIMENT = "psp-inversions"
FINE_LAYERS_FROM = 8     # the reference's multi-modal synthesis mixes layers 8 and up


@dataclass(frozen=True)
class Unit:
    """One output file's worth of input: a shard file, or a chunk of image files."""

    name: str
    paths: tuple[str, ...]
    rows: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Starts a local Ray instance unless RAY_ADDRESS is set. Outputs: one Parquet file per "
                     "input unit in invert.output_dir (id, latent [n_styles x 512], reconstruction PNG, l2, "
                     "lpips, model), a manifest.json, and invert.report.")


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

    if (cfg.input / "manifest.json").is_file():
        units = []
        for path in shard_paths(cfg.input, verify=True):
            rows = open_shard(path).metadata.num_rows
            if cfg.split is not None:
                splits = pq.read_table(path, columns=["split"]).column("split").to_pylist()
                rows = sum(s == cfg.split for s in splits)
            units.append(Unit(path.stem, (str(path),), rows))
        return units
    if not cfg.input.is_dir():
        raise FileNotFoundError(f"invert.input {cfg.input}: neither a shard folder (manifest.json) nor an image folder")
    files = [str(cfg.input / rel) for rel in list_folder(cfg.input).images]
    if not files:
        raise InputError(f"invert.input {cfg.input}: no image files")
    size = cfg.images_per_file
    return [Unit(f"images-{i // size:05d}", tuple(files[i:i + size]), len(files[i:i + size]))
            for i in range(0, len(files), size)]


def aligned_copy(cfg: InvertConfig) -> InvertConfig:
    """For an unaligned image folder: run the align stage's code into output_dir/_aligned, invert that."""
    from pipelines.align import AlignConfig, align_folder

    target = cfg.output_dir / "_aligned"
    align_folder(AlignConfig(input_dir=str(cfg.input), output_dir=str(target),
                             report=str(cfg.output_dir / "_align.json")))
    return cfg.model_copy(update={"input": target, "aligned": True})


def done_units(units: list[Unit], output_dir: Path, model_ref: str) -> set[str]:
    """Units whose output file exists and was written by the same model (others are redone)."""
    done = set()
    for unit in units:
        path = output_dir / f"{unit.name}.parquet"
        if path.is_file():
            try:
                meta = pq.read_schema(path).metadata or {}
            except (OSError, pa.ArrowException):
                continue
            if meta.get(MODEL_METADATA_KEY, b"").decode() == model_ref:
                done.add(unit.name)
    return done


def invert(cfg: InvertConfig) -> dict[str, Any]:
    """Run the stage; returns (and writes) the report. The model and every input are checked before
    any work; the output folder is one this stage owns (a failed first run leaves none behind)."""
    model = resolve_model(cfg.model)
    load_psp(model.checkpoint)   # strict, here: a wrong or damaged checkpoint fails before Ray starts
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    units = input_units(cfg)
    with output_folder(cfg.output_dir, "invert"):
        if not (cfg.input / "manifest.json").is_file() and not cfg.aligned:
            cfg = aligned_copy(cfg)
            units = input_units(cfg)
        return invert_units(cfg, units, model.checkpoint, model.pinned)


def invert_units(cfg: InvertConfig, units: list[Unit], checkpoint: Path, model_ref: str) -> dict[str, Any]:
    """Invert every unit not yet written for this model into the output folder."""
    from pipelines import raycluster

    for stale in cfg.output_dir.glob(".*.parquet.*.tmp"):   # left by a run that was killed mid-write
        stale.unlink()
    skip = done_units(units, cfg.output_dir, model_ref)
    todo = [u for u in units if u.name not in skip and u.rows > 0]
    log.info("%d of %d output files to write (%d already done for %s)", len(todo), len(units), len(skip), model_ref)
    written, seconds = 0, 0.0
    if todo:
        raycluster.connect(cfg.num_actors * cfg.cpus_per_actor)
        dataset = rows_dataset(cfg, todo)
        start = time.perf_counter()
        written = write_outputs(cfg, inverted(cfg, dataset, checkpoint, model_ref), todo, model_ref)
        seconds = time.perf_counter() - start
    manifest = {"model": model_ref, "files": [{"file": f"{u.name}.parquet", "rows": u.rows} for u in units],
                "n_outputs": cfg.n_outputs}
    write_json_atomic(cfg.output_dir / "manifest.json", manifest)
    report = {"model": model_ref, "units": len(units), "units_skipped": len(skip), "images_written": written,
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
    from psp_core.shards import read_manifest

    experiment_id = tracking.ensure_experiment(INVERT_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"invert-{cfg.input.name}") as run:
        mlflow.log_params({k: str(v) for k, v in cfg.model_dump(mode="json").items() if k != "model"}
                          | {"model": report["model"]})
        mlflow.set_tags({"psp.model_version": report["model"], "psp.units_skipped": str(report["units_skipped"]),
                         "psp.images_written": str(report["images_written"])})
        mlflow.log_metric("images_per_s", report["images_per_s"])
        if (cfg.input / "manifest.json").is_file():
            dataset = lineage.shard_datasets(cfg.input, read_manifest(cfg.input))[cfg.split or "total"]
            lineage.log_datasets(run.info.run_id, {"input": (dataset, "inference")})
        mlflow.log_artifact(str(cfg.report))


def rows_dataset(cfg: InvertConfig, todo: list[Unit]):
    """A Ray dataset of {unit, id, image (encoded bytes), source_path} rows for the pending units, one
    block per unit: each unit's results reach the driver (and its file is written) as soon as that
    unit is done, so a stopped run keeps every finished unit."""
    import ray

    items = [{"unit": u.name, "paths": list(u.paths)} for u in todo]
    shards = (cfg.input / "manifest.json").is_file()
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_unit, batch_size=1, batch_format="pyarrow", fn_kwargs={"shards": shards, "split": cfg.split})


def read_unit(item: pa.Table, shards: bool, split: str | None) -> pa.Table:
    """One unit's rows: a shard file's (of `split`, if given), or an image chunk's file bytes (decoded
    later, in the actor) with their content hash as id."""
    unit, paths = item.column("unit")[0].as_py(), item.column("paths")[0].as_py()
    if shards:
        table = pq.read_table(paths[0], columns=["id", "image", "source_path", "split"])
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


def inverted(cfg: InvertConfig, dataset, checkpoint: Path, model_ref: str):
    """The dataset mapped through the inversion actor pool."""
    from ray.data import ActorPoolStrategy

    return dataset.map_batches(
        Inverter, fn_constructor_kwargs={"checkpoint": str(checkpoint), "cfg": cfg.model_dump(mode="json"),
                                         "model_ref": model_ref},
        compute=ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size, batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0)


class Inverter:
    """Ray Data actor: loads the pSp network once, then turns batches of encoded images into W+
    codes, reconstructions, per-image L2 / LPIPS, and optional style-mixed variants."""

    def __init__(self, checkpoint: str, cfg: dict[str, Any], model_ref: str):
        from psp_core import load_psp
        from psp_core.metrics import lpips_network
        from psp_core.presets import PresetTransform, get_preset

        self.cfg = InvertConfig.model_validate(cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.cfg.cpus_per_actor)))
        self.net = load_psp(checkpoint, self.device)
        self.lpips = lpips_network(self.cfg.lpips_backbone).to(self.device)
        self.transform = PresetTransform(get_preset(self.cfg.preset), self.net.arch.encoder_input_size, train=False)
        self.model_ref = model_ref
        n = self.net.n_styles
        default = list(range(FINE_LAYERS_FROM, n)) or list(range(n // 2, n))
        self.latent_mask = self.cfg.latent_mask if self.cfg.latent_mask is not None else default

    def __call__(self, table: pa.Table) -> pa.Table:
        from psp_core.devices import autocast
        from psp_core.psp import POOLED_SIZE
        from psp_core.metrics import l2_per_image
        from psp_core.shards import decode_image

        ids, datas = table.column("id").to_pylist(), table.column("image").to_pylist()
        good, images, errors = [], [], {}
        for i, data in enumerate(datas):
            try:
                images.append(decode_image(data, 256))
                good.append(i)
            except Exception as err:  # a bad row becomes a reject row, never a crashed stage
                errors[i] = f"undecodable image: {type(err).__name__}"
        rows = {i: {"variant": 0, "latent": None, "reconstruction": None, "l2": None, "lpips": None}
                for i in range(len(ids))}
        extra: list[dict] = []
        if good:
            target = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
            source, target = self.transform(target, target, torch.Generator())
            source, target = source.to(self.device), target.to(self.device)
            with torch.inference_mode(), autocast(self.device, self.cfg.precision):
                output, latents = self.net(source, resize=False, randomize_noise=False, return_latents=True)
                # scored as evaluate scores: the 256 px output clamped to the image range it is saved in
                pooled = torch.nn.functional.adaptive_avg_pool2d(output.float(), (POOLED_SIZE, POOLED_SIZE)).clamp(-1, 1)
                l2 = l2_per_image(pooled, target)
                lpips = self.lpips(pooled, target).flatten()
                variants = self.variants(latents, [ids[i] for i in good])
            for k, i in enumerate(good):
                rows[i].update(latent=latents[k].float().cpu().numpy(), l2=float(l2[k]), lpips=float(lpips[k]),
                               reconstruction=png_bytes(output[k]) if self.cfg.reconstructions else None)
            for variant, (codes, images_k) in enumerate(variants, start=1):
                for k, i in enumerate(good):
                    extra.append({"index": i, "variant": variant, "latent": codes[k].float().cpu().numpy(),
                                  "reconstruction": png_bytes(images_k[k]) if self.cfg.reconstructions else None,
                                  "l2": None, "lpips": None})
        ordered = [{"index": i, **rows[i]} for i in range(len(ids))] + extra
        return self.to_table(table, ordered, errors)

    def variants(self, latents: torch.Tensor, ids: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n_outputs` style-mixed versions: the mask layers blended toward codes of seeded random z
        (the seed comes from the image id, so reruns reproduce them)."""
        from psp_core.psp import mix_styles

        out = []
        for variant in range(1, self.cfg.n_outputs + 1):
            z = torch.stack([torch.randn(self.net.arch.style_dim, generator=torch.Generator().manual_seed(
                seed_for(self.cfg.seed, image_id, variant))) for image_id in ids]).to(self.device)
            inject = self.net.decoder.get_latent(z).unsqueeze(1).expand_as(latents)
            codes = mix_styles(latents, self.latent_mask, inject, self.cfg.mix_alpha)
            images, _ = self.net.decoder([codes], input_is_latent=True, randomize_noise=False)
            out.append((codes, images))
        return out

    def to_table(self, table: pa.Table, rows: list[dict], errors: dict[int, str]) -> pa.Table:
        n_styles = self.net.n_styles
        latent_type = pa.list_(pa.list_(pa.float32(), self.net.arch.style_dim), n_styles)
        column = lambda name: [table.column(name)[r["index"]].as_py() for r in rows]  # noqa: E731
        return pa.table({
            "unit": column("unit"),
            "id": column("id"),
            "variant": pa.array([r["variant"] for r in rows], pa.int16()),
            "source_path": column("source_path"),
            "latent": pa.array([None if r["latent"] is None else list(r["latent"]) for r in rows], latent_type),
            "reconstruction": pa.array([r["reconstruction"] for r in rows], pa.binary()),
            "l2": pa.array([r["l2"] for r in rows], pa.float32()),
            "lpips": pa.array([r["lpips"] for r in rows], pa.float32()),
            "error": pa.array([errors.get(r["index"]) for r in rows], pa.string()),
            "model": pa.array([self.model_ref] * len(rows), pa.string()),
        })


def seed_for(seed: int, image_id: str, variant: int) -> int:
    """A 63-bit seed from the run seed, the image id and the variant number."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def png_bytes(image: torch.Tensor) -> bytes:
    """A generator output [3, H, W] in [-1, 1] as PNG bytes."""
    from PIL import Image

    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_outputs(cfg: InvertConfig, dataset, todo: list[Unit], model_ref: str) -> int:
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
                    write_unit(cfg.output_dir / f"{unit}.parquet", pending.pop(unit), model_ref)
                    written += expected[unit] // (1 + cfg.n_outputs)
    unfinished = [u for u in pending if pending[u] or counts[u] < expected[u]]
    if unfinished:
        raise RuntimeError(f"inversion ended with incomplete output files: {unfinished[:3]}")
    return written


def write_unit(path: Path, parts: list[pa.Table], model_ref: str) -> None:
    """One output file, rows sorted by (id, variant), model reference in the schema metadata, atomically."""
    table = pa.concat_tables(parts).drop(["unit"]).sort_by([("id", "ascending"), ("variant", "ascending")])
    table = table.replace_schema_metadata({MODEL_METADATA_KEY: model_ref.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=100)
