"""params.yaml sections: typed validation, dvc-style overrides and one-line errors."""
from __future__ import annotations

import logging
import re
from typing import Literal

import pytest

from helpers import REPO
from pipelines.cli import COMMANDS, main
from pipelines.params.loading import ConfigError, StageConfig, apply_overrides, load_section, parse_override
from pipelines.services import tracking


class Demo(StageConfig):
    size: int = 256
    faces: Literal["largest", "all"] = "largest"
    ratio: float = 0.1


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=128") == (["a", "b"], 128)
    assert parse_override("flag=true") == (["flag"], True)
    assert parse_override("name=x=y") == (["name"], "x=y")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("novalue")


def test_overrides_take_full_or_section_relative_keys():
    params = {"align": {"size": 1}, "shard": {"rows": 2}}
    merged = apply_overrides(params, ["align.size=5", "rows=7"], section="shard")
    assert merged == {"align": {"size": 5}, "shard": {"rows": 7}}
    assert params == {"align": {"size": 1}, "shard": {"rows": 2}}


def test_load_section_validates_and_names_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("demo:\n  size: 128\n")
    assert load_section("demo", Demo, ["faces=all"], path) == Demo(size=128, faces="all")
    with pytest.raises(ConfigError, match=r"^demo\.size: Input should be a valid integer.*'big'"):
        load_section("demo", Demo, ["size=big"], path)
    with pytest.raises(ConfigError, match=r"demo\.faces: Input should be 'largest' or 'all'"):
        load_section("demo", Demo, ["faces=some"], path)
    with pytest.raises(ConfigError, match=r"demo\.colour: Extra inputs are not permitted"):
        load_section("demo", Demo, ["colour=red"], path)
    with pytest.raises(ConfigError, match="not found"):
        load_section("demo", Demo, [], tmp_path / "missing.yaml")


SUBCOMMANDS = ("sample", "align", "shard", "train", "invert", "submit", "evaluate", "import-checkpoint", "promote")


def test_cli_lists_commands_and_fails_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^ {4}([a-z][a-z-]*)(?: |$)", out, flags=re.MULTILINE))
    expected = set(SUBCOMMANDS) | set(COMMANDS)    # the stages named here and any the CLI has gained
    assert expected <= listed, f"missing from psp --help: {sorted(expected - listed)}"
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_a_relative_compile_cache_is_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """Ray Train workers and Ray Data actors run in other folders: every stage's compile cache reaches them absolute."""
    from pipelines.params.schema import EditConfig, EvaluateConfig, InvertConfig, TrainConfig

    monkeypatch.chdir(tmp_path)
    for section in (TrainConfig, InvertConfig, EvaluateConfig, EditConfig):
        assert section(compile_cache="cache/inductor").compile_cache == str(tmp_path / "cache" / "inductor")
        assert section().compile_cache is None, "unset: the environment's or the user's cache, on each machine"
    assert TrainConfig(compile_cache="cc").training().compile_cache == str(tmp_path / "cc")
    path = tmp_path / "params.yaml"
    path.write_text("invert:\n  compile_cache: s3://bucket/cache\n")
    with pytest.raises(ConfigError, match=r"^invert\.compile_cache: .*a local folder .*not a URI"):
        load_section("invert", InvertConfig, [], path)


