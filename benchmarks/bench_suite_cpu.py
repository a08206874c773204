"""Where the test suite's CPU time goes: run pytest, sample every process's CPU time each second, and charge each
process's CPU to the test its xdist worker was running (the process is the worker or one of its descendants: `psp`
stages, Ray's processes, servers, compilers); CPU of processes outside the suite (the kernel's threads, other jobs)
is reported apart. On a machine the suite keeps busy its wall time is its CPU time over the cores, so this says what
to cut. A process's CPU after the last sample that saw it is missed (under a second's worth each): short-lived
processes, such as the C++ compiler's, are under-counted.

Run: python benchmarks/bench_suite_cpu.py [--top 25] [--json suite_cpu.json] -- -n 2 --dist loadfile --no-loadscope-reorder
(the arguments after `--` go to pytest; the run takes as long as the suite)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "mlflow", "huey", "weed",
         "dvc", "cc1plus", "psp ")
"""Command-line words that name a process's kind (Ray's workers name themselves `ray::<actor or task>`)."""


def kind_of(name: str, cmdline: list[str]) -> str:
    """A short label of what a process is, from its name and command line."""
    text = " ".join(cmdline[:4]) or name
    if text.startswith("ray::"):
        return re.sub(r"[^A-Za-z_:]", "", text.split()[0])[:48]
    return next((kind.strip() for kind in KINDS if kind in text), name)


class Sampler(threading.Thread):
    """Every `every` seconds, each process's CPU time since the last sample, with its ancestors' pids."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.samples: list[tuple[float, list[tuple[int, tuple[int, ...], str, float]]]] = []
        self.seen: dict[tuple[int, float], float] = {}

    def run(self) -> None:
        first = True
        while not self.stop.is_set():
            now = time.time()
            procs = {}
            for proc in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times", "name", "cmdline"]):
                if proc.info["cpu_times"] is not None:
                    procs[proc.info["pid"]] = proc.info
            records = []
            for pid, info in procs.items():
                key = (pid, info["create_time"])
                used = info["cpu_times"].user + info["cpu_times"].system
                delta, self.seen[key] = used - self.seen.get(key, 0.0), used
                if first or delta < 0.01:   # the first sample holds each process's whole past
                    continue
                chain, parent = [], pid
                while parent in procs and len(chain) < 40:
                    chain.append(parent)
                    parent = procs[parent]["ppid"]
                records.append((pid, tuple(chain), kind_of(info["name"], info["cmdline"] or []), delta))
            self.samples.append((now, records))
            first = False
            self.stop.wait(max(0.0, self.every - (time.time() - now)))


def read_clocks(folder: Path) -> dict[int, list[tuple[float, float, str]]]:
    """{worker pid: [(start, end, test id)]} from suite_clock's files."""
    tests: dict[int, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for path in folder.glob("clock-*.txt"):
        started: dict[str, float] = {}
        for line in path.read_text().splitlines():
            event, pid, stamp, nodeid = line.split(" ", 3)
            if event == "start":
                started[nodeid] = float(stamp)
            elif nodeid in started:
                tests[int(pid)].append((started.pop(nodeid), float(stamp), nodeid))
    return tests


def test_at(spans: list[tuple[float, float, str]], moment: float) -> str:
    """The test a worker ran at `moment` (a second's slack either side: the samples are a second apart)."""
    for start, end, nodeid in spans:
        if start - 1.0 <= moment <= end + 1.0:
            return nodeid
    return "(between tests)"


def attribute(samples, tests) -> tuple[dict, dict, collections.Counter]:
    """CPU-seconds per test (with its process kinds) and per test file; outside the suite, per process kind."""
    per_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    outside: collections.Counter = collections.Counter()
    for moment, records in samples:
        for pid, chain, kind, delta in records:
            worker = next((p for p in chain if p in tests), None)
            if worker is None:
                outside[kind] += delta
                continue
            per_test[test_at(tests[worker], moment)]["pytest worker" if pid == worker else kind] += delta
    per_file: collections.Counter = collections.Counter()
    for nodeid, kinds in per_test.items():
        per_file[nodeid.split("::")[0]] += sum(kinds.values())
    return per_test, per_file, outside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=25, help="tests and files listed, most CPU first")
    parser.add_argument("--json", type=Path, help="where to write every test's and file's CPU-seconds")
    parser.add_argument("pytest_args", nargs="*", help="pytest's arguments (after --)")
    args = parser.parse_args()

    # inputs: the suite, run by pytest with the clock plugin, and the sampler beside it
    clock_dir = Path(tempfile.mkdtemp(prefix="psp-suite-clock-"))
    env = {**os.environ, "PSP_SUITE_CLOCK_DIR": str(clock_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    sampler = Sampler()
    sampler.start()
    start = time.time()
    code = subprocess.call([sys.executable, "-m", "pytest", "-p", "suite_clock", *args.pytest_args], cwd=REPO, env=env)
    wall = time.time() - start
    sampler.stop.set()
    sampler.join()

    # outputs: who used the CPU
    per_test, per_file, outside = attribute(sampler.samples, read_clocks(clock_dir))
    suite = sum(per_file.values())
    total = suite + sum(outside.values())
    cores = psutil.cpu_count()
    print(f"# {hardware()}\n# {command_line()}")
    print(f"pytest exit {code}; {wall:.0f} s wall; {total:.0f} CPU-s in all ({total / (wall * cores):.0%} of "
          f"{cores} cores): {suite:.0f} in the suite's processes, {total - suite:.0f} outside it")
    print("outside the suite: " + ", ".join(f"{kind} {cpu:.0f}" for kind, cpu in outside.most_common(8)))
    print(f"\n{'CPU-s':>7}  test file")
    for name, cpu in per_file.most_common(args.top):
        print(f"{cpu:7.0f}  {name}")
    print(f"\n{'CPU-s':>7}  test (its processes' CPU-s by kind)")
    for nodeid, kinds in sorted(per_test.items(), key=lambda item: -sum(item[1].values()))[:args.top]:
        print(f"{sum(kinds.values()):7.0f}  {nodeid}\n         "
              + ", ".join(f"{kind} {cpu:.0f}" for kind, cpu in kinds.most_common(6)))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "hardware": hardware(), "command": command_line(), "pytest_exit": code, "wall_s": wall,
            "cpu_s": total, "suite_cpu_s": suite, "outside": dict(outside), "files": dict(per_file),
            "tests": {nodeid: dict(kinds) for nodeid, kinds in per_test.items()}}, indent=1))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
