"""`psp lineage` reads a real SQLite store and real shard files: data it cannot check is not a pass unless asked,
damaged inputs are one line and exit 2, and reading creates nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.pipelines import make_shards
from helpers.tracking import tracking_store
from pipelines.cli import main
from pipelines.services import tracking
from pipelines.services.storage import Location
from psp_core.data.shards import read_manifest

MODEL = "lineage-test"
URI = f"models:/{MODEL}/1"


@pytest.fixture
def traced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository folder (no dvc.lock) with shards, and a store whose version 1 was trained on them."""
    repo = tmp_path / "repo"
    shards = make_shards(repo)
    monkeypatch.chdir(repo)
    with tracking_store(tmp_path):
        datasets = tracking.shard_datasets(Location.of(str(shards)), read_manifest(shards))
        run = tracking.TrainingRun.open("psp-lineage-test", "run-1", {}, {"max_steps": "6"},
                                        {split: (datasets[split], "training") for split in ("train",)})
        store = tracking.client()
        store.create_registered_model(MODEL)
        store.create_model_version(MODEL, source=str(repo), run_id=run.run_id)
        yield repo


def lineage(capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str, str]:
    code = main(["lineage", URI, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_link_present_matches(traced, capsys):
    code, out, err = lineage(capsys, "--json")
    checks = json.loads(out)["datasets"][0]["checks"]
    assert code == 0, err
    assert len(checks) > 1 and {c["verdict"] for c in checks} == {"matches"}


def test_absent_shards_fail_unless_a_partial_check_is_asked_for(traced, capsys):
    shutil.move(traced / "shards", traced.parent / "elsewhere")
    code, out, err = lineage(capsys)
    assert code == 1
    assert "not checked (absent)" in out
    assert err.splitlines() == ["psp lineage: 1 recorded file(s) absent here, so not checked; run where the data is, "
                                "or pass --partial to accept a partial check"]
    code, out, err = lineage(capsys, "--partial")
    assert code == 0 and "not checked (absent)" in out and not err


@pytest.mark.parametrize("manifest, message", [
    ("[]", "schema version None, this reader reads 1"),
    ("no sha256", "a shard entry lacks its file name or sha256"),
])
def test_a_damaged_manifest_is_one_line(traced, capsys, manifest, message):
    path = traced / "shards" / "manifest.json"
    if manifest == "[]":
        path.write_text("[]")
    else:
        document = json.loads(path.read_text())
        del document["shards"][0]["sha256"]
        path.write_text(json.dumps(document))
    code, out, err = lineage(capsys)
    assert code == 2 and not out
    assert err.splitlines() == [f"psp lineage: error: {path.resolve()}: {message}"]


@pytest.mark.parametrize("text", ["stages: [unclosed", "stages: {shard: {outs: [3]}}", "- a list"])
def test_a_garbled_dvc_lock_is_one_line(traced, capsys, text):
    (traced / "dvc.lock").write_text(text)
    code, out, err = lineage(capsys)
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith("psp lineage: error: dvc.lock of the working tree: not ")


@pytest.mark.parametrize("content", [b"garbage " * 600, "truncated"])
def test_a_damaged_store_is_one_line(tmp_path, monkeypatch, capsys, content):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow" / "mlflow.db"
    with tracking_store(tmp_path):
        tracking.client().search_experiments()   # a real store, written by MLflow
    data = store.read_bytes()
    store.write_bytes(content if isinstance(content, bytes) else data[:len(data) // 2] + b"\0" * (len(data) // 2))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking.store, "_CHECKED_STORES", set())   # as a new `psp` process finds it
    capsys.readouterr()
    code, out, err = lineage(capsys)
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith(f"psp lineage: error: {store}: "), err


def test_run_outside_a_repository_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = lineage(capsys)
    assert code == 2 and not out
    assert err.splitlines() == [f"psp lineage: error: no MLflow store at {tmp_path / 'mlflow' / 'mlflow.db'}: run in "
                                "the repository that holds mlflow/mlflow.db, or set MLFLOW_TRACKING_URI"]
    assert list(tmp_path.iterdir()) == []
