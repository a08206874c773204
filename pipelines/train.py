"""`psp train`: distributed pSp training on Ray Train, tracked in MLflow, encoder registered at the end.

The driver validates params, opens the Parquet shards as Ray datasets, creates (or resumes) the
MLflow run and launches a TorchTrainer. Each worker runs `psp_core.engine.Trainer` under DDP; rank 0
alone writes to MLflow, into the driver's run. Checkpoints go through `ray.train.report`, so a
restarted worker, or the same command run again, resumes from the latest one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipelines import storage
from pipelines.config import load_section
from pipelines.sections import TrainConfig
from pipelines.io import write_json_atomic
from psp_core import build_psp
from psp_core.errors import InputError
from psp_core.devices import keep_freed_memory
from psp_core.engine import BEST_CHECKPOINT, LAST_CHECKPOINT, Trainer, prepare_for_training, training_compiles
from psp_core.losses import PSPLoss, require_alexnet
from psp_core.options import FAMILY_NAMES
from psp_core.presets import PresetTransform, get_preset
from psp_core.shards import (
    MANIFEST_FILE, SourceKind, decode_images, decode_sources, has_paired_sources, pair_tensors, read_manifest,
    shard_paths,
)

log = logging.getLogger(__name__)

RUN_NAME_TAG = "psp.ray_run_name"
VERSION_TAG = "psp.registered_version"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Starts a local Ray instance unless RAY_ADDRESS is set (as under `ray job submit`). "
                     "MLflow store: MLFLOW_TRACKING_URI, else sqlite:///mlflow/mlflow.db.")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_paths(load_section("train", TrainConfig, args.overrides, args.params))
    summary = train(cfg)
    print(f"trained {summary['steps']} steps; MLflow run {summary['mlflow_run_id']}; "
          f"registered {cfg.registered_model} version {summary['model_version']} as @{cfg.alias}")
    return 0


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute local paths (URIs as they are), so workers whose working directory differs read the same files."""
    absolute = lambda x: x if is_remote(x) else Path(x).resolve()  # noqa: E731
    return cfg.model_copy(update={"shards": absolute(cfg.shards), "generator": absolute(cfg.generator),
                                  "irse50": absolute(cfg.irse50), "storage_path": str(absolute(cfg.storage_path))})


def is_remote(path: Path | str) -> bool:
    """Whether a path setting names an object-store URI or an MLflow `models:/` / `runs:/` artifact."""
    return storage.is_uri(path) or str(path).startswith(("models:/", "runs:/"))


def weights_present(path: Path | str) -> bool:
    """Whether a weights file is there: a URI is (its access is checked before training, a registry artifact
    is fetched then), a local path if it is a file."""
    return is_remote(path) or Path(path).is_file()


def local_weights(path: Path | str) -> Path | None:
    """A weights file as a local path (a URI fetched once per node into the cache), or None where it is absent."""
    return storage.cached_weights(path) if weights_present(path) else None


def check_data_access(cfg: TrainConfig) -> None:
    """Every object-store location the run reads or writes is usable: else one line naming it (exit 2),
    before Ray or MLflow starts."""
    storage.check_access(cfg.shards)
    for weights in (cfg.generator, cfg.irse50):
        if storage.is_uri(weights):
            storage.check_access(weights)
    storage.check_access(cfg.storage_path, write=True)


def random_weight_networks(cfg: TrainConfig) -> list[str]:
    """The networks that will run on random weights because their files are absent (or by request)."""
    missing = []
    if not weights_present(cfg.generator):
        missing.append("generator")
    if not weights_present(cfg.irse50):
        missing.append("encoder_backbone_irse50")
    if cfg.lpips_backbone == "random":
        missing.append("lpips_alexnet")
    return missing


