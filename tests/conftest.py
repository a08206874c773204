"""Shared test set-up: no analytics, no telemetry, no system-metrics threads, no idle Ray workers; the cores shared out
among the pytest-xdist workers and the longest files started first; each run's temporary files, caches and test
folders removed as it goes, so that a run holds 8 to 12 GB of disk at its peak and leaves nothing behind; the S3 test
server."""
import ctypes
import ctypes.util
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _threads_per_worker() -> int:
    """The CPU cores divided among the xdist workers: two workers each running torch on every core spin
    against each other (OpenMP busy-waits) and run several times slower than one after the other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:   # before torch is first imported, so its thread pool takes it
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker())

# Each run and every `psp` it starts gets its own temporary folder, removed when the run ends (an xdist worker's is
# named after its run's, `<run>-gw0`, so that the run removes a crashed worker's too):
# - a local Ray instance keeps its sessions, sockets and its `ray_current_cluster` address file in `$TMPDIR/ray`,
#   and two workers' (or two runs') instances sharing it would find each other's;
# - the weights cache, the compiled-kernel caches, DVC's site cache and `psp train`'s local checkpoints live under it
#   too, so that the suite neither reads the user's caches (a run must pass on a fresh machine) nor fills them (a run
#   fetches ~0.3 GB of registered models into the cache; each temporary DVC repository adds a folder to DVC's).
# pytest's own folders (`tmp_path`, kept for failed tests) stay in the system's temporary folder, and so do the
# workers' folders, beside their run's rather than inside it: the names stay short, as Ray's socket paths must fit in
# 107 bytes.
RUN_FOLDER = "PSP_TESTS_RUN_FOLDER"
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
if "PYTEST_XDIST_WORKER" in os.environ and RUN_FOLDER in os.environ:
    OWN_TMP = Path(f"{os.environ[RUN_FOLDER]}-{os.environ['PYTEST_XDIST_WORKER']}")
    OWN_TMP.mkdir(exist_ok=True)
else:
    OWN_TMP = Path(tempfile.mkdtemp(prefix="psp-", dir=os.environ["PYTEST_DEBUG_TEMPROOT"]))
    os.environ[RUN_FOLDER] = str(OWN_TMP)
os.environ["TMPDIR"] = str(OWN_TMP)
os.environ["XDG_CACHE_HOME"] = str(OWN_TMP / "cache")
os.environ["DVC_SITE_CACHE_DIR"] = str(OWN_TMP / "dvc")
os.environ.pop("PSP_COMPILE_CACHE_DIR", None)
tempfile.tempdir = None

import pytest

from helpers.schedule import file_rank
from pipelines.services.storage.cache import cache_root

pytest_plugins = ["helpers.editing"]   # the edit stage's fixtures (a tiny model file, a registered version)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# A local Ray starts one idle Python worker per logical CPU before any task asks for one; the tests' Ray instances
# (a dozen, each run beside another test on two cores) start what their actors and tasks use and no more: measured
# on the Ctrl-C training test (since merged into the killed-worker run), 200 -> 157 CPU-seconds.
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# Ray's memory monitor kills a worker once the machine's memory use passes 95 %, counting the other xdist worker's
# too: a HyperStyle training worker (2.2 GB) was killed while the other worker's process held 13.8 GB. The tests'
# instances act at 98 % instead (the kernel's own limit stays 100 %).
os.environ.setdefault("RAY_memory_usage_threshold", "0.98")

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole files in `helpers.schedule`'s order: `make test` hands them to its two xdist workers in this order
    (`--dist loadfile`), the long end-to-end runs first, the long unit files next, the short ones last."""
    items.sort(key=lambda item: file_rank(item.path))   # stable: the order within a file is kept


@pytest.fixture(autouse=True, scope="module")
def return_freed_memory():
    """After each test file, hand what its tests freed back to the OS. The inference core and the trainer make the
    process keep freed memory for the next batch (`psp_core.runtime.devices.keep_freed_memory`): a worker running
    file after file would hold every file's peak (8.5 GB seen), and the Ray runs beside it ran short of memory (Ray
    kills workers above 95 % of the machine's).
    What is left is then frozen (`gc.freeze`): the cyclic collector no longer walks the objects of every module imported
    so far (torch, Ray, MLflow: 0.5-0.9 M objects, 0.3-0.6 s a full collection) but only what later files create
    (0.1 s). A frozen object is still freed when its last reference goes; only a cycle of frozen objects would stay."""
    yield
    gc.collect()
    gc.freeze()
    name = ctypes.util.find_library("c")
    if name is not None and hasattr(ctypes.CDLL(name), "malloc_trim"):   # glibc
        ctypes.CDLL(name).malloc_trim(0)


@pytest.fixture(autouse=True, scope="module")
def forget_tracking_uri():
    """After each test file, forget the MLflow store and registry a test set for the process (`mlflow.set_tracking_uri`
    and `set_registry_uri`, which also export MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI): a later file on the same
    worker would write into them, after their folder is gone."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
        sys.modules["mlflow"].set_registry_uri(None)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(name, None)


_FAILED_FILES: set[Path] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Note the files with a failed test, whose folders `remove_module_folders` keeps."""
    report = yield
    if report.failed:
        _FAILED_FILES.add(item.path)
    return report


@pytest.fixture(autouse=True, scope="module")
def remove_module_folders(request, tmp_path_factory):
    """After each test file, remove the folders made during it (`tmp_path_factory.mktemp`): pytest removes a passed
    test's `tmp_path` at once but keeps every `mktemp` folder until the run ends, and the files' model stores,
    registries and checkpoints added up to 22 GB over a run. pytest numbers each name on (`store0`, `store1`, ...), so a
    removed folder's name is not given again. A file with a failed test keeps its folders, as
    `tmp_path_retention_policy = "failed"` keeps the failed tests' own (a failure in the teardown of its last test or
    module fixture is reported after this). A session-scoped fixture must not keep its files under pytest's folder, as
    it may first be asked for in any file (`s3_server`). Also removed: the weights cache and `psp train`'s local
    checkpoint folders, which hold only this file's registered models and runs."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    shutil.rmtree(cache_root(), ignore_errors=True)   # under OWN_TMP: XDG_CACHE_HOME is set above
    shutil.rmtree(OWN_TMP / "psp-train", ignore_errors=True)
    if request.node.path in _FAILED_FILES:
        return
    for path in set(base.iterdir()) - before:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove this run's own temporary folder (Ray's sessions and logs, the caches, killed runs' checkpoints), and its
    xdist workers' (a crashed worker's included), once every fixture is torn down (after `-x` or Ctrl-C, pytest tears
    the open ones down in its own sessionfinish). Failed tests keep their `tmp_path` folders under pytest's."""
    for folder in (OWN_TMP, *OWN_TMP.parent.glob(f"{OWN_TMP.name}-gw*")):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (SeaweedFS on 127.0.0.1) for the session, with the bucket `psp-test`; its files in
    the run's temporary folder (not under pytest's, which `remove_module_folders` empties file by file)."""
    from helpers.s3 import running_s3_server

    with tempfile.TemporaryDirectory(prefix="s3-") as root, running_s3_server(Path(root)) as server:
        yield server
