"""The training splits of a shard folder on a real Ray instance: each split is its rows of the shard files, read
once, every column but `source_path`, held in the object store."""
from __future__ import annotations

import pyarrow.parquet as pq
import ray
from ray.data.dataset import MaterializedDataset

from helpers.pipelines import make_shards
from pipelines.services.ray.splits import read_splits
from psp_core.data.shards import read_manifest, shard_paths


def test_each_split_is_its_rows_of_the_shard_files(tmp_path):
    folder = make_shards(tmp_path, images=12, test_fraction=0.4)
    manifest = read_manifest(folder)
    paths = [str(p) for p in shard_paths(folder)]
    written = pq.read_table(paths).to_pylist()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        splits = read_splits(paths, manifest, filesystem=None)
        rows = {split: dataset.take_all() for split, dataset in splits.items()}
        assert all(isinstance(dataset, MaterializedDataset) for dataset in splits.values())
    finally:
        ray.shutdown()
    assert set(rows) == {"train", "test"}
    expected = {r["id"]: r["image"] for r in written}
    for split, taken in rows.items():
        assert len(taken) == manifest.rows[split] > 0
        assert sorted(r["id"] for r in taken) == sorted(r["id"] for r in written if r["split"] == split)
        assert all(set(r) == set(manifest.columns) - {"source_path"} for r in taken)
        assert all(r["image"] == expected[r["id"]] for r in taken)
