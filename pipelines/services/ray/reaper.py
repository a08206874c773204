"""A watchdog for a stage that started its own local Ray instance: when the stage's process dies,
however it dies (SIGKILL included), every process it had started is killed.

Ray's agents and workers outlive a driver killed with SIGKILL; this process, started in a session
of its own beside the driver, remembers the driver's descendants (pid and start time, polled) and
kills those still alive once the driver is gone. Run as `python reaper.py PID`: by its file, so the process imports
psutil alone, not the packages around it (Ray and torch, which a watchdog does not need).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_SECONDS = 0.5


def start(pid: int | None = None) -> subprocess.Popen:
    """Start a reaper watching `pid` (default: this process); it exits by itself after the watched one."""
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def watch(pid: int) -> None:
    """Poll `pid`'s process tree until it ends, then kill the descendants seen that still run."""
    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, float] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            seen.update({child.pid: child.create_time() for child in driver.children(recursive=True)
                         if child.pid != os.getpid()})
        except psutil.Error:
            pass
        time.sleep(POLL_SECONDS)
    survivors = []
    for child_pid, started in seen.items():
        try:
            child = psutil.Process(child_pid)
            if child.create_time() == started:
                survivors.append(child)
        except psutil.Error:
            continue
    for child in survivors:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(survivors, timeout=5)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
