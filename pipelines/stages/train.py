"""`psp train`: distributed pSp training on Ray Train, tracked in MLflow, encoder registered at the end.

The driver validates params, opens the Parquet shards as Ray datasets, creates (or resumes) the
MLflow run and launches a TorchTrainer. Each worker runs `psp_core.training.engine.Trainer` under DDP
(`pipelines.stages.train_worker`); rank 0 alone writes to MLflow, into the driver's run. Checkpoints go
through `ray.train.report`, so a restarted worker, or the same command run again, resumes from the latest one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from pipelines.params.loading import load_section
from pipelines.params.schema import TrainConfig
from pipelines.services import storage, tracking
from pipelines.services.ray import (
    ResourceRequest,
    check_local_gpus,
    check_shared_storage,
    connect,
    fit_keeping_signals,
    read_splits,
    torch_trainer,
)
from pipelines.services.storage import file_digest, write_json_atomic
from pipelines.services.storage.converted import converted_generator
from pipelines.stages.train_worker import train_worker
from psp_core.data.presets import TaskPreset, get_preset
from psp_core.data.shards import ShardManifest
from psp_core.errors import InputError
from psp_core.nets.checkpoints import check_generator_fits, read_generator_checkpoint
from psp_core.options import FAMILY_NAMES, HYPERSTYLE
from psp_core.training.engine import BEST_CHECKPOINT, LAST_CHECKPOINT
from psp_core.training.losses import alexnet_cache_path, require_alexnet

log = logging.getLogger(__name__)


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
    absolute = lambda x: x if storage.is_remote(x) else Path(x).resolve()  # noqa: E731
    return cfg.model_copy(update={"shards": absolute(cfg.shards), "generator": absolute(cfg.generator),
                                  "irse50": absolute(cfg.irse50), "w_encoder": absolute(cfg.w_encoder),
                                  "resnet34": absolute(cfg.resnet34), "storage_path": str(absolute(cfg.storage_path))})


def weights_present(path: Path | str) -> bool:
    """Whether a weights file is there: a URI is (its access is checked before training, a registry artifact
    is fetched then), a local path if it is a file."""
    return storage.is_remote(path) or Path(path).is_file()


def check_data_access(cfg: TrainConfig) -> None:
    """Every object-store location the run reads or writes is usable: else one line naming it (exit 2),
    before Ray or MLflow starts."""
    storage.check_access(cfg.shards)
    for weights in (cfg.generator, cfg.irse50, cfg.w_encoder, cfg.resnet34):
        if storage.is_uri(weights):
            storage.check_access(weights)
    storage.check_access(cfg.storage_path, write=True)


def check_generator(cfg: TrainConfig, preset: TaskPreset) -> None:
    """The generator file the run starts from has the size and channel multiplier the params build: else one line
    before MLflow or Ray start, not the same error on every worker. A network pickle is converted here, once per
    machine (the workers on this machine find it in the cache)."""
    if weights_present(cfg.generator):
        local = converted_generator(tracking.fetch_weights(cfg.generator))
        check_generator_fits(cfg.architecture(preset.input_nc), read_generator_checkpoint(local).generator, cfg.generator)


def check_w_encoder(cfg: TrainConfig, preset: TaskPreset) -> None:
    """HyperStyle refines a trained W encoder's codes: its file must be there (one line before MLflow or Ray start)."""
    if preset.family == HYPERSTYLE and not weights_present(cfg.w_encoder):
        raise FileNotFoundError(f"preset hyperstyle_encode refines the codes of a trained W encoder, and there is none "
                                f"at {cfg.w_encoder}: set train.w_encoder to one (a released W encoder such as "
                                "faces_w_encoder.pt, or one trained by `psp train train.preset=w_encode "
                                "train.encoder_type=WEncoder`)")


def random_weight_networks(cfg: TrainConfig, family: str) -> list[str]:
    """The networks that will run on random weights because their files are absent (or by request)."""
    missing = []
    if not weights_present(cfg.generator):
        missing.append("generator")
    if family == HYPERSTYLE:
        if not weights_present(cfg.resnet34):
            missing.append("hypernet_resnet34")
    elif not weights_present(cfg.irse50):
        missing.append("encoder_backbone_irse50")
    if cfg.lpips_backbone == "random":
        missing.append("lpips_alexnet")
    return missing


