"""End-to-end runs of real services (Ray, an MLflow server, S3, `dvc repro`): every test here is `slow`."""
import pytest

from helpers.schedule import is_end_to_end


def pytest_collection_modifyitems(items):
    for item in items:
        if is_end_to_end(item.path):
            item.add_marker(pytest.mark.slow)
