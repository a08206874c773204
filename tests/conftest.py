"""Shared test set-up: no analytics, no telemetry, no system-metrics threads, the cores shared among pytest-xdist
workers; the S3 test server fixture."""
import os


def _threads_per_worker() -> int:
    """The CPU cores divided among the xdist workers: two workers each running torch on every core spin
    against each other (OpenMP busy-waits) and run several times slower than one after the other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:   # before torch is first imported, so its thread pool takes it
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker())

import pytest

pytest_plugins = ["helpers.editing"]   # the edit stage's fixtures (a tiny model file, a registered version)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS on 127.0.0.1) for the session, with the bucket `psp-test`."""
    from helpers.s3 import running_s3_server

    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
