"""The Ray service: its resource check (a request no node can hold is one line, exit 2, at once on this machine,
after a bounded wait on a cluster, never a job Ray keeps pending for ever), and what a local instance gives its
workers and its training runs."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch
import yaml

from helpers.editing import write_edit_params, write_inversion
from helpers.pipelines import TINY_TRAIN, make_shards
from pipelines.cli import main
from pipelines.services.ray import ResourceRequest
from pipelines.services.ray.cluster import WORKER_ENV, LocalInstanceTrainer, connect, require_room, torch_trainer
from pipelines.services.tracking import resolve_model
from psp_core import load_psp
from psp_core.errors import InputError

NODES = [{"Resources": {"CPU": 8.0, "GPU": 1.0}}, {"Resources": {"CPU": 4.0}}]


def test_room_counts_the_workers_each_node_holds_by_its_totals():
    assert ResourceRequest("invert", 2, 2.0, 1).room_on(NODES) == 1      # one GPU in the cluster
    assert ResourceRequest("invert", 2, 2.0, 0).room_on(NODES) == 4 + 2
    assert ResourceRequest("train", 1, 3.0, 0).room_on(NODES) == 2 + 1   # CPUs do not add up across nodes
    assert ResourceRequest("train", 1, 9.0, 0).room_on(NODES) == 0
    assert ResourceRequest("edit", 1, 0.5, 0).room_on([{"Resources": {}}]) == 0
    assert ResourceRequest("train", 2, 1.5, 1).per_worker == {"CPU": 1.5, "GPU": 1}
    assert ResourceRequest("train", 2, 1.5, 0).per_worker == {"CPU": 1.5}


def test_training_on_a_local_instance_runs_without_the_placement_group_cleaner(monkeypatch):
    """The cleaner asks a dashboard a local instance does not have (or another instance's, which answers "dead" and
    has the run's workers killed); on a cluster (RAY_ADDRESS) Ray Train keeps its own callbacks."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    def kinds(trainer: TorchTrainer) -> set[type]:
        return {type(callback) for callback in trainer._create_default_callbacks()}

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = torch_trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert type(local) is LocalInstanceTrainer and PlacementGroupCleanerCallback not in kinds(local)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cluster = torch_trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert type(cluster) is TorchTrainer and PlacementGroupCleanerCallback in kinds(cluster)
    assert kinds(local) == kinds(cluster) - {PlacementGroupCleanerCallback}


@ray.remote(num_cpus=0)
def _worker_environment(names: list[str]) -> dict[str, str | None]:
    import os

    return {name: os.environ.get(name) for name in names}


def test_a_local_instance_gives_its_workers_the_worker_environment(monkeypatch):
    """A locally started Ray hands WORKER_ENV (one malloc arena, no usage stats) to every worker without a
    runtime_env, so no worker starts through Ray's runtime-env setup process."""
    assert not ray.is_initialized()   # runs before the module's own instance starts
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in WORKER_ENV:
        monkeypatch.setenv(name, "unset-by-the-test")   # restored afterwards; the stage overwrites it
    connect(ResourceRequest("invert", 1, 1.0, 0))
    try:
        seen = ray.get(_worker_environment.remote(list(WORKER_ENV)))
        assert not ray.get_runtime_context().runtime_env
    finally:
        ray.shutdown()
    assert seen == WORKER_ENV


@pytest.fixture
def ray_instance():
    """A real Ray instance declaring 3 CPUs and 1 GPU (logical: Ray does not look for the device), for one test: a
    stage run in this process later must start its own."""
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_request_the_nodes_hold_returns_at_once(ray_instance):
    start = time.monotonic()
    require_room(ResourceRequest("invert", 3, 1.0, 0), wait_s=30)
    require_room(ResourceRequest("invert", 1, 1.0, 1), wait_s=30)
    assert time.monotonic() - start < 5


def test_a_request_no_node_holds_fails_after_the_wait_with_the_numbers(ray_instance):
    start = time.monotonic()
    with pytest.raises(InputError) as error:
        require_room(ResourceRequest("invert", 2, 1.0, 1), wait_s=2)
    assert 2 <= time.monotonic() - start < 15
    assert "invert asks 2 x (1 CPUs and 1 GPU)" in str(error.value)
    assert "(3 CPUs/1 GPUs) hold 1 of them" in str(error.value)
    with pytest.raises(InputError, match=r"train asks 1 x \(4 CPUs\).* hold 0 of them"):
        require_room(ResourceRequest("train", 1, 4.0, 0), wait_s=0)


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """torch sees no GPU, on any machine; the stage runs in this process, from `tmp_path`, with no Ray yet."""
    assert not ray.is_initialized()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.chdir(tmp_path)


def one_line_gpu_error(code: int, capsys, section: str, stage: str, gpus: int = 1) -> None:
    """`main` (the console script's body) returned 2 with the stage's one line, and Ray never started."""
    out, err = capsys.readouterr()
    assert code == 2, (out + err)[-3000:]
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"psp {stage}: error: {section}.use_gpu=true needs {gpus} GPU(s)"), err[-3000:]
    assert "Traceback" not in err
    assert "this machine has 0" in error
    assert not ray.is_initialized() and "Started a local Ray instance" not in err


def test_invert_with_use_gpu_on_a_machine_without_one_stops_before_ray(tmp_path: Path, model_file, no_gpu, capsys):
    make_shards(tmp_path, images=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"invert": {
        "model": str(model_file), "input": "shards", "output_dir": "latents", "report": "reports/invert.json",
        "lpips_backbone": "random", "cpus_per_actor": 1, "use_gpu": True}}))
    one_line_gpu_error(main(["invert"]), capsys, "invert", "invert")
    assert not list((tmp_path / "latents").glob("*.parquet"))


def test_edit_with_use_gpu_on_a_machine_without_one_stops_before_ray(tmp_path: Path, model_file, no_gpu, capsys):
    write_inversion(tmp_path / "latents", load_psp(model_file), resolve_model(str(model_file)).pinned)
    write_edit_params(tmp_path, model=str(model_file), edits=[{"kind": "sefa", "top_k": 1, "steps": 2}],
                      use_gpu=True)
    one_line_gpu_error(main(["edit"]), capsys, "edit", "edit")
    assert not (tmp_path / "edits" / "latents").exists() or not list((tmp_path / "edits" / "latents").iterdir())


def test_train_with_use_gpu_on_a_machine_without_one_stops_before_mlflow_and_ray(tmp_path: Path, no_gpu, capsys):
    make_shards(tmp_path, images=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "shards": "shards",
                                                                    "use_gpu": True}}))
    one_line_gpu_error(main(["train"]), capsys, "train", "train", gpus=TINY_TRAIN["num_workers"])
    assert not (tmp_path / "mlflow").exists(), "no MLflow run is opened for a job that cannot start"
