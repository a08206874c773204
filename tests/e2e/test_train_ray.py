"""`psp train` for real: local Ray with 2 DDP workers training e4e with its objective, a killed worker, a killed
driver and Ctrl-C, the registered model loading back; HyperStyle with a killed worker; and `psp submit` to a Ray head
on a StyleGAN2-ADA pickle. (Two nodes tracked by an `mlflow server`: tests/e2e/test_object_storage.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch

from helpers import REPO
from helpers.ada import ada_generator, write_network_pickle
from helpers.pipelines import (
    PSP,
    TINY_TRAIN,
    clean_env,
    descendants,
    free_port,
    interruptible,
    make_shards,
    near_copy_png,
    ray_actors,
    ray_train_workers,
    run_psp,
    wait_until,
    write_params,
)
from pipelines.services.tracking import model_checkpoint
from psp_core import load_psp
from psp_core.nets.checkpoints import read_generator_checkpoint, save_generator
from psp_core.nets.encoders import WEncoder
from psp_core.nets.stylegan2 import Generator

pytestmark = pytest.mark.slow


def finished_runs(uri: str, experiment: str = "psp") -> list:
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def logged_steps(root: Path) -> list[tuple[int, int]]:
    """(step, timestamp ms) of every `loss` value in the run's MLflow store so far, read-only."""
    db = root / "mlflow" / "mlflow.db"
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT step, timestamp FROM metrics WHERE key = 'loss'").fetchall()
    except sqlite3.OperationalError:     # the tables are not created yet
        return []


