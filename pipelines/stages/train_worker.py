"""`psp train`'s Ray Train side: the loop each worker runs (DDP under Ray Train), its share of the shards,
and the engine extended with what distribution needs. Rank 0 alone writes to MLflow, into the driver's run.
Checkpoints reach Ray's storage whole (`pipelines.services.ray.checkpoints`), and a worker resumes from the
newest one that reads whole."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipelines.params.schema import TrainConfig
from pipelines.services.ray.checkpoints import copy_whole, persist_whole, remove_stopped_uploads, resume_candidates
from pipelines.services.storage.converted import converted_generator
from pipelines.services.tracking import fetch_weights
from pipelines.services.tracking.callback import MLflowCallback
from pipelines.services.tracking.vocabulary import COMPILED_TAG, NODES_TAG, PRECISION_TAG
from psp_core import build_hyperstyle, build_psp
from psp_core.data.presets import PresetTransform
from psp_core.data.shards import SourceKind, decode_images, decode_sources
from psp_core.data.tensors import pair_tensors
from psp_core.options import HYPERSTYLE
from psp_core.runtime.devices import keep_freed_memory
from psp_core.training.engine import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, prepare_for_training, training_compiles
from psp_core.training.losses import PSPLoss

log = logging.getLogger(__name__)


def local_weights(path: Path | str | None) -> Path | None:
    """A weights setting as a local file on this node (fetched once into the cache), None where it is absent."""
    return None if path is None else fetch_weights(path)


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop: build the model and loss, resume from Ray's checkpoint, train."""
    cfg: TrainConfig = config["train"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        keep_freed_memory()                               # before the models exist, or glibc still trims
    preset = config["preset"]

    torch.manual_seed(cfg.seed)                           # the same initial weights on every rank
    generator, irse50 = local_weights(config["generator"]), local_weights(config["irse50"])
    generator = None if generator is None else converted_generator(generator)   # a StyleGAN2-ADA .pkl: once per node
    arch = cfg.architecture(preset.input_nc)
    if arch.family == HYPERSTYLE:
        net = build_hyperstyle(arch, local_weights(config["w_encoder"]), generator, local_weights(config["resnet34"]))
    else:
        net = build_psp(arch, generator, irse50)
    prepare_for_training(net, cfg.train_decoder)           # freeze before DDP sees the parameters
    encoder = net.hypernet if arch.family == HYPERSTYLE else net.encoder
    unused = getattr(encoder, "unused_parameters", lambda: False)()
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": unused})
    loss = PSPLoss(preset.loss, lpips_backbone=cfg.lpips_backbone,
                   irse50_path=irse50).to(device)
    callback = MLflowCallback(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    nodes = worker_nodes()
    if callback is not None:
        callback.set_tag(NODES_TAG, str(len(set(nodes))))
    # one folder per run and rank, emptied first: a killed worker's files are reused by its restart, not left behind
    local_dir = Path(tempfile.gettempdir()) / "psp-train" / f"{config['run_name']}-rank{rank}"
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    trainer = RayTrainer(model, loss, cfg.training(), checkpoint_dir=local_dir,
                         batch_transform=PresetTransform(preset, cfg.encoder_input_size, train=True),
                         val_transform=PresetTransform(preset, cfg.encoder_input_size, train=False),
                         callback=callback, is_main_process=rank == 0,
                         global_batch=cfg.batch_size * context.get_world_size())
    if callback is not None:   # what this run computes in, resolved on the worker's device (the engine decides alike)
        callback.set_tag(PRECISION_TAG, trainer.precision)
        compiled = training_compiles(trainer.config, net.arch, cfg.batch_size, device)
        callback.set_tag(COMPILED_TAG, str(compiled).lower())
    if rank == 0:
        remove_stopped_uploads()
    if resume_latest_whole(trainer, resume_candidates(), local_dir) is not None and rank == 0:
        log.info("resumed at step %d", trainer.step)

    paired = config["paired_sources"]
    feeder = ShardFeeder(cfg.batch_size, cfg.seed, rank, preset.input_kind, paired)
    val = ShardFeeder(cfg.batch_size, cfg.seed, rank, preset.input_kind, paired, split="test")
    try:
        trainer.fit(feeder.epoch, val if _has_dataset("test") else None)
    finally:
        if callback is not None:
            callback.close()
        shutil.rmtree(local_dir, ignore_errors=True)


def resume_latest_whole(trainer: Trainer, candidates: list[ray.train.Checkpoint],
                        local_dir: Path) -> ray.train.Checkpoint | None:
    """Resume `trainer` from the first of `candidates` (newest first) whose `last.pt` reads whole, its files
    copied into `local_dir` (the best model beside it); a partial or damaged one is passed over with a warning.
    Returns the checkpoint resumed from, None when none could be (the run starts at step 0)."""
    for checkpoint in candidates:
        with checkpoint.as_directory() as folder:
            for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
                (local_dir / name).unlink(missing_ok=True)
                if (Path(folder) / name).is_file():
                    copy_whole(Path(folder) / name, local_dir / name)
        if trainer.try_resume(local_dir / LAST_CHECKPOINT):
            return checkpoint
        log.warning("checkpoint %s does not read whole; trying the one before it", checkpoint.path)
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        (local_dir / name).unlink(missing_ok=True)
    return None


def worker_nodes() -> list[str]:
    """The Ray node id of every worker, gathered over the process group (rank order)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _has_dataset(name: str) -> bool:
    try:
        return ray.train.get_dataset_shard(name) is not None
    except (KeyError, ValueError, RuntimeError):
        return False


class ShardFeeder:
    """Batches (source, target) tensors [N, C, H, W] from this worker's share of a split, decoded in
    batch (paired sources as the preset's input kind); the training split is shuffled per epoch
    with a seeded local buffer."""

    def __init__(self, batch_size: int, seed: int, rank: int, kind: SourceKind, paired: bool, split: str = "train"):
        self.batch_size, self.seed, self.rank, self.split = batch_size, seed, rank, split
        self.kind, self.paired = kind, paired

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = ray.train.get_dataset_shard(self.split)
        shuffle = {"local_shuffle_buffer_size": 4 * self.batch_size,
                   "local_shuffle_seed": self.seed + 7919 * epoch + self.rank} if self.split == "train" else {}
        for batch in shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                        drop_last=self.split == "train", **shuffle):
            sources = decode_sources(list(batch["source_image"]), self.kind) if self.paired else None
            yield pair_tensors(decode_images(list(batch["image"])), sources, self.kind)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


class RayTrainer(Trainer):
    """The engine plus what distribution needs: validation metrics averaged over workers, every
    `last` checkpoint reported to Ray Train by all workers, learning rate and throughput logged."""

    def __init__(self, *args: Any, global_batch: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.global_batch = global_batch
        self.clock = (time.perf_counter(), 0)
        self.last_metrics: dict[str, float] = {}

    def train_step(self, source: torch.Tensor, target: torch.Tensor):
        metrics, output = super().train_step(source, target)
        start, start_step = self.clock
        if self.step % self.config.log_interval == 0:
            now = time.perf_counter()
            metrics["images_per_s"] = self.global_batch * (self.step - start_step) / max(now - start, 1e-9)
            self.clock = (now, self.step)
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.last_metrics = metrics
        return metrics, output

    def validate(self, batches):
        metrics = super().validate(batches)
        if dist.is_available() and dist.is_initialized():
            names = sorted(metrics)
            # on the training device: NCCL (the GPU backend) reduces only CUDA tensors, gloo CPU ones
            values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            metrics = dict(zip(names, (values / dist.get_world_size()).cpu().tolist()))
        self.last_metrics = {**self.last_metrics, **{f"val_{k}": v for k, v in metrics.items()}}
        return metrics

    def save(self, name: str, is_best: bool):
        path = super().save(name, is_best)
        if name == LAST_CHECKPOINT:
            self.report()
        return path

    def report(self) -> None:
        """Hand the latest (and best) checkpoint to Ray Train; every worker calls this at the same step."""
        metrics = {"step": self.step, **self.last_metrics}
        if not self.is_main_process:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="psp-report-") as folder:
            for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
                if (self.checkpoint_dir / name).is_file():
                    copy_whole(self.checkpoint_dir / name, Path(folder) / name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_upload_fn=persist_whole)