def run_name_for(cfg: TrainConfig, manifest_hash: str) -> str:
    """`cfg.run_name`, or for 'auto' a name from a hash of the params and the data, so an unchanged
    rerun resumes its run and any change starts a new one."""
    if cfg.run_name != "auto":
        return cfg.run_name
    identity = cfg.model_dump(mode="json", exclude={"run_name", "report", "alias", "num_to_keep", "max_failures"})
    digest = hashlib.sha256(json.dumps([identity, manifest_hash], sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.preset}-{digest}"


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown'."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flat_params(cfg: TrainConfig) -> dict[str, str]:
    """Every resolved parameter, plus the preset's effective loss weights, as MLflow params."""
    preset = get_preset(cfg.preset).with_loss(**cfg.loss)
    params = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "loss"}
    params.update({f"loss.{k}": v for k, v in asdict(preset.loss).items()})
    return {k: str(v) for k, v in params.items()}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `cfg` to the end; return the summary written to the report."""
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import raycluster, tracking

    check_data_access(cfg)
    preset = get_preset(cfg.preset).with_loss(**cfg.loss)
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    if preset.loss.id_lambda > 0 and not weights_present(cfg.irse50):
        raise FileNotFoundError(f"id_lambda={preset.loss.id_lambda} needs the ArcFace IR-SE50 weights at {cfg.irse50} "
                                "(model_ir_se50.pth); set train.loss.id_lambda=0 to train without the identity loss")
    filesystem, shard_dir = storage.reader_filesystem(cfg.shards)
    manifest = read_manifest(shard_dir, filesystem)
    paths = [str(p) for p in shard_paths(shard_dir, filesystem=filesystem)]
    counts = manifest["rows"]
    if counts.get("train", 0) < cfg.batch_size * cfg.num_workers:
        raise InputError(f"{counts.get('train', 0)} training rows cannot fill one batch of {cfg.batch_size} "
                         f"on each of {cfg.num_workers} workers")
    manifest_hash = hashlib.sha256(storage.read_bytes(storage.Location.of(cfg.shards) / MANIFEST_FILE)).hexdigest()
    run_name = run_name_for(cfg, manifest_hash)
    random_nets = random_weight_networks(cfg)
    for net in random_nets:
        log.warning("RANDOM WEIGHTS: %s runs on random weights (its file is absent or random was requested)", net)

    uri = tracking.use_tracking_store()
    experiment_id = tracking.ensure_experiment(cfg.experiment)
    client = mlflow.MlflowClient()
    run_id, finished_version = find_or_create_run(client, experiment_id, run_name, cfg, manifest, manifest_hash,
                                                  random_nets)
    if finished_version is not None:
        log.info("run %s already finished and registered as version %s", run_name, finished_version)
        return write_report(cfg, run_id, run_name, finished_version, client)

    raycluster.connect(cfg.num_workers * cfg.cpus_per_worker)
    raycluster.check_shared_storage(cfg.storage_path)
    columns = ["id", "image", "split"] + (["source_image"] if has_paired_sources(manifest) else [])
    shards = ray.data.read_parquet(paths, columns=columns, filesystem=filesystem)
    datasets = {split: shards.filter(expr=f"split == '{split}'").materialize() for split in ("train", "test")}
    has_test = datasets["test"].count() >= cfg.num_workers
    if not has_test:
        log.warning("the test split has fewer rows than workers: no validation, the last checkpoint is registered")
        del datasets["test"]

    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "run_id": run_id, "run_name": run_name,
                           "tracking_uri": uri, "paired_sources": has_paired_sources(manifest)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources, placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=run_name, **checkpoint_storage(cfg.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    with result.checkpoint.as_directory() as folder:
        best = Path(folder) / BEST_CHECKPOINT
        chosen = best if best.is_file() else Path(folder) / LAST_CHECKPOINT
        with mlflow.start_run(run_id=run_id):
            version = tracking.log_encoder(chosen, cfg.registered_model, cfg.alias)
            mlflow.set_tag(VERSION_TAG, version.version)
            mlflow.set_tag("psp.registered_checkpoint", chosen.name)
    summary = write_report(cfg, run_id, run_name, version.version, client)
    tracking.describe_version(version, version_description(cfg, summary["steps"], manifest, manifest_hash, random_nets))
    return summary


def checkpoint_storage(storage_path: str) -> dict[str, Any]:
    """Ray Train's `storage_path` (and, for a URI, the configured pyarrow filesystem it lives in)."""
    if not storage.is_uri(storage_path):
        return {"storage_path": storage_path}
    filesystem, path = storage.Location.of(storage_path).filesystem()
    return {"storage_path": path, "storage_filesystem": filesystem}