def registered_checkpoint_steps(root: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its checkpoint manager snapshot), oldest first."""
    steps = []
    for snapshot in (root / "ray_results").glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):
            continue
        steps += [int(r["metrics"]["step"]) for r in results if "step" in r.get("metrics", {})]
    return sorted(steps)


def attempt(history: list[tuple[int, int]], start_s: float, end_s: float) -> list[int]:
    """Steps logged (in time order) between two moments (seconds since the epoch)."""
    return [step for step, stamp in sorted(history, key=lambda e: (e[1], e[0])) if start_s * 1000 <= stamp < end_s * 1000]


def check_resumed(before: list[int], after: list[int], save_interval: int, max_steps: int) -> int:
    """`before` ran steps 1..k (or N0+1..k) and stopped before the end; `after` continues from a checkpoint
    step N (a multiple of save_interval, > 0, <= k) to a later step, re-running at most save_interval
    steps. Returns N."""
    assert before and after, (before, after)
    assert before == list(range(before[0], before[-1] + 1)) and before[-1] < max_steps, before
    resumed_from = after[0] - 1
    assert resumed_from > 0 and resumed_from % save_interval == 0, f"resumed from step {resumed_from}: {after}"
    assert after == list(range(after[0], after[-1] + 1)), after
    assert before[0] <= resumed_from + 1 <= before[-1] + 1, (before, after)
    assert before[-1] - resumed_from <= save_interval, f"{before[-1] - resumed_from} steps ran twice"
    return resumed_from


E4E_TERMS = ("encoder_discriminator_loss", "total_delta_loss", "delta1_loss", "d_real_loss", "d_fake_loss",
             "discriminator_loss", "discriminator_r1_loss", "progressive_stage", "loss_l2", "loss")


def test_two_workers_survive_a_killed_worker_a_killed_driver_and_ctrl_c_and_register(tmp_path):
    """`psp train train.preset=e4e_encode` on 2 DDP workers (the encoder trained, the generator frozen, as e4e's
    coach trains it), progressive from step 2 with R1 every 2 steps. One worker is SIGKILLed once step 3 is logged
    after step 2's checkpoint: Ray restarts the workers from that checkpoint. Once they train again the `psp train`
    driver itself is SIGKILLed. The same command run again resumes from the latest checkpoint and is stopped with
    Ctrl-C sent as a terminal sends it (SIGINT to the whole process group) once it trains: exit 130 and the stage's
    one line (Ray Train's own handler would exit 1 and leave the run RUNNING), the MLflow run KILLED with the step it
    reached, no process left. Run once more, it resumes and ends at max_steps. Each time at most save_interval steps
    run twice, and a step run twice logs the same value for every e4e term (discriminator, pools and real-code draws
    restored too). The run ends in one MLflow run, registered as @candidate with the reference coach's checkpoint
    layout, and the registered model reproduces the checkpoint. Only processes below this test's own child are
    killed."""
    make_shards(tmp_path)
    max_steps, save_interval = 8, TINY_TRAIN["save_interval"]
    write_params(tmp_path, preset="e4e_encode", encoder_type="Encoder4Editing", max_steps=max_steps,
                 progressive_start=2, progressive_step_every=1, d_reg_every=2, w_pool_size=2, train_decoder=False)
    log = tmp_path / "killed_driver.log"
    with log.open("w") as out:   # a file, not a pipe: a full pipe would stall the driver
        proc = subprocess.Popen([PSP, "train"], cwd=tmp_path, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: registered_checkpoint_steps(tmp_path) and 3 in {s for s, _ in logged_steps(tmp_path)},
                   proc, 600, "step 3 after the first checkpoint", log, every=0.05)
        workers = wait_until(lambda: ray_train_workers(proc.pid), proc, 60, "a training worker", log)
        first_workers = {w.pid for w in workers}
        assert max(step for step, _ in logged_steps(tmp_path)) < max_steps, "the worker must die before the last step"
        workers[-1].kill()
        workers[-1].wait(timeout=30)
        worker_killed = time.time()

        # the restarted workers (new processes) train again: then the driver goes, SIGKILL
        wait_until(lambda: {w.pid for w in ray_train_workers(proc.pid)} - first_workers, proc, 600, "restarted workers", log)
        wait_until(lambda: attempt(logged_steps(tmp_path), worker_killed + 5, time.time() + 60), proc, 600,
                   "a step of the restarted workers", log, every=0.05)
        assert max(step for step, _ in logged_steps(tmp_path)) < max_steps, "the driver must die before the end"
        tree = descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=20)   # the stage's reaper ends what Ray leaves behind
        assert not alive, f"left behind by the killed driver: {[(p.pid, p.name()) for p in alive]}"
        driver_killed = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    interrupted_at = stop_with_ctrl_c_once_it_trains(tmp_path, uri, driver_killed, max_steps)

    rerun = run_psp(["train"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    history = logged_steps(tmp_path)
    first = attempt(history, 0, worker_killed + 5)
    second = attempt(history, worker_killed + 5, driver_killed)
    third = attempt(history, driver_killed, interrupted_at)
    fourth = attempt(history, interrupted_at, time.time() + 60)
    assert first[0] == 1
    after_worker = check_resumed(first, second, save_interval, max_steps)
    after_driver = check_resumed(second, third, save_interval, max_steps)
    after_ctrl_c = check_resumed(third, fourth, save_interval, max_steps)
    assert after_ctrl_c >= after_driver >= after_worker and fourth[-1] == max_steps

    runs = finished_runs(uri)
    assert len(runs) == 1, "neither restarted workers nor a rerun driver may fork a second MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == sorted(first + second + third + fourth) and set(steps) == set(range(1, max_steps + 1))
    check_repeated_steps_log_the_same_terms(client, run.info.run_id, steps, max_steps)
    assert "val_loss" in run.data.metrics and "images_per_s" in run.data.metrics
    assert run.data.tags["psp.random_weights"] == "generator,encoder_backbone_irse50,lpips_alexnet"
    assert len(run.data.tags["psp.shard_manifest_digest"]) == 32
    assert run.data.params["loss.lpips_lambda"] == "0.8" and run.data.params["num_workers"] == "2"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "images" in artifacts, artifacts

    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["steps"] == max_steps and report["mlflow_run_id"] == run.info.run_id
    # the killed worker's and driver's local checkpoint folders were reused by the restarts and removed at the end
    assert not list((Path(tempfile.gettempdir()) / "psp-train").glob(f"{report['run_name']}-rank*"))
    version = client.get_model_version_by_alias("psp-encoder", "candidate")
    assert version.run_id == run.info.run_id and str(version.version) == report["model_version"]
    assert version.description.startswith("e4e encoder (Encoder4Editing), preset e4e_encode")
    assert "Objective: e4e's (l2_lambda 1, lpips_lambda 0.8, w_discriminator_lambda 0.1, delta_norm_lambda 0.0002; " \
           "progressive deltas from step 2, one layer every 1" in version.description

    # every checkpoint file in Ray's storage reads whole (uploaded under a temporary name, then renamed) and no
    # temporary one of a stopped upload is left (issue 24)
    stored = list((tmp_path / "ray_results").glob("*/checkpoint_*/*.pt"))
    assert stored and all("state_dict" in torch.load(p, map_location="cpu", weights_only=True) for p in stored)
    assert not list((tmp_path / "ray_results").rglob(".*.psp-partial-*.tmp"))
    chosen = run.data.tags["psp.registered_checkpoint"]
    path = sorted((tmp_path / "ray_results").glob(f"*/checkpoint_*/{chosen}"))[-1]
    check_reference_coach_layout(path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/psp-encoder@candidate")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    net = load_psp(path)
    assert net.arch.family == "e4e"
    with torch.no_grad():
        expected = net.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)

    # the same command again: the run is complete, nothing is trained or registered twice
    again = run_psp(["train"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(finished_runs(uri)) == 1
    assert len(client.search_model_versions("name='psp-encoder'")) == 1


HYPERSTYLE_TERMS = ("loss", "loss_l2", "loss_iter0", "loss_iter1")


def test_hyperstyle_learns_resumes_after_a_killed_worker_and_registers_with_its_w_encoder(tmp_path):
    """`psp train train.preset=hyperstyle_encode` (64 px generator of channel multiplier 1, 64 px input, one tuned
    layer, 2 passes per batch, one worker, 4 steps on near copies of one image):
    the worker is SIGKILLed once step 3 is logged after step 2's checkpoint and Ray restarts it from that checkpoint;
    a step run twice logs the same value of every term; the validation L2 falls; the version registered carries the
    W encoder the run refined, its checkpoint is the released layout and loads back with it."""
    make_shards(tmp_path, images=10, test_fraction=0.4, png=near_copy_png)   # learnable in 4 steps
    torch.manual_seed(0)
    save_generator(Generator(64, 512, 8, 1), None, tmp_path / "g64.pt")   # StyleGAN2-ADA's channel_base 16384
    w_encoder = WEncoder(n_styles=10)   # a 64 px HyperStyle's W encoder (random)
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in w_encoder.state_dict().items()},
                "opts": {"encoder_type": "WEncoder", "output_size": 64}}, tmp_path / "w_enc.pt")
    max_steps, save_interval = 4, 2
    write_params(tmp_path, preset="hyperstyle_encode", encoder_type="SharedWeightsHyperNetResNet", output_size=64,
                 encoder_input_size=64, layers_to_tune=[13], n_iters_per_batch=2, train_decoder=False,
                 loss={"id_lambda": 0.0, "lpips_lambda": 0.0}, learning_rate=2e-3, batch_size=1, num_workers=1,
                 max_steps=max_steps, save_interval=save_interval, val_interval=2, max_val_batches=2,
                 image_interval=4, generator="g64.pt", stylegan_channel_multiplier=1, w_encoder="w_enc.pt")
    log = tmp_path / "hyperstyle.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PSP, "train"], cwd=tmp_path, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: registered_checkpoint_steps(tmp_path) and 3 in {s for s, _ in logged_steps(tmp_path)},
                   proc, 600, "step 3 after the first checkpoint", log, every=0.05)
        worker = wait_until(lambda: ray_train_workers(proc.pid), proc, 60, "the training worker", log)[0]
        assert ray_actors("TrainController", proc.pid) and not ray_actors("PreemptionWatcher", proc.pid)  # local: none
        assert max(step for step, _ in logged_steps(tmp_path)) < max_steps, "the worker must die before the last step"
        worker.kill()
        worker.wait(timeout=30)
        worker_killed = time.time()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    history = logged_steps(tmp_path)
    first, second = attempt(history, 0, worker_killed + 5), attempt(history, worker_killed + 5, time.time() + 60)
    assert first[0] == 1 and check_resumed(first, second, save_interval, max_steps) >= 2 and second[-1] == max_steps
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = finished_runs(uri)[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    repeated = sorted({step for step in steps if steps.count(step) > 1})
    assert repeated and set(steps) == set(range(1, max_steps + 1))
    for name in HYPERSTYLE_TERMS:
        logged = client.get_metric_history(run.info.run_id, name)
        assert logged and all(np.isfinite(m.value) for m in logged), name
        for step in repeated:
            values = [m.value for m in logged if m.step == step]
            assert len(values) == 2 and values[0] == pytest.approx(values[1], rel=1e-5, abs=1e-7), (name, step)
    val_l2 = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss_l2"))
    assert val_l2[-1][0] == max_steps and val_l2[-1][1] < val_l2[0][1], val_l2
    assert run.data.tags["psp.random_weights"] == "hypernet_resnet34,lpips_alexnet"

    version = client.get_model_version_by_alias("psp-encoder", "candidate")
    assert version.run_id == run.info.run_id
    assert version.description.startswith("HyperStyle encoder (SharedWeightsHyperNetResNet), preset hyperstyle_encode")
    assert "the hypernetwork alone, offsetting layers [13], over 2 passes per batch" in version.description
    chosen = run.data.tags["psp.registered_checkpoint"]
    path = sorted((tmp_path / "ray_results").glob(f"*/checkpoint_*/{chosen}"))[-1]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"hypernet", "decoder"}
    assert ckpt["opts"]["w_encoder_checkpoint_path"] == "w_enc.pt"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    stored = model_checkpoint(f"models:/psp-encoder/{version.version}")
    assert (stored.parent / "w_enc.pt").read_bytes() == (tmp_path / "w_enc.pt").read_bytes()
    registered = load_psp(stored)   # finds its W encoder beside it, by the name the opts give
    trained = load_psp(path, w_encoder=tmp_path / "w_enc.pt")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in registered.state_dict().items())


def stop_with_ctrl_c_once_it_trains(root: Path, uri: str, since: float, max_steps: int) -> float:
    """Run `psp train` again, and stop it with Ctrl-C (SIGINT to its process group) once it has logged a step:
    exit 130, the stage's one line and no traceback, no process left, the MLflow run KILLED at the step this
    attempt reached. Returns when it stopped."""
    log = root / "interrupted.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PSP, "train"], cwd=root, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=interruptible)
    try:
        wait_until(lambda: attempt(logged_steps(root), since, time.time() + 60), proc, 600, "a step of the rerun",
                   log, every=0.05)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert code == 130, output[-4000:]
    # the stage's one line, no traceback (Ray's log monitor may still print a worker's last progress line after it)
    assert "psp train: interrupted; finished work is kept and a rerun resumes" in output.splitlines()
    assert "Traceback" not in output, output[-4000:]
    assert "PlacementGroupCleaner" not in output, output[-4000:]   # a local instance runs without it
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    stopped_at = time.time()
    reached = attempt(logged_steps(root), since, stopped_at)[-1]
    assert reached < max_steps, "Ctrl-C must come before the last step"
    [stopped] = finished_runs(uri)
    assert stopped.info.status == "KILLED" and stopped.data.tags["psp.stopped_at_step"] == str(reached)
    assert f"stopped at step {reached}: MLflow run {stopped.info.run_id} marked KILLED" in output
    return stopped_at


def check_repeated_steps_log_the_same_terms(client: mlflow.MlflowClient, run_id: str, steps: list[int],
                                            max_steps: int) -> None:
    """Every e4e term is logged and finite, the progressive stage follows the schedule (a layer a step from step 2
    up to the 16 px generator's last, 5), and a step that ran more than once (after a restart) logged the same
    value of every term each time."""
    stages = {m.step: m.value for m in client.get_metric_history(run_id, "progressive_stage")}
    assert stages == {step: min(max(0, step - 2), 5) for step in range(1, max_steps + 1)}
    repeated = sorted({step for step in steps if steps.count(step) > 1})
    assert repeated, steps
    for name in E4E_TERMS:
        history = client.get_metric_history(run_id, name)
        assert history and all(np.isfinite(m.value) for m in history), name
        for step in repeated:
            logged = [m.value for m in history if m.step == step]
            if name == "discriminator_r1_loss" and not logged:
                continue   # R1 runs every d_reg_every steps only
            assert len(logged) == steps.count(step), (name, step, logged)
            assert logged[:1] * len(logged) == pytest.approx(logged, rel=1e-5, abs=1e-7), (name, step)


def check_reference_coach_layout(path: Path) -> None:
    """The checkpoint has the keys the reference e4e coach saves, its opts and its discriminator's layout."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert {"state_dict", "opts", "latent_avg", "global_step", "best_val_loss", "discriminator_state_dict"} <= set(ckpt)
    opts = ckpt["opts"]
    assert (opts["encoder_type"], opts["stylegan_size"], opts["progressive_steps"]) == ("Encoder4Editing", 16,
                                                                                      [0, 2, 3, 4, 5, 6])
    assert sorted(ckpt["discriminator_state_dict"]) == sorted(f"mlp.{i}.{k}" for i in (0, 2, 4, 6)
                                                              for k in ("weight", "bias"))


def stop_ray_instance(temp_dir: Path, gcs_port: int, started: float) -> None:
    """Stop the Ray instance started with `--temp-dir temp_dir --port gcs_port` (its processes name that
    folder or that GCS port in their command line; workers are their children), and nothing else:
    SIGTERM, then SIGKILL after 5 s (some of Ray's processes never end on SIGTERM: waiting longer only
    costs time)."""
    folder = str(temp_dir)
    names_it = lambda arg: (arg == folder or arg.endswith("=" + folder) or folder + "/" in arg  # noqa: E731
                            or (arg.startswith("--") and arg.endswith(f":{gcs_port}")))
    ours: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            if p.info["create_time"] >= started - 1 and any(names_it(a) for a in p.info["cmdline"] or []):
                ours[p.pid] = p
                ours.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    for p in ours.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(ours.values()), timeout=5)
    for p in alive:
        p.kill()


def test_psp_submit_runs_as_a_ray_job_on_a_local_head(tmp_path):
    """`ray start --head` (token authentication on) and `psp submit` of `psp train preset=restyle_encode` (2
    iterations per batch, the generator frozen as ReStyle's coach keeps it) on a StyleGAN2-ADA network pickle of
    channel_base 16384 (`train.generator=network-snapshot.pkl`, `train.stylegan_channel_multiplier=1`, 64 px): the
    job uploads the code only, trains, and tracks into this repository's MLflow store, which holds each iteration's
    training and validation loss at every step; the registered version is a 6-channel ReStyle-pSp that loads
    strictly, its generator the pickle's, converted (the pickle's digest recorded, not called random)."""
    import shutil

    repo = REPO
    for package in ("pipelines", "psp_core"):
        shutil.copytree(repo / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_shards(tmp_path)
    snapshot = write_network_pickle(tmp_path / "network-snapshot-000100.pkl",
                                    ada_generator(resolution=64, channel_base=16384, seed=1))   # half width
    write_params(tmp_path, preset="restyle_encode", encoder_type="BackboneEncoder", n_iters_per_batch=2,
                 max_steps=2, val_interval=2, save_interval=2, image_interval=2, num_workers=1, train_decoder=False,
                 output_size=64, generator=snapshot.name, stylegan_channel_multiplier=1)
    bin_dir = str(Path(PSP).parent)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ray_tmp = Path(tempfile.gettempdir()) / "head"   # in the run's own folder; short, as Ray's socket paths must be
    started, gcs_port = time.time(), free_port()
    # every listening port its own, so that another Ray on this machine (default ports) cannot take them
    start = subprocess.run([f"{bin_dir}/ray", "start", "--head", "--port", str(gcs_port), "--dashboard-port",
                            str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
                            "--ray-client-server-port", str(free_port()), "--num-cpus", "4", "--temp-dir", str(ray_tmp),
                            "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        done = run_psp(["submit", "--address", f"http://127.0.0.1:{dashboard}"], tmp_path, env=env)
    finally:
        stop_ray_instance(ray_tmp, gcs_port, started)   # this head only: `ray stop` would stop every Ray on the machine
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    runs = finished_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["steps"] == 2

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.get_run(report["mlflow_run_id"])
    assert {"loss_iter0", "loss_iter1", "val_loss_iter0", "val_loss_iter1"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_iter1")] == [1, 2]
    assert run.data.metrics["val_loss"] == run.data.metrics["val_loss_iter1"]
    assert {"loss_iter0", "val_loss_iter1"} <= set(report["metrics"])
    assert (run.data.params["preset"], run.data.params["n_iters_per_batch"]) == ("restyle_encode", "2")
    version = client.get_model_version("psp-encoder", report["model_version"])
    assert version.description.startswith("ReStyle-pSp encoder (BackboneEncoder), preset restyle_encode")
    chosen = run.data.tags["psp.registered_checkpoint"]
    net = load_psp(sorted((tmp_path / "ray_results").glob(f"*/checkpoint_*/{chosen}"))[-1])
    assert (net.arch.family, net.arch.input_nc, net.arch.encoder_type) == ("restyle_psp", 6, "BackboneEncoder")
    assert run.data.tags["psp.weights.generator"] == f"sha256:{hashlib.sha256(snapshot.read_bytes()).hexdigest()}"
    assert "generator" not in run.data.tags["psp.random_weights"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    decoder = load_psp(model_checkpoint(f"models:/psp-encoder/{version.version}")).decoder
    converted = read_generator_checkpoint(snapshot)
    assert decoder.conv_clamp == converted.generator.conv_clamp == 256
    for name, tensor in converted.generator.state_dict().items():
        assert torch.equal(decoder.state_dict()[name], tensor), name
