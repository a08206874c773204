"""A pytest plugin for bench_suite_cpu.py: each test's start and end (wall clock) and the process that ran it, one
file per xdist worker in $PSP_SUITE_CLOCK_DIR. Loaded with `-p suite_clock` (benchmarks/ on PYTHONPATH)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def record(event: str, nodeid: str) -> None:
    """Append `event` (start or end) of test `nodeid` with this process's pid and the time."""
    folder = Path(os.environ["PSP_SUITE_CLOCK_DIR"])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with (folder / f"clock-{worker}.txt").open("a") as out:
        out.write(f"{event} {os.getpid()} {time.time():.3f} {nodeid}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Around each test's setup, call and teardown."""
    record("start", item.nodeid)
    yield
    record("end", item.nodeid)
