"""Rank 0's link from a Ray Train worker to the driver's MLflow run: step and validation metrics, image grids,
the best step, run tags, and system metrics. Plain MLflow client calls: Ray's MLflowLoggerCallback is
refused by Ray Train's RunConfig."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from pipelines.services.tracking.vocabulary import BEST_STEP_TAG

log = logging.getLogger(__name__)


class MLflowCallback:
    """The engine's `TrainingCallback` writing into the run `run_id` of the store at `tracking_uri`."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.monitor = None
        try:
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True,
                                                tracking_uri=tracking_uri)
            self.monitor.start()
        except Exception as err:  # system metrics are a nicety; never fail training over them
            log.warning("system metrics disabled: %s", err)

    def set_tag(self, key: str, value: str) -> None:
        """Tag the run (what the workers resolved: precision, compile, nodes)."""
        self.client.set_tag(self.run_id, key, value)

    def _log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        stamp = int(time.time() * 1000)
        rows = [Metric(prefix + k, float(v), stamp, step) for k, v in metrics.items()]
        rows.append(Metric("step", float(step), stamp, step))
        self.client.log_batch(self.run_id, metrics=rows)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics, prefix="val_")

    def on_images(self, step: int, name: str, grid: torch.Tensor) -> None:
        image = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        self.client.log_image(self.run_id, image, key=f"grid_{name}", step=step)

    def on_checkpoint(self, step: int, path: Path, is_best: bool) -> None:
        if is_best:
            self.client.set_tag(self.run_id, BEST_STEP_TAG, str(step))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
