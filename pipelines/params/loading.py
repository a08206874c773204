"""`params.yaml` sections validated into typed objects, with `dvc exp run -S`-style overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.params.schema import SECTIONS, StageConfig
from pipelines.services.storage.credentials import has_credentials
from psp_core.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")

Section = TypeVar("Section", bound=BaseModel)

__all__ = ["ConfigError", "StageConfig", "apply_overrides", "load_section", "parse_override", "read_params"]


class ConfigError(InputError):
    """A params file or override that cannot be used; the message is one readable line."""


def parse_override(pair: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a YAML-typed value (`1` -> int, `true` -> bool)."""
    key, sep, raw = pair.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {pair!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {pair!r}: value is not valid YAML ({yaml_problem(err)})") from None
    if not is_tree(value):
        raise ConfigError(f"override {pair!r}: a YAML alias refers to itself")
    return key.strip().split("."), value


def apply_overrides(params: dict, overrides: Iterable[str], section: str | None = None) -> dict:
    """Return a copy of `params` with overrides applied.

    A key names a path from the top of params.yaml (`align.output_size=128`, as `dvc exp run -S`
    takes it); with `section` given, a key that does not start with a top-level section name is
    taken inside that section (`output_size=128`).
    """
    merged = _deep_copy(params)
    for pair in overrides:
        path, value = parse_override(pair)
        if section is not None and path[0] not in SECTIONS:
            path = [section, *path]
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {pair!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    """Read a params YAML file into a dict (a missing or malformed file is a ConfigError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the repository root or pass --params)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not is_tree(data):
        raise ConfigError(f"{path}: a YAML alias refers to itself (recursive anchors cannot be settings)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return data


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def is_tree(value: Any) -> bool:
    """Whether a loaded YAML value holds no cycle (an alias inside its own anchor); shared aliases are fine, and
    each container is visited once, so an alias-heavy file costs no more than its size."""
    done: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    open_ids: set[int] = set()
    while stack:
        item, leaving = stack.pop()
        if leaving:
            open_ids.discard(id(item))
            done.add(id(item))
            continue
        if not isinstance(item, (dict, list)) or id(item) in done:
            continue
        if id(item) in open_ids:
            return False
        open_ids.add(id(item))
        stack.append((item, True))
        stack.extend((child, False) for child in (item.values() if isinstance(item, dict) else item))
    return True


def load_section(
    section: str,
    schema: type[Section],
    overrides: Iterable[str] = (),
    path: str | Path = DEFAULT_PARAMS,
) -> Section:
    """Read the params file, apply overrides, validate EVERY section, and return `section` as `schema`.

    Sections other than the command's own are checked too (a typo in `shard:` fails `psp align`
    as well), and a top-level key that is no section is an error.
    """
    overrides = list(overrides)
    for pair in overrides:
        head = parse_override(pair)[0][0]
        if head in SECTIONS and head != section:
            raise ConfigError(f"override {pair!r}: this command reads the {section} section only "
                              f"(set {head} keys in the params file or on `psp {head}`)")
    params = apply_overrides(read_params(path), overrides, section)
    unknown = sorted(set(params) - set(SECTIONS) - {section})
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; the sections are {', '.join(SECTIONS)}")
    for name, other in SECTIONS.items():
        if name != section and name in params:
            validate_section(name, other, params[name])
    return validate_section(section, schema, params.get(section, {}))


def validate_section(section: str, schema: type[Section], values: Any) -> Section:
    """Validate a plain mapping into `schema`; errors name the key as `section.key`. A value holding credentials is
    refused before anything else sees it, and never echoed."""
    secret = first_credential(values, [section])
    if secret is not None:
        raise ConfigError(f"{secret}: holds credentials (user:password@ in a URI, or a signed URL); they never go in "
                          "a setting: object stores take them from their environment (AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    try:
        return schema.model_validate(values if values is not None else {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in (section, *first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        shown = first["type"] not in ("missing", "value_error") and "input" in first
        got = f" (got {first['input']!r})" if shown else ""
        more = f"; and {err.error_count() - 1} more" if err.error_count() > 1 else ""
        raise ConfigError(f"{where}: {message}{got}{more}") from None


def first_credential(value: Any, where: list[str]) -> str | None:
    """The dotted key of the first string under `value` that holds credentials (see `has_credentials`), or None."""
    if isinstance(value, str):
        return ".".join(where) if has_credentials(value) else None
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = first_credential(child, [*where, str(key)])
        if found is not None:
            return found
    return None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
