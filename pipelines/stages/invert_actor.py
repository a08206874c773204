"""`psp invert`'s Ray Data side: reading one unit's rows, and the actor that inverts them. Kept apart from the
driver so the actors import only what inversion needs."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines.params.schema import InvertConfig
from psp_core.data.presets import TARGET_SIZE
from psp_core.data.shards import LATENT_TYPE, TARGET_IMAGE, decode_image, decode_source, stack_mixed
from psp_core.data.tensors import pair_tensors, png_bytes
from psp_core.evaluation.metrics import MetricSuite, lpips_network
from psp_core.inference import InferenceModel, default_mix_layers, scored
from psp_core.options import HYPERSTYLE

ROW_METRICS = ("l2", "lpips", "ms_ssim")
"""The per-image scores of a reconstruction against its target."""
PER_ITERATION_TYPE = pa.list_(pa.struct([(m, pa.float32()) for m in ROW_METRICS]))
"""`per_iteration`: an iterative encoder's (ReStyle's, HyperStyle's) scores at each of its n_iters steps."""


def read_unit(item: pa.Table, shards: bool, split: str | None, columns: list[str], filesystem: Any = None) -> pa.Table:
    """One unit's rows: a shard file's `columns` (of `split`, if given; in `filesystem` if given), or an image chunk's file bytes (decoded later, in the actor)
    with their content hash as id."""
    unit, paths = item.column("unit")[0].as_py(), item.column("paths")[0].as_py()
    if shards:
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


class Inverter:
    """Ray Data actor: loads the encoder once (the inference core), then turns batches of encoded
    images into W+ codes, reconstructions, per-image L2 / LPIPS / MS-SSIM (an iterative encoder's at every
    step too) and style-mixed variants; a row that cannot be decoded becomes a row with an error, never a
    crashed stage."""

    def __init__(self, checkpoint: str, cfg: dict[str, Any], model_ref: str, n_images: int = 0):
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
        ids = table.column("id").to_pylist()
        decoded = [self.decode_row(table, i) for i in range(len(ids))]
        errors = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
        good = [i for i in range(len(ids)) if i not in errors]
        rows = {i: {"variant": 0, "latent": None, "reconstruction": None, "per_iteration": None,
                    **dict.fromkeys(ROW_METRICS)} for i in range(len(ids))}
        extra: list[dict] = []
        if good:
            images = stack_mixed([decoded[i][0] for i in good], TARGET_SIZE)
            sources = stack_mixed([decoded[i][1] for i in good], TARGET_SIZE) if decoded[good[0]][1] is not None else None
            source, target = self.model.prepare(*pair_tensors(images, sources, self.model.input_kind))
            steps = self.model.invert(source, self.cfg.n_iters)
            final = steps[-1]
            scores = [self.suite(scored(step.images), target) for step in steps]
            for k, i in enumerate(good):
                per_step = [{m: float(values[m][k]) for m in ROW_METRICS} for values in scores]
                rows[i].update(latent=final.latents[k].float().cpu().numpy(),
                               reconstruction=png_bytes(final.images[k]) if self.cfg.reconstructions else None,
                               per_iteration=per_step if self.model.iterative else None, **per_step[-1])
            for variant in range(1, self.cfg.n_outputs + 1):
                seeds = [seed_for(self.cfg.seed, ids[i], variant) for i in good]
                mixed = self.model.style_mix(final.latents, seeds, self.latent_mask, self.cfg.mix_alpha,
                                             final.offsets)
                for k, i in enumerate(good):
                    extra.append({"index": i, "variant": variant, "latent": mixed.latents[k].float().cpu().numpy(),
                                  "reconstruction": png_bytes(mixed.images[k]) if self.cfg.reconstructions else None,
                                  "per_iteration": None, **dict.fromkeys(ROW_METRICS)})
        ordered = [{"index": i, **rows[i]} for i in range(len(ids))] + extra
        return self.to_table(table, ordered, errors)

    def to_table(self, table: pa.Table, rows: list[dict], errors: dict[int, str]) -> pa.Table:
        column = lambda name: [table.column(name)[r["index"]].as_py() for r in rows]  # noqa: E731
        targets = {}
        if self.model.net.arch.family == HYPERSTYLE:   # what an edit recomputes the weight offsets from
            kept = [r["variant"] == 0 and r["index"] not in errors for r in rows]
            targets[TARGET_IMAGE] = pa.array([image if keep else None for image, keep in zip(column("image"), kept)],
                                             pa.binary())
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
            "per_iteration": pa.array([r["per_iteration"] for r in rows], PER_ITERATION_TYPE),
            "error": pa.array([errors.get(r["index"]) for r in rows], pa.string()),
            "model": pa.array([self.model_ref] * len(rows), pa.string()),
            **targets,
        })


def seed_for(seed: int, image_id: str, variant: int) -> int:
    """A 63-bit seed from the run seed, the image id and the variant number."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
