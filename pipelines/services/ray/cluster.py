"""Connecting to Ray: the cluster when there is one, else a local instance sized so that Ray
Data's read tasks are never starved by the training workers (and reaped with the stage, however
the stage ends); and the shared-storage check."""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
import torch
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.services.ray import reaper
from psp_core.errors import InputError

log = logging.getLogger(__name__)

# Logical CPUs kept free beside the training workers for Ray Data tasks and the trainer controller.
SPARE_CPUS = 2

WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MALLOC_ARENA_MAX": "1", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}
"""The job's Ray worker processes' environment. One glibc malloc arena: Ray runs actor methods and the training
function on threads it starts before our code, and a thread's own arena returns what each batch frees to the
OS; in the one main arena, `psp_core.runtime.devices.keep_freed_memory` keeps it (an inversion batch at 1024 px, bf16:
~1M page faults and 1.49x the time without it, benchmarks/README.md). Two Parquet footer readers: Ray Data lists
Parquet files through a pool of footer-reading actors, 32 by default, each a Python process that reserves a logical
CPU while it lives; a shard folder is a few large files (each reader reads 128 footers at a time), and a pool that
takes every CPU of a small machine holds the read tasks back until the listing ends."""


LOCAL_INSTANCE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
"""Ray Train services a local instance has no use for: the preemption watcher (an actor polling for nodes being
drained; the one node ends with the driver: one Ray worker process fewer per run) and the Prometheus metrics
callbacks (nothing scrapes a local instance)."""


CLUSTER_WAIT_S = 300.0
"""How long a stage on a cluster waits for nodes that can hold its workers (an autoscaler may still be adding
them) before it stops with the numbers; a local instance is checked at once."""


@dataclass(frozen=True)
class ResourceRequest:
    """What a stage's Ray job reserves: `count` workers or actors of `cpus` logical CPUs and `gpus` GPUs each;
    `section` is the params section whose settings asked for it, named in the errors."""

    section: str
    count: int
    cpus: float
    gpus: int

    @property
    def per_worker(self) -> dict[str, float]:
        """One worker's resources, as Ray Train's `resources_per_worker` takes them."""
        return {"CPU": self.cpus} | ({"GPU": self.gpus} if self.gpus else {})

    def describe(self) -> str:
        gpus = f" and {self.gpus} GPU" if self.gpus else ""
        return f"{self.count} x ({self.cpus:g} CPUs{gpus})"

    def room_on(self, nodes: list[dict]) -> int:
        """How many of the workers fit on these nodes by their total resources."""
        def fits(node: dict) -> int:
            have = node.get("Resources", {})
            slots = math.floor(have.get("CPU", 0.0) / self.cpus + 1e-9)
            return min(slots, math.floor(have.get("GPU", 0.0) / self.gpus + 1e-9)) if self.gpus else slots
        return sum(fits(node) for node in nodes)


def check_local_gpus(request: ResourceRequest) -> None:
    """Without a cluster (no RAY_ADDRESS) the GPUs a request asks for must be on this machine: else one line
    before anything starts, instead of a job Ray keeps pending for ever."""
    if not request.gpus or on_cluster():
        return
    have = torch.cuda.device_count()
    if request.count * request.gpus > have:
        raise InputError(f"{request.section}.use_gpu=true needs {request.count * request.gpus} GPU(s) "
                         f"({request.describe()}), but this machine has {have} that torch can use; set "
                         f"{request.section}.use_gpu=false, or run on a Ray cluster with GPUs (RAY_ADDRESS)")


def require_room(request: ResourceRequest, wait_s: float) -> None:
    """Return once the live nodes can hold every worker of `request`, waiting at most `wait_s` for nodes to
    join; else an InputError with what was asked and what the cluster has."""
    deadline = time.monotonic() + wait_s
    announced = 0.0
    while True:
        nodes = alive_nodes()
        room = request.room_on(nodes)
        if room >= request.count:
            return
        have = ", ".join(f"{n.get('Resources', {}).get('CPU', 0):g} CPUs/{n.get('Resources', {}).get('GPU', 0):g} GPUs"
                         for n in nodes) or "no live node"
        shortfall = (f"{request.section} asks {request.describe()}; the cluster's nodes ({have}) hold {room} "
                     f"of them")
        left = deadline - time.monotonic()
        if left <= 0:
            raise InputError(f"{shortfall}: lower {request.section}'s workers or the CPUs/GPUs each reserves, "
                             "or add nodes")
        if time.monotonic() - announced >= 30:
            log.warning("%s; waiting up to %.0f s more for nodes to join", shortfall, left)
            announced = time.monotonic()
        time.sleep(min(2.0, left))


