"""Where the test suite's CPU time goes: run a command that runs pytest (`make test`, `.ci/run`), sample every
process's CPU time each second, and charge each process's CPU to the test its xdist worker was running at the time
(the process is the worker or one of its descendants, or was when first seen: `psp` stages, Ray's processes, servers,
compilers); CPU of processes outside the suite (the kernel's threads, other jobs, this sampler) is reported apart, and
so is the machine's own count of busy CPU time. On a machine the suite keeps busy its wall time is its CPU time over
the cores, so this says what to cut. A process's CPU after the last sample that saw it is missed (under one sampling
interval's worth each): short-lived processes, such as the C++ compiler's, are under-counted.

Run: python benchmarks/bench_suite_cpu.py [--top 25] [--json suite_cpu.json] -- make test
(the command after `--` runs in the repository; pytest loads the clock plugin through PYTEST_ADDOPTS)
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

Record = tuple[int, tuple[int, ...], str, float]
"""One process in one sample: pid, its pid and its ancestors' (nearest first), its kind, CPU-seconds since the last
sample."""

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
    """Every `every` seconds, each process's CPU time since the last sample, with its ancestors' pids; and the
    machine's busy CPU time in all (`psutil.cpu_times`, idle and iowait left out)."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.samples: list[tuple[float, list[Record]]] = []
        self.seen: dict[tuple[int, float], float] = {}
        self.machine_busy = 0.0

    def run(self) -> None:
        first, busy_before = True, busy_cpu_seconds()
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
                if first or pid == os.getpid():   # the first sample holds each process's whole past
                    self.seen[key] = used
                    continue
                delta = used - self.seen.get(key, 0.0)
                if delta < 0.01:   # left for a later sample: a nearly idle process's CPU is counted once it adds up
                    continue
                self.seen[key] = used
                chain, parent = [], pid
                while parent in procs and len(chain) < 40:
                    chain.append(parent)
                    parent = procs[parent]["ppid"]
                records.append((pid, tuple(chain), kind_of(info["name"], info["cmdline"] or []), delta))
            self.samples.append((now, records))
            first = False
            self.stop.wait(max(0.0, self.every - (time.time() - now)))
        self.machine_busy = busy_cpu_seconds() - busy_before


def busy_cpu_seconds() -> float:
    """CPU-seconds the machine's CPUs have spent busy since boot, all processes and the kernel together."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


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


def running_during(spans: list[tuple[float, float, str]], begin: float, end: float) -> list[tuple[str, float]]:
    """The tests a worker ran between two samples, each with its share of the interval (shares sum to 1; the time
    between two tests goes to "(between tests)")."""
    length = end - begin   # > 0: samples are taken in time order, and the first one carries no records
    shares = [(nodeid, (min(end, stop) - max(begin, start)) / length)
              for start, stop, nodeid in spans if start < end and stop > begin]
    covered = sum(share for _, share in shares)
    return shares + ([("(between tests)", 1.0 - covered)] if covered < 0.999 else [])


def attribute(samples: list[tuple[float, list[Record]]], tests: dict[int, list[tuple[float, float, str]]]
              ) -> tuple[dict[str, collections.Counter], collections.Counter, collections.Counter]:
    """CPU-seconds per test (with its process kinds) and per test file; outside the suite, per process kind. A
    process stays its worker's after its parent is gone (a killed driver's Ray processes, reparented to init)."""
    per_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    outside: collections.Counter = collections.Counter()
    owner: dict[int, int] = {}
    previous = samples[0][0] if samples else 0.0
    for moment, records in samples:
        for pid, chain, kind, delta in records:
            worker = next((p if p in tests else owner[p] for p in chain if p in tests or p in owner), None)
            if worker is None:
                outside[kind] += delta
                continue
            owner[pid] = worker
            for nodeid, share in running_during(tests[worker], previous, moment):
                per_test[nodeid]["pytest worker" if pid == worker else kind] += delta * share
        previous = moment
    per_file: collections.Counter = collections.Counter()
    for nodeid, kinds in per_test.items():
        per_file[nodeid.split("::")[0]] += sum(kinds.values())
    return per_test, per_file, outside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=25, help="tests and files listed, most CPU first")
    parser.add_argument("--json", type=Path, help="where to write every test's and file's CPU-seconds")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("command", nargs="+", help="the command that runs pytest (after --), e.g. make test")
    args = parser.parse_args()

    # inputs: the suite, its pytest loading the clock plugin, and the sampler beside it
    with tempfile.TemporaryDirectory(prefix="psp-suite-clock-") as clock_dir:
        env = {**os.environ, "PSP_SUITE_CLOCK_DIR": clock_dir,
               "PYTEST_ADDOPTS": " ".join(filter(None, [os.environ.get("PYTEST_ADDOPTS"), "-p suite_clock"])),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        sampler = Sampler(args.every)
        sampler.start()
        start = time.time()
        code = subprocess.call(args.command, cwd=REPO, env=env)
        wall = time.time() - start
        sampler.stop.set()
        sampler.join()
        tests = read_clocks(Path(clock_dir))

    # outputs: who used the CPU
    per_test, per_file, outside = attribute(sampler.samples, tests)
    suite = sum(per_file.values())
    cores = len(os.sched_getaffinity(0))
    print(f"# {hardware()}\n# {command_line()}")
    print(f"exit {code}; {wall:.0f} s wall; the machine's CPUs busy {sampler.machine_busy:.0f} CPU-s "
          f"({sampler.machine_busy / (wall * cores):.0%} of {cores} cores); sampled: {suite:.0f} in the suite's "
          f"processes, {sum(outside.values()):.0f} outside them")
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
            "hardware": hardware(), "command": command_line(), "exit": code, "wall_s": wall,
            "machine_busy_cpu_s": sampler.machine_busy, "suite_cpu_s": suite, "outside": dict(outside),
            "files": dict(per_file),
            "tests": {nodeid: dict(kinds) for nodeid, kinds in per_test.items()}}, indent=1))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
