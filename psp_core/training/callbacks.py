"""What the training engine reports, and to whom: the pipeline plugs a tracker (MLflow) in, psp_core stays free of
it."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor


class TrainingCallback(Protocol):
    """What the engine reports; the pipeline plugs a tracker (MLflow) in here, psp_core stays free of it."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Training losses of one step (every `log_interval` steps)."""

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        """Mean validation losses over the test split."""

    def on_images(self, step: int, name: str, grid: Tensor) -> None:
        """An input | target | output grid [3, H, W] in [0, 1]."""

    def on_checkpoint(self, step: int, path: Path, is_best: bool) -> None:
        """A checkpoint was written (is_best: the new best validation loss)."""


class NullCallback:
    """Reports nothing."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Ignore."""

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        """Ignore."""

    def on_images(self, step: int, name: str, grid: Tensor) -> None:
        """Ignore."""

    def on_checkpoint(self, step: int, path: Path, is_best: bool) -> None:
        """Ignore."""