def run_name_for(cfg: TrainConfig, manifest: ShardManifest, fingerprints: dict[str, str]) -> str:
    """`cfg.run_name`, or for 'auto' a name from a hash of the params, the data and the starting weights'
    fingerprints (`weights_used`), so an unchanged rerun resumes its run and any change starts a new one: a
    generator or W encoder file replaced at the same path must not be frozen under a hypernetwork or encoder
    trained against the old one."""
    if cfg.run_name != "auto":
        return cfg.run_name
    identity = cfg.model_dump(mode="json", exclude={"run_name", "report", "alias", "num_to_keep", "max_failures"})
    identity_json = json.dumps([identity, manifest.digest, fingerprints], sort_keys=True)
    digest = hashlib.sha256(identity_json.encode()).hexdigest()[:10]
    return f"{cfg.preset}-{digest}"


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown'."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flat_params(cfg: TrainConfig, preset: TaskPreset) -> dict[str, str]:
    """Every resolved parameter, plus the preset's effective loss weights, as MLflow params."""
    params = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "loss"}
    params.update({f"loss.{k}": v for k, v in asdict(preset.loss).items()})
    return {k: str(v) for k, v in params.items()}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `cfg` to the end; return the summary written to the report."""
    # inputs
    tracking.check_registry_names(cfg.registered_model, cfg.alias, setting="train.registered_model",
                                  alias_setting="train.alias")
    check_data_access(cfg)
    request = ResourceRequest("train", cfg.num_workers, cfg.cpus_per_worker, int(cfg.use_gpu))
    check_local_gpus(request)
    preset = get_preset(cfg.preset).with_loss(**cfg.loss)
    if cfg.lpips_backbone == "pretrained":
        require_alexnet()
    check_generator(cfg, preset)
    check_w_encoder(cfg, preset)
    if preset.loss.id_lambda > 0 and not weights_present(cfg.irse50):
        raise FileNotFoundError(f"id_lambda={preset.loss.id_lambda} needs the ArcFace IR-SE50 weights at {cfg.irse50} "
                                "(model_ir_se50.pth); set train.loss.id_lambda=0 to train without the identity loss")
    source = storage.StageInput.of(cfg.shards)
    manifest = source.shards()
    paths = [str(p) for p in source.shard_paths()]
    if manifest.rows.get("train", 0) < cfg.batch_size * cfg.num_workers:
        raise InputError(f"{manifest.rows.get('train', 0)} training rows cannot fill one batch of {cfg.batch_size} "
                         f"on each of {cfg.num_workers} workers")
    fingerprints = weights_used(cfg, preset.family)
    run_name = run_name_for(cfg, manifest, fingerprints)
    random_nets = random_weight_networks(cfg, preset.family)
    for net in random_nets:
        log.warning("RANDOM WEIGHTS: %s runs on random weights (its file is absent or random was requested)", net)

    # the MLflow run (resumed by its Ray run name)
    datasets = tracking.shard_datasets(source.location, manifest)
    tags = {tracking.PRESET_TAG: cfg.preset, tracking.GIT_COMMIT_TAG: git_commit(),
            tracking.MANIFEST_DIGEST_TAG: manifest.digest, tracking.RANDOM_WEIGHTS_TAG: ",".join(random_nets) or "none",
            **{tracking.WEIGHTS_TAG_PREFIX + name: value for name, value in fingerprints.items()}}
    run = tracking.TrainingRun.open(cfg.experiment, run_name, tags, flat_params(cfg, preset),
                                    {"train": (datasets["train"], "training"), "test": (datasets["test"], "evaluation")})
    if run.registered_version is not None:
        log.info("run %s already finished and registered as version %s", run_name, run.registered_version)
        return write_report(cfg, run, run.registered_version)

    # Ray Train
    try:
        connect(request)
        check_shared_storage(cfg.storage_path)
    except Exception:
        run.fail()
        raise
    splits = read_splits(paths, manifest, source.filesystem)
    if splits["test"].count() < cfg.num_workers:
        log.warning("the test split has fewer rows than workers: no validation, the last checkpoint is registered")
        del splits["test"]
    weights = {name: str(path) if weights_present(path) else None
               for name, path in (("generator", cfg.generator), ("irse50", cfg.irse50), ("w_encoder", cfg.w_encoder),
                                  ("resnet34", cfg.resnet34))}
    trainer = torch_trainer(
        train_worker,
        train_loop_config={"train": cfg, "preset": preset, "run_id": run.run_id, "run_name": run_name,
                           "tracking_uri": tracking.use_tracking_store(), "paired_sources": manifest.paired_sources,
                           **weights},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=request.per_worker, placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=run_name, **checkpoint_storage(cfg.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        datasets=splits,
    )
    try:
        result = fit_keeping_signals(trainer)
    except KeyboardInterrupt:
        step = run.stop()
        log.warning("stopped at step %d: MLflow run %s marked KILLED; the same command resumes it", step, run.run_id)
        raise
    except Exception:
        run.fail()
        raise

    # outputs: the registered version and the report
    with result.checkpoint.as_directory() as folder:
        best = Path(folder) / BEST_CHECKPOINT
        w_encoder = tracking.fetch_weights(cfg.w_encoder) if preset.family == HYPERSTYLE else None
        version = run.register(best if best.is_file() else Path(folder) / LAST_CHECKPOINT, cfg.registered_model,
                               cfg.alias, w_encoder)
    summary = write_report(cfg, run, version.version)
    tracking.describe_version(version, version_description(cfg, preset, summary["steps"], manifest, random_nets))
    return summary


def checkpoint_storage(storage_path: str) -> dict[str, Any]:
    """Ray Train's `storage_path` (and, for a URI, the configured pyarrow filesystem it lives in)."""
    if not storage.is_uri(storage_path):
        return {"storage_path": storage_path}
    filesystem, path = storage.Location.of(storage_path).filesystem()
    return {"storage_path": path, "storage_filesystem": filesystem}