def version_description(cfg: TrainConfig, steps: int, manifest: dict, manifest_hash: str,
                        random_nets: list[str]) -> str:
    """What a trained version is, for the registry page: family, preset, sizes, steps, data, weights."""
    rows = manifest["rows"]
    weights = ("RANDOM WEIGHTS: " + ", ".join(random_nets).upper() + " (not comparable with published numbers)"
               if random_nets else "all networks from pretrained weights")
    family = FAMILY_NAMES[get_preset(cfg.preset).family]
    return (f"{family} encoder ({cfg.encoder_type}), preset {cfg.preset}: "
            f"{cfg.encoder_input_size} px input, {cfg.output_size} px generator, trained {steps} steps by "
            f"`psp train` on shards {manifest_hash[:16]} ({rows.get('train', 0)} train / "
            f"{rows.get('test', 0)} test rows). {weights}.")


def find_or_create_run(client: Any, experiment_id: str, run_name: str, cfg: TrainConfig, manifest: dict,
                       manifest_hash: str, random_nets: list[str]) -> tuple[str, str | None]:
    """The MLflow run of this Ray run name (to resume into), or a new one with params, tags (the weights'
    fingerprints among them) and its training and test shards as MLflow datasets.
    Returns (run_id, registered version if that run already finished)."""
    from pipelines import lineage

    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run = found[0]
        version = run.data.tags.get(VERSION_TAG)
        if version is None:
            client.update_run(run.info.run_id, status="RUNNING")
            log.info("resuming MLflow run %s (%s)", run.info.run_id, run_name)
        return run.info.run_id, version
    tags = {
        RUN_NAME_TAG: run_name,
        "mlflow.runName": run_name,
        "psp.preset": cfg.preset,
        "psp.git_commit": git_commit(),
        "psp.shard_manifest_sha256": manifest_hash,
        "psp.random_weights": ",".join(random_nets) or "none",
        **{lineage.WEIGHTS_TAG_PREFIX + name: fingerprint for name, fingerprint in weights_used(cfg).items()},
    }
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    from mlflow.entities import Param
    params = [Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    datasets = lineage.shard_datasets(cfg.shards, manifest)
    lineage.log_datasets(run.info.run_id, {"train": (datasets["train"], "training"),
                                           "test": (datasets["test"], "evaluation")})
    return run.info.run_id, None


def weights_used(cfg: TrainConfig) -> dict[str, str]:
    """The fingerprint (`sha256:...` or `random`) of each network's starting weights."""
    from pipelines.lineage import RANDOM, weights_fingerprint
    from psp_core.losses import alexnet_cache_path

    return {"generator": weights_fingerprint(local_weights(cfg.generator)),
            "irse50": weights_fingerprint(local_weights(cfg.irse50)),
            "lpips_alexnet": RANDOM if cfg.lpips_backbone == "random" else weights_fingerprint(alexnet_cache_path())}


def write_report(cfg: TrainConfig, run_id: str, run_name: str, version: str, client: Any) -> dict[str, Any]:
    """reports/train.json (DVC metrics): the final metrics of the run and what was registered."""
    run = client.get_run(run_id)
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("val_", "loss"))}
    summary = {"mlflow_run_id": run_id, "run_name": run_name, "registered_model": cfg.registered_model,
               "model_version": str(version), "model_uri": f"models:/{cfg.registered_model}/{version}", "alias": cfg.alias, "steps": int(run.data.metrics.get("step", 0)),
               "metrics": metrics, "precision": run.data.tags.get("psp.precision"),
               "compiled": run.data.tags.get("psp.compiled") == "true"}
    write_json_atomic(cfg.report, summary)
    client.set_terminated(run_id, "FINISHED")
    return summary


