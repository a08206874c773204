"""Object storage end to end, against a real S3 server (SeaweedFS, tests/helpers/s3.py): `psp shard` into a
bucket, `psp train` on a 2-node Ray cluster whose nodes share nothing but the bucket (shards, generator
weights, checkpoints; a worker killed and the run resumed from its S3 checkpoint), MLflow artifacts in the
bucket, `psp invert` and `psp edit` from the bucket into the bucket, a DVC remote on the bucket, and the
one-line errors of a wrong secret key, a missing bucket and a missing input."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from helpers.editing import UNITS, write_edit_params, write_inversion
from helpers.pipelines import (
    PSP,
    SMALL_MODEL,
    TINY_TRAIN,
    clean_env,
    face_like_png,
    free_port,
    ray_train_workers,
    run_psp,
    wait_until,
)
from pipelines.cli import main
from pipelines.params.schema import TrainConfig
from pipelines.services import storage
from pipelines.services.tracking import WEIGHTS_TAG_PREFIX
from pipelines.stages.shard import ShardConfig, write_shards
from psp_core import load_psp
from psp_core.nets.psp import PSP as PSPNet

MAX_STEPS, SAVE_INTERVAL = 8, 4   # two checkpoints (SMALL_MODEL's): uploading them is most of this test's time
BIN = Path(sys.executable).parent


def test_shard_readers_work_on_a_bucket_and_check_it(tmp_path, s3_server, monkeypatch):
    """psp_core's one shard reader, given the store's filesystem: the manifest, the listed files (size and
    sha256 checked), decoded batches equal to the local copy's; a replaced shard is caught."""
    from psp_core.data.shards import ShardError, iter_shard_batches, read_manifest, shard_paths

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.bucket}/readers/shards"
    images = make_images(tmp_path / "aligned", 6)
    for output in (uri, str(tmp_path / "shards")):
        write_shards(ShardConfig(input_dir=str(images), output_dir=output, report=str(tmp_path / "shard.json"),
                                 rows_per_shard=4, test_fraction=0.5))
    filesystem, folder = storage.reader_filesystem(uri)
    remote_manifest, local_manifest = read_manifest(folder, filesystem), read_manifest(tmp_path / "shards")
    drop_names = lambda m: {**m.document, "shards": [{k: v for k, v in e.items() if k != "file"} for e in m.shards]}  # noqa: E731
    assert drop_names(remote_manifest) == drop_names(local_manifest)   # same bytes; in the bucket under a generation prefix
    remote = list(iter_shard_batches(shard_paths(folder, verify=True, filesystem=filesystem), 4, filesystem=filesystem))
    local = list(iter_shard_batches(shard_paths(tmp_path / "shards"), 4))
    assert [b.ids for b in remote] == [b.ids for b in local] and len(remote) == 2
    assert all(np.array_equal(r.images, l.images) for r, l in zip(remote, local))
    first = remote_manifest.shards[0]["file"]
    storage.write_bytes_atomic(f"{uri}/{first}", b"not the shard")
    with pytest.raises(ShardError, match="not the size the manifest records"):
        shard_paths(folder, filesystem=filesystem)


