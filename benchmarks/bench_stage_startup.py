"""What a `psp train` run costs beside its training: the wall time and the CPU-seconds of its whole process tree
(the stage, Ray's daemons, every worker and actor it starts), and how many processes it starts, with Ray's own
defaults for the services a local instance does not need against the stage's settings
(`pipelines.services.ray.cluster`: two Parquet footer readers, not 32; no Ray Train preemption watcher, no
Ray Train metrics callbacks).

Each run is a fresh `psp train` of the tests' tiny configuration (16 px generator, 2 DDP workers, 6 steps, a
checkpoint every 2), in its own folder; the variants alternate so that a slow spell of the machine falls on both.
Run: python benchmarks/bench_stage_startup.py [--repeats 2] [--json startup.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_suite_cpu import Sampler, attribute  # noqa: E402
from common import command_line, hardware  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.pipelines import make_shards, write_params  # noqa: E402

RAY_DEFAULTS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
                "RAY_TRAIN_METRICS_ENABLED": "1"}
"""Ray's own values of the settings the stage changes."""


def child(variant: str) -> int:
    """Run `psp train` in this process: as the stage sets Ray up, or with Ray's defaults put back."""
    from pipelines.cli import main
    from pipelines.services.ray import cluster

    if variant == "ray-defaults":
        for table in (cluster.WORKER_ENV, cluster.LOCAL_INSTANCE_ENV):
            table.update({k: v for k, v in RAY_DEFAULTS.items() if k in table})
    return main(["train"])


def measure(variant: str, root: Path) -> dict[str, float]:
    """One run in `root`: wall seconds, CPU-seconds of every process of its tree (bench_suite_cpu's sampler, every
    0.2 s; a process stays the run's after its parent is gone) and the number of processes seen in the tree."""
    env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "RAY_enable_worker_prestart": "0",
           "RAY_prestart_worker_first_driver": "0"}
    sampler = Sampler(every=0.2)
    sampler.start()
    start = time.perf_counter()
    with (root / "run.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", variant], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        proc.wait()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: psp train exited {proc.returncode}; see {root / 'run.log'}")
    per_test, _, _ = attribute(sampler.samples, {proc.pid: [(0.0, math.inf, "run")]})
    processes = {pid for _, records in sampler.samples for pid, chain, _, _ in records if proc.pid in chain}
    return {"wall_s": wall, "cpu_s": sum(per_test["run"].values()), "processes": len(processes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        raise SystemExit(child(args.child))

    print(f"# {hardware()}\n# {command_line()}")
    results: dict[str, list[dict[str, float]]] = {"ray-defaults": [], "stage": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in results:
                root = Path(tmp) / f"{variant}-{repeat}"
                root.mkdir()
                make_shards(root)
                write_params(root)
                results[variant].append(measure(variant, root))
                print(f"# {variant} run {repeat + 1}: {results[variant][-1]}")
    print(f"{'variant':14s} {'wall s':>8s} {'CPU s':>8s} {'processes':>10s}")
    medians = {}
    for variant, runs in results.items():
        medians[variant] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        m = medians[variant]
        print(f"{variant:14s} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['processes']:10.0f}")
    base, ours = medians["ray-defaults"], medians["stage"]
    print(f"stage / ray-defaults: wall {ours['wall_s'] / base['wall_s']:.2f}x, CPU {ours['cpu_s'] / base['cpu_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware(), "command": command_line(), "runs": results,
                                         "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
