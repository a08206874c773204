"""The order in which `make test` hands whole test files to its two xdist workers (`--dist loadfile`): the long
end-to-end runs first, so that they start at once, then the long unit files, then the rest, so that the unit files
fill in beside the long runs and the run ends on short files (`tests/conftest.py` sorts by `file_rank`)."""
from __future__ import annotations

from pathlib import Path

E2E_ORDER = ("test_train_ray.py", "test_object_storage.py", "test_quality.py", "test_dvc_data.py",
             "test_train_compile.py", "test_data_safety.py", "test_invert_on_ray.py")
"""The end-to-end files, longest first (504 s down to 83 s in a full run, with `--durations` and each file's start
and end time): the long runs start at once. Until `make test` passed `--no-loadscope-reorder`, xdist handed out the
files with the most tests first whatever this order said: `test_invert_on_ray.py` (one test, 83 s) started 22 min
into that run, and one worker idled for the last 2 min."""

UNIT_FIRST = ("test_hyperstyle_training.py", "test_parity.py", "test_invert.py", "test_fast_path.py", "test_pyfunc.py",
              "test_restyle_training.py", "test_families.py", "test_hyperstyle_parity.py", "test_hyperstyle.py",
              "test_edit.py", "test_evaluate.py", "test_engine.py", "test_e4e_training.py", "test_ray_cluster.py")
"""The unit files that took 24 s or more in the same run (130 s down to 24 s), longest first, ahead of the other unit
files (19 s at most each): they fill in beside the long runs, and the run ends on short files. xdist gives a worker
its next file once two or fewer of its tests are left (loadscope), so a long file handed out last would keep one
worker busy while the other has nothing left."""


def is_end_to_end(path: Path) -> bool:
    """Whether a test file is an end-to-end run (under `tests/e2e`, marked `slow` by that folder's conftest)."""
    return "e2e" in path.parts


def file_rank(path: Path) -> tuple[int, int]:
    """Where a test file goes in the order: E2E_ORDER, other end-to-end files, UNIT_FIRST, the rest."""
    if path.name in E2E_ORDER:
        return 0, E2E_ORDER.index(path.name)
    if is_end_to_end(path):
        return 1, 0
    if path.name in UNIT_FIRST:
        return 2, UNIT_FIRST.index(path.name)
    return 3, 0
