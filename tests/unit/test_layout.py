"""The house rules the layout keeps: imports only downward (no cycle), MLflow imported only by the tracking
service and Ray only by the Ray service and the stage code that runs inside Ray, no module over 450 lines,
and at most 8 modules directly in each package root; the test files the suite's schedule names exist."""
from __future__ import annotations

import shlex
from pathlib import Path

from _pytest.config.argparsing import Parser
from xdist.plugin import pytest_addoption

from helpers import REPO
from helpers.code import imported_names
from helpers.schedule import E2E_ORDER, UNIT_FIRST

ROOT = REPO
PACKAGES = ("psp_core", "pipelines")
RAY_USERS = ("pipelines/services/ray/", "pipelines/stages/train.py", "pipelines/stages/train_worker.py")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


imports = imported_names


def project_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {i for i in imports(path) if i in known and i != name} for name, path in known.items()}


def test_no_import_cycle():
    graph = project_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1 and not nxt.startswith(node + ".") and not node.startswith(nxt + "."):
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
                                     if nxt in trail else f"import cycle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_psp_core_imports_no_service():
    for name, path in modules().items():
        if name.startswith("psp_core"):
            heavy = {i.split(".")[0] for i in imports(path)} & {"ray", "mlflow", "dvc", "pipelines"}
            assert not heavy, f"{path.relative_to(ROOT)} imports {sorted(heavy)}"


def test_mlflow_and_ray_have_one_owner_each():
    for path in modules().values():
        relative = path.relative_to(ROOT).as_posix()
        top = {i.split(".")[0] for i in imports(path)}
        if "mlflow" in top:
            assert relative.startswith("pipelines/services/tracking/"), f"{relative} imports mlflow"
        if "ray" in top:
            assert relative.startswith(RAY_USERS), f"{relative} imports ray"


def test_modules_stay_small_and_roots_stay_few():
    for path in modules().values():
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{path.relative_to(ROOT)} has {lines} lines"
    for package in PACKAGES:
        direct = sorted(p.name for p in (ROOT / package).glob("*.py"))
        assert len(direct) <= 8, f"{package}/ holds {len(direct)} modules: {direct}"


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    """The cycle check fails on a graph with a loop (a check that cannot fail checks nothing)."""
    monkeypatch.setattr(__import__(__name__), "project_graph",
                        lambda: {"pipelines.a": {"pipelines.b"}, "pipelines.b": {"pipelines.a"}})
    try:
        test_no_import_cycle()
    except AssertionError as err:
        assert "pipelines.a" in str(err)
    else:
        raise AssertionError("the cycle went unnoticed")


def test_the_suites_schedule_names_its_files():
    """The files the suite hands out first (`helpers.schedule`: E2E_ORDER, UNIT_FIRST) are test files of that kind:
    a renamed file would silently fall to the end of the run, where a long one keeps a worker busy alone."""
    tests = ROOT / "tests"
    e2e = {p.name for p in (tests / "e2e").glob("test_*.py")}
    unit = {p.name for p in (tests / "unit").rglob("test_*.py")}
    assert set(E2E_ORDER) <= e2e, set(E2E_ORDER) - e2e
    assert set(UNIT_FIRST) <= unit, set(UNIT_FIRST) - unit
    assert len(set(UNIT_FIRST)) == len(UNIT_FIRST)


def test_make_test_hands_out_the_files_in_the_schedules_order():
    """`make test`'s pytest options, read by xdist's own option parser: whole files (`loadfile`) and no reordering.
    xdist's default puts the files with the most tests first, and the one-test end-to-end runs started last."""
    line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "-m pytest" in line)
    parser = Parser(_ispytest=True)   # pytest's own parser class, as xdist's hook receives it
    pytest_addoption(parser)
    options = parser.parse_known_args(shlex.split(line.split("-m pytest", 1)[1]))
    assert options.dist == "loadfile" and options.numprocesses == 2
    assert options.loadscopereorder is False
