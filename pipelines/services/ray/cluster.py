"""Connecting to Ray: the cluster when there is one, else a local instance sized so that Ray
Data's read tasks are never starved by the training workers (and reaped with the stage, however
the stage ends); and the shared-storage check."""
from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.services.ray import reaper
from psp_core.errors import InputError

log = logging.getLogger(__name__)

# Logical CPUs kept free beside the training workers for Ray Data tasks and the trainer controller.
SPARE_CPUS = 2

WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MALLOC_ARENA_MAX": "1"}
"""The job's Ray worker processes' environment. One glibc malloc arena: Ray runs actor methods and the training
function on threads it starts before our code, and a thread's own arena returns what each batch frees to the
OS; in the one main arena, `psp_core.runtime.devices.keep_freed_memory` keeps it (an inversion actor at 1024 px: ~300k
page faults a batch and 1.2x the time without it, benchmarks/README.md)."""


def connect(worker_cpus: float) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), or start a local Ray with
    enough logical CPUs for the workers plus `SPARE_CPUS`."""
    if ray.is_initialized():
        return
    env = {"env_vars": WORKER_ENV}
    if os.environ.get("RAY_ADDRESS"):
        with stage_signal_handlers():
            ray.init(runtime_env=env, log_to_driver=True)
        log.info("connected to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    cpus = max(os.cpu_count() or 1, int(worker_cpus + 0.999) + SPARE_CPUS)
    reaper.start()   # Ray's processes would outlive a driver killed with SIGKILL
    with stage_signal_handlers():
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env)
    log.info("started a local Ray instance with %d logical CPUs", cpus)


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