def on_cluster() -> bool:
    """Whether the stage joins a cluster (RAY_ADDRESS, set by `ray job submit`) rather than starting a local instance."""
    return bool(os.environ.get("RAY_ADDRESS"))


def connect(request: ResourceRequest) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), or start a local Ray with
    enough logical CPUs for the workers plus `SPARE_CPUS`; either way the workers must fit (see `require_room`)."""
    if ray.is_initialized():
        return
    if on_cluster():
        with stage_signal_handlers():
            ray.init(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
        log.info("connected to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        require_room(request, CLUSTER_WAIT_S)
        return
    check_local_gpus(request)
    cpus = max(os.cpu_count() or 1, math.ceil(request.count * request.cpus) + SPARE_CPUS)
    reaper.start()   # Ray's processes would outlive a driver killed with SIGKILL
    # A local instance's workers inherit this process's environment: set here, WORKER_ENV needs no runtime_env, and
    # each worker starts at once instead of through Ray's runtime-env setup process (a second Python that imports
    # Ray, ~1.5 CPU-s per worker; 13 CPU-s of a tiny two-worker training run).
    os.environ.update(WORKER_ENV | LOCAL_INSTANCE_ENV)
    with stage_signal_handlers():
        ray.init(num_cpus=cpus, include_dashboard=False)
    log.info("started a local Ray instance with %d logical CPUs", cpus)
    require_room(request, 0)


class LocalInstanceTrainer(TorchTrainer):
    """A TorchTrainer without Ray Train's placement-group cleaner, for the local instance `connect` starts. The
    cleaner asks the dashboard's State API every second whether the run's controller lives. A local instance has no
    dashboard: the cleaner logs a warning each second, prints a traceback when the instance goes down, and where
    another Ray's dashboard holds the default port on this machine it is told "not alive" and removes this run's
    placement group, killing its workers mid-run. It guards a cluster that outlives a dead controller; a local
    instance ends with its driver."""

    def _create_default_callbacks(self) -> list[Any]:
        return [callback for callback in super()._create_default_callbacks()
                if not isinstance(callback, PlacementGroupCleanerCallback)]


def torch_trainer(*args: Any, **kwargs: Any) -> TorchTrainer:
    """The TorchTrainer for where `connect` runs the job: Ray Train's own on a cluster, `LocalInstanceTrainer`
    on a local instance."""
    return (TorchTrainer if on_cluster() else LocalInstanceTrainer)(*args, **kwargs)


@contextmanager
def stage_signal_handlers() -> Iterator[None]:
    """Keep the stage's SIGINT/SIGTERM handlers across `ray.init`, which installs its own (an exit, and a
    C++ crash reporter that aborts the process): Ctrl-C and SIGTERM then stop a stage the same way
    with or without Ray."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def fit_keeping_signals(trainer: Any) -> Any:
    """`trainer.fit()` with Ctrl-C left to the stage. Called from the main thread, Ray Train's `fit` puts in its own
    SIGINT handler, which aborts the run and ends the process with status 1 before the stage can mark its MLflow run
    or say a word; from another thread it leaves the handlers alone. So `fit` runs in a thread, and Ctrl-C (or
    SIGTERM, which the CLI turns into the same KeyboardInterrupt) reaches the main thread while it waits. Stopped,
    it leaves Ray first."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread as is
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)   # a stopped stage does not wait on it
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)   # a bounded join, so a signal's handler runs in the main thread meanwhile
    except KeyboardInterrupt:
        ray.shutdown()   # at once: the run's actors end and no more of their output is relayed
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def alive_nodes() -> list[dict]:
    """The cluster's live nodes."""
    return [n for n in ray.nodes() if n.get("Alive")]


@ray.remote(num_cpus=0)
def _sees_file(path: str) -> bool:
    return Path(path).is_file()


def check_shared_storage(storage_path: str) -> None:
    """On a multi-node cluster a local `storage_path` must be a mount every node sees (NFS and
    alike): write a marker here and ask a task on every node to find it. URIs (s3://, gs://, ...)
    are shared by definition."""
    if "://" in storage_path:
        return
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    marker = Path(storage_path) / f".shared-check-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("psp")
    try:
        checks = [_sees_file.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote(str(marker)) for n in nodes]
        blind = [n["NodeManagerAddress"] for n, seen in zip(nodes, ray.get(checks)) if not seen]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise InputError(f"train.storage_path {storage_path} is a local path that nodes {blind} cannot see; "
                         "on a multi-node cluster use shared storage (s3://..., gs://..., or an NFS mount on every node)")
