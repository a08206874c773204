"""MLflow runs the stages open: a training run (found again by its Ray run name, so a rerun resumes into it;
registered once at the end), and the one-shot record of an inversion or edit job."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities import Param
from mlflow.entities.model_registry import ModelVersion

from pipelines.services.storage import Location, list_files, read_bytes
from pipelines.services.tracking.datasets import ShardDataset, log_datasets
from pipelines.services.tracking.models import log_encoder
from pipelines.services.tracking.store import client, ensure_experiment
from pipelines.services.tracking.vocabulary import (
    MLFLOW_BATCH_LIMIT,
    REGISTERED_CHECKPOINT_TAG,
    RUN_NAME_TAG,
    STOPPED_AT_STEP_TAG,
    VERSION_TAG,
    recorded_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRun:
    """The MLflow run of one Ray Train run (`run_name`): its id, and the version it registered once finished."""

    run_id: str
    run_name: str
    registered_version: str | None

    @classmethod
    def open(cls, experiment: str, run_name: str, tags: Mapping[str, str], params: Mapping[str, str],
             datasets: Mapping[str, tuple[ShardDataset, str]]) -> "TrainingRun":
        """The run of this Ray run name (resumed: marked RUNNING again unless it already registered), or a new
        one with its tags, params (cut to MLflow's limits) and datasets (each with its context)."""
        store = client()
        experiment_id = ensure_experiment(experiment)
        found = store.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            run = found[0]
            version = run.data.tags.get(VERSION_TAG)
            if version is None:
                store.update_run(run.info.run_id, status="RUNNING")
                log.info("resuming MLflow run %s (%s)", run.info.run_id, run_name)
            return cls(run.info.run_id, run_name, version)
        run = store.create_run(experiment_id, run_name=run_name, tags={
            RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **{k: recorded_text(v) for k, v in tags.items()}})
        rows = [Param(k, recorded_text(v)) for k, v in params.items()]
        for start in range(0, len(rows), MLFLOW_BATCH_LIMIT):
            store.log_batch(run.info.run_id, params=rows[start:start + MLFLOW_BATCH_LIMIT])
        log_datasets(run.info.run_id, dict(datasets))
        return cls(run.info.run_id, run_name, None)

    def fail(self) -> None:
        """Mark the run FAILED (training raised)."""
        client().set_terminated(self.run_id, "FAILED")

    def stop(self) -> int:
        """Mark the run KILLED (stopped by Ctrl-C or SIGTERM) with the last step it logged, as a tag; returns that
        step. A rerun of the same command resumes the run (RUNNING again) from its latest checkpoint."""
        step = int(client().get_run(self.run_id).data.metrics.get("step", 0))
        client().set_tag(self.run_id, STOPPED_AT_STEP_TAG, str(step))
        client().set_terminated(self.run_id, "KILLED")
        return step

    def finish(self) -> None:
        """Mark the run FINISHED."""
        client().set_terminated(self.run_id, "FINISHED")

    def register(self, checkpoint: Path, registered_model: str, alias: str | None,
                 w_encoder: Path | None = None) -> ModelVersion:
        """Log `checkpoint` (a HyperStyle one with its `w_encoder` file) as this run's encoder model, register it
        and tag the run with the version."""
        with mlflow.start_run(run_id=self.run_id):
            version = log_encoder(checkpoint, registered_model, alias, w_encoder=w_encoder)
            mlflow.set_tags({VERSION_TAG: version.version, REGISTERED_CHECKPOINT_TAG: checkpoint.name})
        return version

    def record(self) -> tuple[dict[str, float], dict[str, str]]:
        """The run's latest metrics and its tags."""
        run = client().get_run(self.run_id)
        return dict(run.data.metrics), dict(run.data.tags)


def record_job(experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
               metrics: Mapping[str, float], files: list[Path], folders: Mapping[str, Location] = {},
               dataset: tuple[ShardDataset, str] | None = None) -> str:
    """One finished run recording a job (an inversion, an edit): its params and tags, metrics, the data it
    read, report `files`, and `folders` of output (local or object store, copied through a local folder) as
    artifacts under their key. Returns the run id."""
    experiment_id = ensure_experiment(experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params({k: recorded_text(v) for k, v in params.items()})
        mlflow.set_tags({k: recorded_text(v) for k, v in tags.items()})
        for key, value in metrics.items():
            mlflow.log_metric(key, value)
        if dataset is not None:
            log_datasets(run.info.run_id, {"input": dataset})
        for artifact_path, folder in folders.items():
            with tempfile.TemporaryDirectory() as copy:
                for name in list_files(folder):
                    target = Path(copy) / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(read_bytes(folder / name))
                mlflow.log_artifacts(copy, artifact_path=artifact_path)
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id
