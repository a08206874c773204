"""The DVC graph is honest: every module a stage's command can run is one of that stage's deps."""
from __future__ import annotations

from pathlib import Path

import yaml

from helpers import REPO
from helpers.code import imported_names
from pipelines.cli import COMMANDS

ROOT = REPO
PACKAGES = ("psp_core", "pipelines")


def module_file(name: str) -> Path | None:
    """The source file of a project module (a package's __init__.py), None for anything else."""
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere (top level and inside functions: lazy imports run too)."""
    return {name for name in imported_names(path) if name.split(".")[0] in PACKAGES and module_file(name) is not None}


def code_closure(*modules: str) -> set[str]:
    """Repository-relative files of `modules` and of every project module they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(module_file(name)))
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_depends_on_all_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"sample", "align", "shard", "train", "evaluate", "invert", "edit"}
    for name, stage in stages.items():
        command = stage["cmd"].split()[1]
        assert stage["cmd"] == f"psp {command}"
        code = code_closure("pipelines.cli", COMMANDS[command].module)
        missing = sorted(f for f in code if not covered(f, stage["deps"]))
        assert not missing, f"stage {name} runs {missing} but does not depend on them"
        assert f"pipelines/stages/{command}.py" in code


def test_the_closure_sees_lazy_imports():
    """invert aligns an unaligned folder through a function-level import of the align stage."""
    assert "pipelines/stages/align.py" in code_closure("pipelines.stages.invert")
    assert "psp_core/data/align.py" not in code_closure("pipelines.stages.shard")


def test_evaluate_and_invert_default_to_the_version_train_registered():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["evaluate"]["model"] == params["train"]["report"] == params["invert"]["model"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "${train.report}" in stages["evaluate"]["deps"] and "${train.report}" in stages["invert"]["deps"]
