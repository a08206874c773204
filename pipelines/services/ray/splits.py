"""The training splits of a shard folder as Ray datasets: the Parquet files read once, each split taken from what
was read and held in Ray's object store, so every epoch of every worker reads blocks, not files."""
from __future__ import annotations

from typing import Any

import ray
from ray.data import Dataset

from psp_core.data.shards import ShardManifest


def read_splits(paths: list[str], manifest: ShardManifest, filesystem: Any) -> dict[str, Dataset]:
    """The train and test rows of the shard files `paths` (every column but `source_path`), materialized."""
    columns = [c for c in manifest.columns if c != "source_path"]
    rows = ray.data.read_parquet(paths, columns=columns, filesystem=filesystem).materialize()
    return {split: rows.filter(expr=f"split == '{split}'").materialize() for split in ("train", "test")}
