"""The data a run read, recorded as MLflow datasets: one per split of a shard folder (by reference: its
manifest's digest, the shard schema, row counts; never the image bytes), logged as run inputs."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.services.storage import Location
from psp_core.data.shards import SHARD_SCHEMA, ShardManifest

_COLUMN_TYPES = {"string": DataType.string, "binary": DataType.binary, "int32": DataType.integer}


class ShardDataset(MetaDataset):
    """Shards by reference: metadata and counts, not the image bytes."""

    def __init__(self, rows: int, **kwargs: Any) -> None:
        self._rows = rows
        super().__init__(**kwargs)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self._rows}

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self.profile)}


def shard_schema() -> Schema:
    """The MLflow schema of a shard row, derived from the one shard schema (`psp_core.data.shards.SHARD_SCHEMA`):
    its scalar columns (landmarks, a nested list, are described by the shard schema alone)."""
    return Schema([ColSpec(_COLUMN_TYPES[str(f.type)], f.name) for f in SHARD_SCHEMA if str(f.type) in _COLUMN_TYPES])


def shard_datasets(shards: Location, manifest: ShardManifest) -> dict[str, ShardDataset]:
    """One MLflow dataset per split of a shard folder (and `total` for all rows): name `shards/<split>`,
    digest = the manifest's digest, source = the folder, the shard schema, and the split's row count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "can be interpreted in multiple ways": a local folder
        source = resolve_dataset_source(shards.uri if not shards.is_local else str(Path(shards.path).resolve()))
    return {split: ShardDataset(rows=int(manifest.rows.get(split, 0)), source=source, name=f"shards/{split}",
                                digest=manifest.digest, schema=shard_schema())
            for split in ("train", "test", "total")}


def log_datasets(run_id: str, datasets: dict[str, tuple[Any, str]]) -> None:
    """Log datasets as inputs of a run, each with its context (`training`, `evaluation`, `inference`)."""
    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for dataset, context in datasets.values()]
    mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)



def dataset_context(item: Any) -> str:
    """The context (`training`, `evaluation`, `inference`) a logged dataset input was recorded with."""
    return next((t.value for t in item.tags if t.key == MLFLOW_DATASET_CONTEXT), "")