@pytest.mark.parametrize("section, override, key", [
    ("edit", "edits=[{kind: ganspace, directions: [[0, 0, 4, .nan]]}]", "edit.edits.0.ganspace.directions.0.3"),
    ("edit", "edits=[{kind: ganspace, directions: [[0, 0, 4, .inf]]}]", "edit.edits.0.ganspace.directions.0.3"),
    ("edit", "edits=[{kind: sefa, end: -.inf}]", "edit.edits.0.sefa.end"),
    ("invert", "mix_alpha=.nan", "invert.mix_alpha"),
    ("train", "loss={l2_lambda: .nan}", "train.loss.l2_lambda"),
    ("train", "learning_rate=.inf", "train.learning_rate"),
    ("align", "threshold=.nan", "align.threshold"),
])
def test_non_finite_numbers_are_refused_in_every_section(tmp_path, section, override, key):
    from pipelines.params.schema import SECTIONS

    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*finite") as err:
        load_section(section, SECTIONS[section], [override], path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfeedit:\n  grid_images: 4\n", r"params\.yaml: not UTF-8 text \(byte 0\)"),
    (b"edit:\n  grid_images: &a [*a]\n", r"params\.yaml: a YAML alias refers to itself \(recursive"),
    (b"edit: &a\n  x: *a\n", r"params\.yaml: a YAML alias refers to itself \(recursive"),
    (b"edit:\n  grid_images: [1, 2\n  x: }\n", r"params\.yaml: not valid YAML: .* \(line 3, column 4\)"),
])
def test_a_damaged_params_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    (tmp_path / "params.yaml").write_bytes(content)
    assert main(["edit", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


SECRET = "wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY"
WITH_PASSWORD = f"s3://AKIAIOSFODNN7:{SECRET}@bucket/x"
SIGNED = f"https://bucket.s3.amazonaws.com/x.pt?X-Amz-Credential=AKIA/x&X-Amz-Signature={SECRET}"


@pytest.mark.parametrize("command, override, key", [
    ("train", f"train.experiment={WITH_PASSWORD}", "train.experiment"),
    ("invert", f"invert.model={WITH_PASSWORD}", "invert.model"),
    ("edit", f"edit.model={SIGNED}", "edit.model"),
    ("evaluate", f"evaluate.compare=[{WITH_PASSWORD}]", "evaluate.compare.0"),
    ("edit", f"edit.edits=[{{kind: interfacegan, direction: '{WITH_PASSWORD}'}}]", "edit.edits.0.direction"),
    ("align", f"align.input_dir={WITH_PASSWORD}", "align.input_dir"),
])
def test_a_setting_holding_credentials_is_refused_by_its_key_without_showing_them(tmp_path, monkeypatch, capsys,
                                                                                 command, override, key):
    """Any setting, URI-typed or free text (an experiment name), that holds credentials stops the command
    before any work: one line naming the key, exit 2, the secret nowhere in the output and nothing created."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    code = main([command, override])
    out, err = capsys.readouterr()
    assert code == 2 and SECRET not in out + err
    assert err.splitlines() == [f"psp {command}: error: {key}: holds credentials (user:password@ in a URI, or a "
                                "signed URL); they never go in a setting: object stores take them from their "
                                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("args", [["lineage", WITH_PASSWORD], ["import-checkpoint", WITH_PASSWORD],
                                  ["import-generator", SIGNED, "out.pt"], ["promote", WITH_PASSWORD]])
def test_arguments_holding_credentials_are_never_echoed(tmp_path, monkeypatch, capsys, args):
    """Command-line arguments that no settings schema sees: the one error line comes out scrubbed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    tracking.client().search_experiments()   # the store exists: the commands that read one go as far as they can
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2 and err.splitlines()[-1].startswith(f"psp {args[0]}: error: "), err
    assert SECRET not in out + err and "***" in err


def test_log_lines_are_scrubbed(capsys):
    """The CLI's log formatter removes credentials from whatever a message quotes."""
    from pipelines.cli import ScrubbingFormatter

    record = logging.LogRecord("psp", logging.INFO, __file__, 1, "fetching %s", (WITH_PASSWORD,), None)
    line = ScrubbingFormatter("%(message)s").format(record)
    assert line == "fetching s3://***@bucket/x"


def test_a_registry_alias_is_not_taken_for_credentials(tmp_path, monkeypatch):
    """`models:/NAME@ALIAS` has an `@` after a scheme too: it stays a valid setting and is shown as it is."""
    from pipelines.params.schema import InvertConfig
    from pipelines.services.storage import scrub

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    section = load_section("invert", InvertConfig, ["invert.model=models:/psp-encoder@champion"],
                           tmp_path / "params.yaml")
    assert section.model == "models:/psp-encoder@champion"
    assert scrub("models:/psp-encoder@champion and s3:/KEY:SECRET@bucket") == \
        "models:/psp-encoder@champion and s3:/***@bucket"
