"""Shared test set-up: no analytics, no telemetry, no system-metrics threads; the S3 test server fixture."""
import os

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