def version_description(cfg: TrainConfig, preset: TaskPreset, steps: int, manifest: ShardManifest,
                        random_nets: list[str]) -> str:
    """What a trained version is, for the registry page: family, preset, sizes, steps, data, weights."""
    rows = manifest.rows
    weights = ("RANDOM WEIGHTS: " + ", ".join(random_nets).upper() + " (not comparable with published numbers)"
               if random_nets else "all networks from pretrained weights")
    family = FAMILY_NAMES[preset.family]
    return (f"{family} encoder ({cfg.encoder_type}), preset {cfg.preset}: "
            f"{cfg.encoder_input_size} px input, {cfg.output_size} px generator, trained {steps} steps by "
            f"`psp train` on shards {manifest.digest[:16]} ({rows.get('train', 0)} train / "
            f"{rows.get('test', 0)} test rows). {objective_description(cfg, preset)} {weights}.")


def objective_description(cfg: TrainConfig, preset: TaskPreset) -> str:
    """The training objective in a sentence: the loss weights, and for e4e (and a W encoder) its schedule and
    discriminator."""
    w = preset.loss
    terms = ", ".join(f"{f.name} {getattr(w, f.name):g}" for f in fields(w) if getattr(w, f.name) > 0)
    if preset.family == HYPERSTYLE:
        layers = "the reference's default layers" if cfg.layers_to_tune is None else f"layers {cfg.layers_to_tune}"
        return (f"Objective: HyperStyle's ({terms}; the hypernetwork alone, offsetting {layers}, over "
                f"{cfg.n_iters_per_batch} passes per batch, each pass's loss back-propagated; W encoder "
                f"{Path(str(cfg.w_encoder)).name}, frozen).")
    adversary = (f"latent discriminator (lr {cfg.w_discriminator_lr:g}, R1 {cfg.r1:g} every {cfg.d_reg_every} steps, "
                 f"code pools of {cfg.w_pool_size if cfg.use_w_pool else 0})" if w.w_discriminator_lambda > 0
                 else "no latent discriminator")
    if preset.family == "w_encoder":
        return f"Objective: e4e's with one code for every style ({terms}; {adversary})."
    if preset.family != "e4e":
        return f"Objective: {terms}."
    schedule = ("every delta from the start" if cfg.progressive_start is None else
                f"progressive deltas from step {cfg.progressive_start}, one layer every {cfg.progressive_step_every}")
    return f"Objective: e4e's ({terms}; {schedule}; delta norm p={cfg.delta_norm:g}; {adversary})."


def weights_used(cfg: TrainConfig, family: str) -> dict[str, str]:
    """The fingerprint (`sha256:...` or `random`) of each network's starting weights."""
    def fingerprint(path: Path | str) -> str:
        return f"sha256:{file_digest(tracking.fetch_weights(path))}" if weights_present(path) else tracking.RANDOM

    alexnet = alexnet_cache_path()
    hyperstyle = {"w_encoder": fingerprint(cfg.w_encoder), "resnet34": fingerprint(cfg.resnet34)} \
        if family == HYPERSTYLE else {}
    return {"generator": fingerprint(cfg.generator), "irse50": fingerprint(cfg.irse50), **hyperstyle,
            "lpips_alexnet": tracking.RANDOM if cfg.lpips_backbone == "random" or not alexnet.is_file()
            else f"sha256:{file_digest(alexnet)}"}


def write_report(cfg: TrainConfig, run: tracking.TrainingRun, version: str) -> dict[str, Any]:
    """reports/train.json (DVC metrics): the final metrics of the run and what was registered."""
    metrics, tags = run.record()
    summary = {"mlflow_run_id": run.run_id, "run_name": run.run_name, "registered_model": cfg.registered_model,
               "model_version": str(version), "model_uri": f"models:/{cfg.registered_model}/{version}",
               "alias": cfg.alias, "steps": int(metrics.get("step", 0)),
               "metrics": {k: v for k, v in metrics.items() if k.startswith(("val_", "loss"))},
               "precision": tags.get(tracking.PRECISION_TAG), "compiled": tags.get(tracking.COMPILED_TAG) == "true"}
    write_json_atomic(cfg.report, summary)
    run.finish()
    return summary
