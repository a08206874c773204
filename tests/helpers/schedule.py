"""The order in which `make test` hands whole test files to its two xdist workers (`--dist loadfile`): the long
end-to-end runs first, so that they start at once, then the long unit files, then the rest, so that the unit files
fill in beside the long runs and the run ends on short files (`tests/conftest.py` sorts by `file_rank`)."""
from __future__ import annotations

from pathlib import Path

E2E_ORDER = ("test_quality.py", "test_dvc_data.py", "test_train_ray.py", "test_object_storage.py",
             "test_data_safety.py", "test_invert_on_ray.py")
"""The end-to-end files, the long runs first so that they start at once. No order was measured to be faster: runs
of nearly the same suite on this 2-core VM took 19 min 46 s and 25 min 18 s in this order and 21 min 25 s with the
two Ray training files first, all within one afternoon."""

UNIT_FIRST = ("test_hyperstyle_training.py", "test_parity.py", "test_invert.py", "test_fast_path.py", "test_pyfunc.py",
              "test_families.py", "test_restyle_training.py", "test_hyperstyle_parity.py", "test_engine.py",
              "test_evaluate.py", "test_edit.py", "test_hyperstyle.py", "test_e4e_training.py", "test_ray_cluster.py")
"""The unit files that took 20 s or more in a full run (112 s down to 21 s, `--durations=0`), longest first, ahead
of the other unit files (13 s at most each). In the collection's order the heavy training files
(`tests/unit/psp_core/training`) came last, and xdist gives a worker its next file once two of its tests are left:
a long file handed out last keeps one worker busy while the other has nothing left. Replaying two full runs' test
durations through that rule gave 25 and 27 s less with this order; two clean-clone runs measured no gain
(README, Quickstart)."""


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
