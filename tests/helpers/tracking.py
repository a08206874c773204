"""The one way a test gets an MLflow store of its own: a fresh SQLite store under a folder, selected through
MLFLOW_TRACKING_URI (as `psp` processes select it) for the block."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pipelines.services import tracking


@contextmanager
def tracking_store(root: Path) -> Iterator[str]:
    """A fresh SQLite tracking store in `root/mlflow`, selected for the block; yields its URI."""
    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.use_tracking_store()
        yield uri
