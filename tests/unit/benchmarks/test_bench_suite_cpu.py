"""benchmarks/bench_suite_cpu.py: the CPU a test's subprocess burns is charged to that test, not to the test beside it
or to the processes outside the suite."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers import REPO

BURN = "import time\nend = time.process_time() + 3\nwhile time.process_time() < end: pass"


def test_a_subprocess_cpu_is_charged_to_the_test_that_started_it(tmp_path):
    (tmp_path / "test_burn.py").write_text(textwrap.dedent(f"""
        import subprocess, sys, time

        def test_waits():
            time.sleep(2)

        def test_burns():
            subprocess.run([sys.executable, "-c", {BURN!r}], check=True)

        def test_waits_after():
            time.sleep(2)
    """))
    report = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_suite_cpu.py"), "--every", "0.25",
                           "--json", str(report), "--", sys.executable, "-m", "pytest", str(tmp_path / "test_burn.py"),
                           "-p", "no:cacheprovider", "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tests = json.loads(report.read_text())["tests"]
    kinds = {name: next((k for nodeid, k in tests.items() if nodeid.endswith(f"::{name}")), {})
             for name in ("test_waits", "test_burns", "test_waits_after")}
    # 3 CPU-seconds, less what it used after the last sample that saw it (under one 0.25 s interval)
    assert sum(cpu for kind, cpu in kinds["test_burns"].items() if kind != "pytest worker") >= 2.5, kinds
    assert sum(kinds["test_waits"].values()) < 0.5 and sum(kinds["test_waits_after"].values()) < 0.5, kinds
    assert "the machine's CPUs busy" in done.stdout and "test_burns" in done.stdout
