"""End-to-end runs of real services (Ray, an MLflow server, S3, `dvc repro`): every test here is `slow`."""
import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