def test_import_generator_reads_a_pickle_from_a_bucket(tmp_path, s3_server, monkeypatch, capsys):
    """`psp import-generator s3://.../network.pkl OUT`: the pickle comes through the weights cache, and the file
    written is the one a local copy of the same pickle gives."""
    from helpers.ada import ada_generator, write_network_pickle
    from pipelines.cli import main

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # a weights cache of its own
    local = write_network_pickle(tmp_path / "network-snapshot-000300.pkl", ada_generator(seed=3))
    uri = f"s3://{s3_server.bucket}/weights/network-snapshot-000300.pkl"
    storage.write_bytes_atomic(uri, local.read_bytes())
    assert main(["import-generator", uri, str(tmp_path / "from_bucket.pt")]) == 0
    assert main(["import-generator", str(local), str(tmp_path / "from_disk.pt")]) == 0
    capsys.readouterr()
    from_bucket = torch.load(tmp_path / "from_bucket.pt", weights_only=True)
    from_disk = torch.load(tmp_path / "from_disk.pt", weights_only=True)
    assert from_bucket.keys() == from_disk.keys()
    assert all(torch.equal(v, from_disk["g_ema"][k]) for k, v in from_bucket["g_ema"].items())
    sidecar = json.loads((tmp_path / "from_bucket.pt.json").read_text())
    assert sidecar["source_sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()


def test_data_path_settings_keep_uris_and_refuse_credentials():
    train = TrainConfig(shards="s3://bucket/shards/", generator="models:/gen/1", irse50="weights/ir.pth")
    assert (train.shards, train.generator, train.irse50) == ("s3://bucket/shards", "models:/gen/1", Path("weights/ir.pth"))
    with pytest.raises(ValueError, match="credentials and options do not go in a URI") as err:
        TrainConfig(shards="s3://AKIAKEY:secret@bucket/shards")
    assert "AKIAKEY:secret" not in str(err.value).split("input_value")[0]


@pytest.mark.slow
def test_edit_reads_and_writes_a_bucket(tmp_path, s3_server, model_file, registered, monkeypatch, capsys):  # noqa: F811
    """`psp edit` of an inversion in the bucket into the bucket: latents, images, grids and manifest there, the
    grids in MLflow; a rerun skips every unit and writes nothing; a missing input is one line."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"s3://{s3_server.bucket}/edit"
    codes = write_inversion(tmp_path / "inversion", load_psp(model_file), "models:/psp-encoder/1")
    for path in (tmp_path / "inversion").iterdir():
        storage.write_bytes_atomic(f"{bucket}/latents/{path.name}", path.read_bytes())
    write_edit_params(tmp_path, input=f"{bucket}/latents", output_dir=f"{bucket}/edits",
                      edits=[{"kind": "sefa", "top_k": 2, "start": -3.0, "end": 3.0, "steps": 3}])
    env = {**s3_server.env(), **registered}

    done = run_psp(["edit"], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = f"{bucket}/edits"
    names = storage.list_files(out)
    assert [n for n in names if n.startswith("latents/")] == [f"latents/{u}.parquet" for u in sorted(UNITS)]
    assert [n for n in names if n.startswith("grids/")] == ["grids/sefa-0.png", "grids/sefa-1.png"]
    assert "manifest.json" in names and storage.exists(f"{out}/.psp-output.json")
    rows = [row for n in names if n.startswith("latents/")
            for row in pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{n}"))).to_pylist()]
    assert len(rows) == len(codes) * 6 and {r["id"] for r in rows} == set(codes)
    assert sorted(r["image"] for r in rows) == [n for n in names if n.startswith("images/")]
    assert Image.open(io.BytesIO(storage.read_bytes(f"{out}/{rows[0]['image']}"))).size == (16, 16)
    assert Image.open(io.BytesIO(storage.read_bytes(f"{out}/grids/sefa-0.png"))).size == (3 * 34 + 2, 4 * 34 + 2)
    client = mlflow.MlflowClient(tracking_uri=registered["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("psp-edits").experiment_id])[0]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "grids")) == ["grids/sefa-0.png", "grids/sefa-1.png"]

    before = objects(out)
    again = run_psp(["edit"], tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "edit.json").read_text())
    assert report["units_skipped"] == len(UNITS) and report["images_written"] == 0 and report["grids_written"] == []
    assert objects(out) == before, "a rerun writes nothing"

    write_edit_params(tmp_path, input=f"{bucket}/no-such-latents", output_dir=f"{bucket}/edits-2")
    assert main(["edit", "--params", str(tmp_path / "params.yaml")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"psp edit: error: cannot access {bucket}/no-such-latents: no such file or folder", error
    assert not storage.exists(f"{bucket}/edits-2")


def objects(uri: str) -> dict[str, tuple[int, int]]:
    """Every object under `uri` (hidden ones too) with its size and modification time."""
    fs, key = storage.Location.of(uri).filesystem()
    return {i.path: (i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(key, recursive=True))
            if i.type == pafs.FileType.File}


@pytest.mark.slow
@pytest.mark.timeout(1500)   # two Ray nodes training beside the other xdist worker's run: 4-5 min, slower under load
def test_shard_train_invert_and_dvc_on_object_storage(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env().items():     # Ray's nodes and every `psp` inherit the AWS environment
        monkeypatch.setenv(name, value)
    bucket = f"s3://{s3_server.bucket}"
    driver, head, worker_node = (tmp_path / name for name in ("driver", "head", "node2"))
    for folder in (driver, head, worker_node):
        folder.mkdir()
    images = make_images(tmp_path / "aligned", 16)
    generator_uri = f"{bucket}/weights/generator.pt"
    generator_sha = upload_tiny_generator(generator_uri)
    write_params(driver, images, bucket, generator_uri)
    with MlflowServer(tmp_path / "mlflow", f"{bucket}/mlflow") as server:   # starts while we shard
        run_stages(driver, head, worker_node, bucket, s3_server, server, generator_sha, monkeypatch)

    # DVC remote on the same store: push, then a fresh clone pulls the outputs without re-running
    dvc_round_trip(tmp_path / "repo", tmp_path / "clone", images, f"{bucket}/dvc", s3_server.endpoint)


def run_stages(driver: Path, head: Path, worker_node: Path, bucket: str, s3_server, server: "MlflowServer",
               generator_sha: str, monkeypatch) -> None:
    """Shard into the bucket, the two one-line errors, training on two nodes, inversion into the bucket."""
    # shards into the bucket
    shard = run_psp(["shard"], driver)
    assert shard.returncode == 0, shard.stderr[-3000:]
    manifest = json.loads(storage.read_bytes(f"{bucket}/shards/manifest.json"))
    assert manifest["rows"]["total"] == 16 and manifest["rows"]["test"] >= 2
    assert all(storage.exists(f"{bucket}/shards/{e['file']}") for e in manifest["shards"])

    # a wrong secret key and a missing bucket: one line naming the URI, exit 2, before any work
    wrong = run_psp(["train"], driver, env={**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-key"})
    check_one_line_error(wrong, f"{bucket}/shards", "access denied", s3_server.secret_key)
    missing = run_psp(["shard", "shard.output_dir=s3://psp-no-such-bucket/shards"], driver, env=s3_server.env())
    check_one_line_error(missing, "s3://psp-no-such-bucket/shards", "bucket 'psp-no-such-bucket' does not exist",
                         s3_server.secret_key)

    # training on two nodes with a killed worker, tracked by an MLflow server with S3 artifacts
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(head)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        monkeypatch.chdir(worker_node)
        cluster.add_node(num_cpus=2)
        monkeypatch.chdir(driver)
        tracking = server.wait()
        env = {**s3_server.env(), "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": tracking}
        killed_at, restarted_at = train_with_a_killed_worker(driver, env, f"{bucket}/ray")
        version = check_training(mlflow.MlflowClient(tracking, registry_uri=tracking), killed_at, restarted_at,
                                 bucket, generator_sha, s3_server.secret_key)

        # inversion from the bucket into the bucket with the registered model
        invert = run_psp(["invert"], driver, env=env)
        assert invert.returncode == 0, invert.stderr[-3000:]
    finally:
        cluster.shutdown()
    check_latents(f"{bucket}/latents", manifest, bucket, f"models:/psp-encoder/{version.version}")
    for folder in (driver, head, worker_node):
        assert not (folder / "ray_results").exists() and not (folder / "data").exists(), "data went to a local folder"
        assert not (folder / "mlflow").exists(), "with MLFLOW_TRACKING_URI set nothing goes to a local store"


def check_training(client: mlflow.MlflowClient, killed_at: float, restarted_at: float, bucket: str,
                   generator_sha: str, secret: str):
    """One finished run on 2 nodes that resumed from an S3 checkpoint after the kill, started from the
    uploaded generator, registered as @candidate with its artifacts in the bucket; returns the version."""
    run = only_run(client)
    history = [(m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "loss")]
    before = sorted(step for step, stamp in history if stamp < killed_at * 1000)
    after = sorted(step for step, stamp in history if stamp >= restarted_at * 1000)
    assert before and before[-1] < MAX_STEPS, history
    resumed_from = after[0] - 1
    assert resumed_from > 0 and resumed_from % SAVE_INTERVAL == 0, f"not resumed from a checkpoint: {history}"
    assert after[-1] == MAX_STEPS and run.data.tags["psp.nodes"] == "2"
    assert run.data.tags[WEIGHTS_TAG_PREFIX + "generator"] == f"sha256:{generator_sha}"
    assert "generator" not in run.data.tags["psp.random_weights"]
    assert secret not in json.dumps(run.data.params)
    version = client.get_model_version_by_alias("psp-encoder", "candidate")
    assert version.run_id == run.info.run_id
    stored = storage.list_files(f"{bucket}/mlflow")
    assert any(name.endswith(".pt") for name in stored), stored   # the registered encoder is in the bucket
    assert any("checkpoint_" in name for name in storage.list_files(f"{bucket}/ray")), "no S3 checkpoints"
    return version


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for seed in range(count):
        (folder / f"face{seed:03d}.png").write_bytes(face_like_png(seed))
    return folder


def upload_tiny_generator(uri: str) -> str:
    """A StyleGAN2 checkpoint ({'g_ema': ...}) of the tiny config's generator, uploaded; returns its sha256."""
    torch.manual_seed(1)
    arch = TrainConfig(**{**TINY_TRAIN, **SMALL_MODEL}).architecture(3)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"psp-test-generator-{os.getpid()}.pt"
    torch.save({"g_ema": PSPNet(arch).decoder.state_dict()}, path)
    data = path.read_bytes()
    path.unlink()
    storage.write_bytes_atomic(uri, data)
    return hashlib.sha256(data).hexdigest()


def write_params(root: Path, images: Path, bucket: str, generator_uri: str) -> None:
    """params.yaml: every data path in the bucket; no local path is shared between the Ray nodes."""
    params = {
        "shard": {"input_dir": str(images), "output_dir": f"{bucket}/shards", "report": "reports/shard.json",
                  "test_fraction": 0.3},
        "train": {**TINY_TRAIN, **SMALL_MODEL, "max_steps": MAX_STEPS, "save_interval": SAVE_INTERVAL, "val_interval": 4,
                  "image_interval": 4, "placement_strategy": "SPREAD", "shards": f"{bucket}/shards",
                  "generator": generator_uri, "irse50": "absent/model_ir_se50.pth", "storage_path": f"{bucket}/ray"},
        "invert": {"model": "models:/psp-encoder@candidate", "input": f"{bucket}/shards",
                   "output_dir": f"{bucket}/latents", "report": "reports/invert.json", "batch_size": 4,
                   "num_actors": 1, "cpus_per_actor": 1, "lpips_backbone": "random", "precision": "fp32",
                   "compile": False, "reconstructions": False},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def check_one_line_error(done: subprocess.CompletedProcess, uri: str, reason: str, secret: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert uri in lines[0] and reason in lines[0], lines[0]
    assert secret not in done.stdout + done.stderr


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1: SQLite store, artifacts proxied into `artifacts` (an S3 URI).
    It starts on construction; `wait()` returns its URL once it answers. Without MLflow's job runner (huey consumer
    processes for server-side jobs the pipeline never submits): 31 CPU-seconds of a full test run."""

    def __init__(self, root: Path, artifacts: str):
        root.mkdir()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / "server.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", artifacts,
                 "--workers", "1"],
                cwd=root, env=clean_env(MLFLOW_S3_ENDPOINT_URL=os.environ["MLFLOW_S3_ENDPOINT_URL"],
                                        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "MlflowServer":
        return self

    def wait(self) -> str:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=1).status == 200:
                    return self.url
            except OSError:
                time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


WAIT_S = 600
"""How long the two-node training may take to reach each point: a hang guard (240 s was once not enough beside the
other xdist worker's runs)."""


def train_with_a_killed_worker(root: Path, env: dict[str, str], checkpoints: str) -> tuple[float, float]:
    """Run `psp train`; SIGKILL one worker once Ray Train has registered a checkpoint in the bucket (its
    snapshot lists one); wait for the run to finish. Returns (when the worker was killed, when the
    restarted workers were seen)."""
    log = root / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PSP, "train"], cwd=root, env=clean_env(**env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: registered_checkpoints(checkpoints), proc, WAIT_S, "an S3 checkpoint", log)
        # this test's descendants, not the driver's: the Cluster's raylets are this process's children
        workers = wait_until(ray_train_workers, proc, WAIT_S, "the training workers", log)
        first = {w.pid for w in workers}
        workers[-1].kill()
        killed_at = time.time()
        wait_until(lambda: {w.pid for w in ray_train_workers()} - first, proc, WAIT_S, "restarted workers", log)
        restarted_at = time.time()
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return killed_at, restarted_at


def registered_checkpoints(folder: str) -> int:
    """How many checkpoints Ray Train's snapshot in the bucket lists (0 before the first)."""
    count = 0
    for name in storage.list_files(folder):
        if name.endswith("checkpoint_manager_snapshot.json"):
            try:
                count += len(json.loads(storage.read_bytes(f"{folder}/{name}")).get("checkpoint_results", []))
            except (OSError, ValueError):
                pass
    return count


def only_run(client: mlflow.MlflowClient):
    experiment = client.get_experiment_by_name("psp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    return runs[0]


def check_latents(folder: str, shards: dict, bucket: str, model: str) -> None:
    """Every shard row has one finite W+ code [6, 512] (16 px generator) written by the registered model."""
    latents = json.loads(storage.read_bytes(f"{folder}/manifest.json"))
    assert latents["model"] == model
    fs, key = storage.Location.of(folder).filesystem()
    tables = [pq.read_table(f"{key}/{entry['file']}", filesystem=fs) for entry in latents["files"]]
    rows = [row for table in tables for row in table.to_pylist()]
    shard_fs, shard_key = storage.Location.of(f"{bucket}/shards").filesystem()
    ids = [i for e in shards["shards"] for i in pq.read_table(f"{shard_key}/{e['file']}", columns=["id"],
                                                               filesystem=shard_fs).column("id").to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        code = np.asarray(row["latent"], dtype=np.float32)
        assert row["error"] is None and row["model"] == model and row["l2"] is not None
        assert code.shape == (6, 512) and np.isfinite(code).all()


def dvc_round_trip(repo: Path, clone: Path, images: Path, remote: str, endpoint: str) -> None:
    """A one-stage DVC pipeline (`psp shard`) pushed to an S3 remote; a fresh clone pulls its outputs and
    `dvc status` is clean: nothing is re-run."""
    env = {**clean_env(), "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com", "DVC_NO_ANALYTICS": "1"}
    dvc = str(BIN / "dvc")
    shutil.copytree(images, repo / "aligned")
    (repo / "params.yaml").write_text(yaml.safe_dump({"shard": {"input_dir": "aligned", "output_dir": "data/shards",
                                                                 "report": "reports/shard.json"}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"shard": {
        "cmd": f"{PSP} shard", "deps": ["aligned"], "params": ["shard"], "outs": ["data/shards"],
        "metrics": ["reports/shard.json"]}}}))
    for args in (["git", "init", "-q", "-b", "main"], [dvc, "init", "-q"], [dvc, "repro", "-q"],
                 [dvc, "remote", "add", "-d", "store", remote], [dvc, "remote", "modify", "store", "endpointurl", endpoint],
                 ["git", "add", "-A"], ["git", "commit", "-q", "-m", "shards"], [dvc, "push", "-q"],
                 ["git", "clone", "-q", str(repo), str(clone)]):
        sh(args, repo, env)
    sh([dvc, "pull", "-q"], clone, env)
    assert "up to date" in sh([dvc, "status"], clone, env)
    for name in ("data/shards/manifest.json", "data/shards/shard-00000.parquet", "reports/shard.json"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name


def sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr
