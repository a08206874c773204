"""`psp train` for real: local Ray with 2 DDP workers, a killed worker, a 2-node cluster, an
`mlflow server` process, and the registered model loading back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch

from pipeline_helpers import PSP, clean_env, free_port, make_shards, run_psp, write_params
from psp_core import load_psp

pytestmark = pytest.mark.slow


def finished_runs(uri: str, experiment: str = "psp") -> list:
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def test_two_workers_survive_a_killed_worker_and_register(tmp_path):
    """2 DDP workers; one is SIGKILLed after the first checkpoint; the run still ends at max_steps,
    in one MLflow run, registered as @candidate, and the registered model reproduces the checkpoint."""
    make_shards(tmp_path)
    write_params(tmp_path, max_steps=8)
    proc = subprocess.Popen([PSP, "train"], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and killed is None:
            if list((tmp_path / "ray_results").glob("*/checkpoint_*")):
                workers = [p for p in psutil.process_iter(["cmdline"])
                           if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
                if workers:
                    killed = workers[-1].pid
                    workers[-1].send_signal(signal.SIGKILL)
            time.sleep(0.5)
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    assert killed is not None, "no worker was running after the first checkpoint"

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    runs = finished_runs(uri)
    assert len(runs) == 1, "a restarted worker must not fork a second MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == 8 and set(range(1, 9)) <= set(steps)
    assert "val_loss" in run.data.metrics and "images_per_s" in run.data.metrics
    assert run.data.tags["psp.random_weights"] == "generator,encoder_backbone_irse50,lpips_alexnet"
    assert len(run.data.tags["psp.shard_manifest_sha256"]) == 64
    assert run.data.params["loss.lpips_lambda"] == "0.8" and run.data.params["num_workers"] == "2"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "images" in artifacts, artifacts

    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["steps"] == 8 and report["mlflow_run_id"] == run.info.run_id
    version = client.get_model_version_by_alias("psp-encoder", "candidate")
    assert version.run_id == run.info.run_id and str(version.version) == report["model_version"]

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/psp-encoder@candidate")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    chosen = run.data.tags["psp.registered_checkpoint"]
    checkpoint = next((tmp_path / "ray_results").glob(f"*/checkpoint_*/{chosen}"))
    net = load_psp(sorted((tmp_path / "ray_results").glob(f"*/checkpoint_*/{chosen}"))[-1])
    with torch.no_grad():
        expected = net.encode(torch.from_numpy(x)).numpy()
    assert checkpoint.is_file()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)

    # the same command again: the run is complete, nothing is trained or registered twice
    again = run_psp(["train"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(finished_runs(uri)) == 1
    assert len(client.search_model_versions("name='psp-encoder'")) == 1


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(PSP).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_two_node_cluster_with_mlflow_server(tmp_path, mlflow_server):
    """One worker on each node of a 2-node Ray cluster, tracked by a real MLflow server."""
    from ray.cluster_utils import Cluster

    make_shards(tmp_path)
    write_params(tmp_path, max_steps=4, save_interval=2, val_interval=2, placement_strategy="SPREAD")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        done = run_psp(["train"], tmp_path, env={"RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow_server})
    finally:
        cluster.shutdown()
    assert done.returncode == 0, done.stderr[-4000:]
    runs = finished_runs(mlflow_server)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["psp.nodes"] == "2"
    assert not (tmp_path / "mlflow").exists(), "with MLFLOW_TRACKING_URI set nothing goes to the local store"
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert client.get_model_version_by_alias("psp-encoder", "candidate").run_id == runs[0].info.run_id


def test_psp_submit_runs_as_a_ray_job_on_a_local_head(tmp_path):
    """`ray start --head` (token authentication on) and `psp submit`: the job uploads the code only,
    trains, and tracks into this repository's MLflow store."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    for package in ("pipelines", "psp_core"):
        shutil.copytree(repo / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_shards(tmp_path)
    write_params(tmp_path, max_steps=2, num_workers=1)
    bin_dir = str(Path(PSP).parent)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ray_tmp = Path("/tmp") / f"psp-ray-{os.getpid()}"
    start = subprocess.run([f"{bin_dir}/ray", "start", "--head", "--port", str(free_port()), "--dashboard-port",
                            str(dashboard), "--num-cpus", "4", "--temp-dir", str(ray_tmp), "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        done = run_psp(["submit", "--address", f"http://127.0.0.1:{dashboard}"], tmp_path, env=env)
    finally:
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr
    runs = finished_runs(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert json.loads((tmp_path / "reports" / "train.json").read_text())["steps"] == 2
