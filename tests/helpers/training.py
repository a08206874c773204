"""Training-engine test tools: a recording callback, reshuffled epochs, scrambled RNGs, a perturbed model, and
the comparison of a resumed run with an uninterrupted one."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from psp_core.training.callbacks import NullCallback
from psp_core.training.engine import Trainer


class Recorder(NullCallback):
    """Keeps everything the engine reports."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.validations: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[int, str, torch.Tensor]] = []
        self.checkpoints: list[tuple[int, Path, bool]] = []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_validation(self, step, metrics):
        self.validations.append((step, metrics))

    def on_images(self, step, name, grid):
        self.images.append((step, name, grid))

    def on_checkpoint(self, step, path, is_best):
        self.checkpoints.append((step, path, is_best))


def shuffled_epochs(batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """`epoch -> batches` in an order drawn from the epoch number, like a sampler's set_epoch."""

    def epoch_batches(epoch: int):
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch))
        return [batches[i] for i in order]

    return epoch_batches


def scramble_rngs(trainer: Trainer) -> None:
    """Global torch / numpy / Python RNGs and the augmentation generator somewhere else than the seed put them."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    trainer.augment_rng.manual_seed(54321)


def perturbed(model):
    """A copy of the model with every weight moved: only a real resume can bring the checkpoint's back."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    other.set_latent_avg(other.latent_avg + 0.01 * torch.randn(other.latent_avg.shape, generator=g))
    return other


# CPU kernels may round the same sum differently for two allocations of one tensor (vectorised loops peel at
# the data's alignment), so a resumed run equals an uninterrupted one to float32 rounding, not always bit for bit.
# Ranger and Adam divide by the root of the second moment, so on a weight whose gradient is near zero a rounding
# difference can move the update by up to the learning rate: measured, 5 of the ReStyle run's 2.4 M weights off by
# up to 1.5e-5 (the rest within 1e-7), and in one pSp run 0.23 % of 77 M weights beyond 1e-7. Weights are therefore compared element by element with a tiny share allowed
# off (at most OUTLIER_SHARE, by at most OUTLIER_ABS); a missed piece of state (an RNG, the optimiser's moments)
# moves nearly every weight, by ~1e-3 per step at lr 1e-3.
RESUME_RTOL = 1e-5
RESUME_ATOL = 1e-7
OUTLIER_SHARE = 1e-2
OUTLIER_ABS = 1e-2


def assert_same_metrics(got: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    """The same metric names, step by step, with values equal to float32 rounding."""
    assert [m.keys() for m in got] == [m.keys() for m in expected]
    assert got == [pytest.approx(m, rel=RESUME_RTOL, abs=RESUME_ATOL) for m in expected]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same state-dict keys; all but OUTLIER_SHARE of the elements equal to float32 rounding, none off by more
    than OUTLIER_ABS."""
    assert got.keys() == expected.keys()
    off, total = 0, 0
    for key in expected:
        a, b = got[key].double(), expected[key].double()
        assert a.shape == b.shape, key
        diff = (a - b).abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        assert worst <= OUTLIER_ABS, f"{key}: off by {worst:.3g}"
        off += int((diff > RESUME_ATOL + RESUME_RTOL * b.abs()).sum())
        total += b.numel()
    assert off <= OUTLIER_SHARE * total, f"{off} of {total} weights differ beyond float32 rounding"
