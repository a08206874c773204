"""The GPU check's wheelhouse (benchmarks/wheelhouse.py): pinned as the project pins, unpacked only where the
interpreter lacks a package, and enough for what the check runs: the benchmarks and the parity tests it starts
import nothing of the pipelines' stack (pyarrow, pydantic, Ray, MLflow), which the device image does not have."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import wheelhouse  # noqa: E402


def requirement_pins() -> dict[str, str]:
    """requirements.txt as {normalised name: version}."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[wheelhouse.normalised(name.split("[")[0])] = version
    return pins


def test_the_wheelhouse_pins_what_the_project_pins():
    project = requirement_pins()
    wheels = wheelhouse.pinned()
    assert wheels and {name: project.get(name) for name in wheels} == wheels


def write_wheel(folder: Path, filename: str, package: str, source: str) -> Path:
    """A minimal wheel: one package with an __init__ and its dist-info's top_level.txt."""
    path = folder / filename
    dist = "-".join(filename.split("-")[:2])
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{package}/__init__.py", source)
        wheel.writestr(f"{dist}.dist-info/top_level.txt", f"{package}\n")
        wheel.writestr(f"{dist}.dist-info/METADATA", f"Name: {dist.split('-')[0]}\n")
    return path


def test_unpack_adds_what_the_interpreter_lacks_and_leaves_its_own_packages(tmp_path, capsys):
    house, site = tmp_path / "whl", tmp_path / "site"
    house.mkdir()
    write_wheel(house, "psp_missing_pkg-1.0-py3-none-any.whl", "psp_missing_pkg", "VALUE = 41 + 1\n")
    write_wheel(house, "json-9.9-py3-none-any.whl", "json", "raise ImportError('the wheel shadowed json')\n")
    assert wheelhouse.main(["unpack", str(house), str(site)]) == 0
    assert (site / "psp_missing_pkg" / "__init__.py").is_file() and not (site / "json").exists()
    out = capsys.readouterr().out
    assert "psp_missing_pkg: unpacked" in out and "json: present" in out
    imported = subprocess.run([sys.executable, "-c", "import json, psp_missing_pkg; print(psp_missing_pkg.VALUE)"],
                              env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert imported.returncode == 0 and imported.stdout.strip() == "42", imported.stderr


def test_a_missing_package_without_a_wheel_for_this_python_fails(tmp_path, capsys):
    house = tmp_path / "whl"
    house.mkdir()
    write_wheel(house, "psp_other_pkg-1.0-cp27-cp27mu-manylinux1_x86_64.whl", "psp_other_pkg", "")
    assert wheelhouse.main(["unpack", str(house), str(tmp_path / "site")]) == 1
    assert "psp_other_pkg: MISSING and the wheel is not for Python" in capsys.readouterr().out
    assert not (tmp_path / "site" / "psp_other_pkg").exists()
    assert wheelhouse.main(["unpack", str(tmp_path / "empty"), str(tmp_path / "site")]) == 1


def test_what_the_gpu_check_runs_needs_no_pipeline_package():
    """Import the check's benchmarks and parity tests in a fresh interpreter; none of the pipelines' stack loads."""
    code = ("import sys; sys.path[:0] = ['benchmarks', 'tests']\n"
            "import bench_forward, bench_train_step, unit.psp_core.nets.test_parity\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert {"bench_forward", "bench_train_step", "psp_core", "lpips"} <= loaded
    assert not loaded & {"pipelines", "pyarrow", "pydantic", "ray", "mlflow", "boto3", "botocore", "dvc"}, \
        sorted(loaded & {"pipelines", "pyarrow", "pydantic", "ray", "mlflow", "boto3", "botocore", "dvc"})