# ----------------------------------------------------------------------------- worker side

def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop: build the model and loss, resume from Ray's checkpoint, train."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["train"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        keep_freed_memory()                               # before the models exist, or glibc still trims
    preset = get_preset(cfg.preset).with_loss(**cfg.loss)

    torch.manual_seed(cfg.seed)                           # the same initial weights on every rank
    generator, irse50 = local_weights(cfg.generator), local_weights(cfg.irse50)
    net = build_psp(cfg.architecture(preset.input_nc), generator, irse50)
    prepare_for_training(net, cfg.train_decoder)           # freeze before DDP sees the parameters
    unused = getattr(net.encoder, "unused_parameters", lambda: False)()
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": unused})
    loss = PSPLoss(preset.loss, lpips_backbone=cfg.lpips_backbone,
                   irse50_path=irse50).to(device)
    callback = MLflowCallback(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    nodes = worker_nodes()
    if callback is not None:
        callback.client.set_tag(callback.run_id, "psp.nodes", str(len(set(nodes))))
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
        callback.client.set_tag(callback.run_id, "psp.precision", trainer.precision)
        compiled = training_compiles(trainer.config, net.arch, cfg.batch_size, device)
        callback.client.set_tag(callback.run_id, "psp.compiled", str(compiled).lower())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
                if (Path(folder) / name).is_file():
                    shutil.copy2(Path(folder) / name, local_dir / name)
        trainer.resume(local_dir / LAST_CHECKPOINT)
        if rank == 0:
            logging.getLogger(__name__).info("resumed at step %d", trainer.step)

    paired = config["paired_sources"]
    feeder = ShardFeeder(cfg.batch_size, cfg.seed, rank, preset.input_kind, paired)
    val = ShardFeeder(cfg.batch_size, cfg.seed, rank, preset.input_kind, paired, split="test")
    try:
        trainer.fit(feeder.epoch, val if _has_dataset("test") else None)
    finally:
        if callback is not None:
            callback.close()
        shutil.rmtree(local_dir, ignore_errors=True)


def worker_nodes() -> list[str]:
    """The Ray node id of every worker, gathered over the process group (rank order)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _has_dataset(name: str) -> bool:
    import ray.train

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
        import ray.train

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
        import torch.distributed as dist

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
        import ray.train

        metrics = {"step": self.step, **self.last_metrics}
        if not self.is_main_process:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="psp-report-") as folder:
            for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
                if (self.checkpoint_dir / name).is_file():
                    shutil.copy2(self.checkpoint_dir / name, Path(folder) / name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class MLflowCallback:
    """Rank 0's link to the driver's MLflow run: step and validation metrics, image grids, system metrics."""

    def __init__(self, tracking_uri: str, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True,
                                                tracking_uri=tracking_uri)
            self.monitor.start()
        except Exception as err:  # system metrics are a nicety; never fail training over them
            log.warning("system metrics disabled: %s", err)

    def _log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        rows = [Metric(prefix + k, float(v), stamp, step) for k, v in metrics.items()]
        rows.append(Metric("step", float(step), stamp, step))
        self.client.log_batch(self.run_id, metrics=rows)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics, prefix="val_")

    def on_images(self, step: int, name: str, grid: torch.Tensor) -> None:
        image = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        self.client.log_image(self.run_id, image, key=f"grid_{name}", step=step)

    def on_checkpoint(self, step: int, path: Path, is_best: bool) -> None:
        if is_best:
            self.client.set_tag(self.run_id, "psp.best_step", str(step))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
