"""The `psp` console script: a mistake in the params is answered before the stage's module (torch, Ray, MLflow) is
imported (a command with arguments of its own, `submit`, imports its module to parse them); help still lists the
stage's notes and arguments."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.cli import main

PROBE = """
import json, sys
from pipelines.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "imported": sorted(m for m in ("pipelines.stages.train", "torch", "ray", "mlflow")
                                                   if m in sys.modules)}))
"""


def run_main(tmp_path, *argv: str) -> tuple[dict, str]:
    """`main(argv)` in a fresh interpreter: (its exit code and which heavy modules it imported, its stderr)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("argv, message", [
    (("train", "train.max_stepz=3"), "train.max_stepz"),
    (("train", "align.output_size=128"), "'align.output_size=128'"),
    (("invert", "invert.batch_size=0"), "invert.batch_size"),
])
def test_a_params_mistake_is_one_line_before_the_stage_is_imported(tmp_path, argv, message):
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 2\n")
    result, stderr = run_main(tmp_path, *argv)
    assert result == {"code": 2, "imported": []}, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"psp {argv[0]}: error: ") and message in line


@pytest.mark.parametrize("argv, expected", [(("train", "--help"), "keys of the train section"),
                                            (("submit", "--help"), "--address"),
                                            (("invert", "--help"), "Starts a local Ray")])
def test_help_still_lists_the_stages_notes_and_own_arguments(argv, expected, capsys):
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code == 0 and expected in capsys.readouterr().out
