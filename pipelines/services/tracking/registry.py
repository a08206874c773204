"""Versions and aliases of the model registry: references (`models:/NAME/N`, `models:/NAME@ALIAS`) parsed
and resolved, evaluations recorded onto versions, and `promote`, which moves an alias (optionally only
when the evaluation is better)."""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (  # MLflow's own rules, checked before any work instead of after it
    _validate_model_alias_name,
    _validate_model_alias_name_reserved,
    _validate_model_name,
)

from pipelines.services.storage import scrub
from pipelines.services.tracking.datasets import log_datasets
from pipelines.services.tracking.store import use_tracking_store
from pipelines.services.tracking.vocabulary import (
    COMPARABLE_METRICS,
    DEFAULT_CHAMPION,
    EVAL_ARTIFACT_FOLDER,
    EVAL_CONDITION_TAGS,
    EVAL_PREFIX,
    MLFLOW_BATCH_LIMIT,
    eval_key,
    higher_is_better,
    recorded_text,
)
from psp_core.errors import InputError

log = logging.getLogger(__name__)


_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class VersionRef:
    """A registered model and one of its versions, named by number or by alias."""

    name: str
    ref: str

    @property
    def is_alias(self) -> bool:
        return not self.ref.isdigit()

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.ref}" if self.is_alias else f"models:/{self.name}/{self.ref}"


def check_registry_names(name: str, alias: str | None, *, setting: str, alias_setting: str) -> None:
    """A registered model name and an alias MLflow will accept, else an InputError naming the setting: a stage
    checks them before it works, so a bad alias never fails after a training run or a registered version."""
    checks = [(setting, name, [_validate_model_name])]
    if alias is not None:
        checks.append((alias_setting, alias, [_validate_model_alias_name, _validate_model_alias_name_reserved]))
    for what, value, rules in checks:
        try:
            for rule in rules:
                rule(value)
        except MlflowException as err:
            raise InputError(scrub(f"{what} {value!r}: {err.message}")) from None   # a URI pasted in keeps its secret


def parse_registry_uri(uri: str) -> VersionRef | None:
    """`models:/name@alias` or `models:/name/3` as a VersionRef; None for anything else (e.g. a file path)."""
    match = _REGISTRY_URI.match(uri.strip())
    if match is None:
        return None
    return VersionRef(match["name"], match["alias"] or match["version"])


def resolve_version(ref: VersionRef) -> ModelVersion:
    """The registered version a reference points at; a missing alias, version or model is a one-line InputError."""
    use_tracking_store()
    client = mlflow.MlflowClient()
    try:
        if ref.is_alias:
            return client.get_model_version_by_alias(ref.name, ref.ref)
        return client.get_model_version(ref.name, ref.ref)
    except MlflowException:
        if ref.is_alias:
            raise InputError(f"no version of {ref.name} has alias {ref.ref}") from None
        raise InputError(f"{ref.name} has no version {ref.ref}") from None


def record_evaluation(version: ModelVersion, metrics: Mapping[str, float | None], counts: Mapping[str, int],
                      conditions: Mapping[str, str], files: list[Path], dataset: Any = None,
                      curve: list[Mapping[str, float | None]] = ()) -> None:
    """Log an evaluation onto a registered version: metrics (what a person plots; for ReStyle the
    `curve` of every refinement step as steps 1..n of each metric), the data it read (an MLflow
    dataset, context `evaluation`) and the report files on the version's run; counts and conditions
    as tags (bookkeeping, not charts); every metric and condition as `eval_*` version tags for
    `psp promote`; and a summary in the version's description."""
    client = mlflow.MlflowClient()
    present = {eval_key(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    bookkeeping = {eval_key(k): str(v) for k, v in {**counts, **conditions}.items()}
    if version.run_id:
        stamp = int(time.time() * 1000)
        logged = [Metric(eval_key(k), float(v), stamp, step) for step, values in enumerate(curve, start=1)
                  for k, v in values.items() if v is not None and math.isfinite(v)]
        per_step = {eval_key(k) for values in curve for k in values}
        logged += [Metric(k, v, stamp, len(curve)) for k, v in present.items() if k not in per_step]
        for start in range(0, len(logged), MLFLOW_BATCH_LIMIT):
            client.log_batch(version.run_id, metrics=logged[start:start + MLFLOW_BATCH_LIMIT])
        client.log_batch(version.run_id, tags=[RunTag(k, v) for k, v in bookkeeping.items()])
        if dataset is not None:
            log_datasets(version.run_id, {"evaluated": (dataset, "evaluation")})
        for path in files:
            client.log_artifact(version.run_id, str(path), artifact_path=EVAL_ARTIFACT_FOLDER)
    else:
        log.warning("%s version %s has no run: evaluation kept as version tags only", version.name, version.version)
    for key, value in {**{k: repr(v) for k, v in present.items()}, **bookkeeping}.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    summary = ", ".join(f"{k[len(EVAL_PREFIX):]}={v:.4g}" for k, v in present.items())
    describe_evaluation(version, f"{summary} ({', '.join(f'{k}={v}' for k, v in {**counts, **conditions}.items())}).")


def version_eval(version: ModelVersion, metric: str) -> float | None:
    """The recorded evaluation value of `metric` on a version (None when it was never evaluated)."""
    raw = (version.tags or {}).get(eval_key(metric))
    return None if raw is None else float(raw)


@dataclass(frozen=True)
class Promotion:
    """The outcome of `promote`: whether the alias moved, to which version, and why."""

    moved: bool
    version: str
    reason: str


def promote(ref: VersionRef, to: str = DEFAULT_CHAMPION, if_better: str | None = None) -> Promotion:
    """Point alias `to` at the version `ref` names; with `if_better`, only when that version's
    evaluation of the metric beats the version currently holding `to` (or nothing holds it)."""
    if if_better is not None and eval_key(if_better)[len(EVAL_PREFIX):] not in COMPARABLE_METRICS:
        raise InputError(f"--if-better {if_better}: not an evaluation metric; one of "
                         f"{', '.join(EVAL_PREFIX + m for m in COMPARABLE_METRICS)}")
    check_registry_names(ref.name, to, setting="--name", alias_setting="--to")
    candidate = resolve_version(ref)
    client = mlflow.MlflowClient()
    try:
        current: ModelVersion | None = client.get_model_version_by_alias(ref.name, to)
    except MlflowException:
        current = None
    if current is not None and current.version == candidate.version:
        return Promotion(False, str(candidate.version), f"version {candidate.version} already holds @{to}")
    if if_better is not None and current is not None:
        better, reason = compare_evaluations(candidate, current, if_better)
        if not better:
            return Promotion(False, str(candidate.version), reason)
    elif if_better is not None:
        require_eval(candidate, if_better)
        reason = f"no version held @{to}"
    else:
        reason = "promoted unconditionally"
    client.set_registered_model_alias(ref.name, to, str(candidate.version))
    return Promotion(True, str(candidate.version), reason)


def require_eval(version: ModelVersion, metric: str) -> float:
    """A version's evaluation value of `metric`, or a ValueError telling to run `psp evaluate` on it."""
    value = version_eval(version, metric)
    if value is None:
        raise InputError(f"{version.name} version {version.version} has no {eval_key(metric)} tag: run "
                         f"`psp evaluate model=models:/{version.name}/{version.version}` first")
    return value


def compare_evaluations(candidate: ModelVersion, current: ModelVersion, metric: str) -> tuple[bool, str]:
    """(whether `candidate` strictly beats `current` on `metric`, a one-line reason); refuses values
    measured under different conditions (data, LPIPS backbone, identity network)."""
    key = eval_key(metric)
    new, old = require_eval(candidate, metric), require_eval(current, metric)
    for tag in EVAL_CONDITION_TAGS.get(key[len(EVAL_PREFIX):], ("eval_dataset",)):
        a, b = (candidate.tags or {}).get(tag), (current.tags or {}).get(tag)
        if a != b:
            raise InputError(f"cannot compare {key}: version {candidate.version} has {tag}={a}, version "
                             f"{current.version} has {tag}={b}; evaluate both under the same conditions")
    higher = higher_is_better(key)
    better = new > old if higher else new < old
    relation = "beats" if better else "does not beat"
    direction = "higher" if higher else "lower"
    return better, (f"version {candidate.version} {key}={new:.6g} {relation} version {current.version}'s "
                    f"{old:.6g} ({direction} is better)")


REGISTERED_MODEL_DESCRIPTION = (
    "pSp-family image encoders (pSp, ReStyle, e4e, HyperStyle): each version maps face images to W+ codes of its "
    "StyleGAN2 generator. Input: RGB pixels [N, H, W, 3] in 0..255 (integers), or float32 [N, C, H, W] in [-1, 1]; "
    "any size. Output: W+ codes float32 [N, n_styles, 512]; params n_iters (ReStyle and HyperStyle refinement "
    "steps, default 5) "
    "and return_images (then a dict of latents and 256 px images). Call: "
    "mlflow.pyfunc.load_model('models:/NAME@champion').predict(images); `psp invert` and `psp evaluate` take "
    "the same URI. Versions come from `psp train` (their run holds params, datasets, weights fingerprints) or "
    "`psp import-checkpoint`; `psp evaluate` adds eval_* tags, `psp lineage URI` traces a version to its data."
)
EVALUATION_HEADING = "\n\nEvaluation: "


def describe_version(version: ModelVersion, text: str) -> None:
    """Set a version's description (what it is); an evaluation paragraph already there is kept. The
    registered model gets its general description on first use."""
    client = mlflow.MlflowClient()
    if not client.get_registered_model(version.name).description:
        client.update_registered_model(version.name, description=REGISTERED_MODEL_DESCRIPTION)
    current = client.get_model_version(version.name, str(version.version)).description or ""
    evaluation = current[current.index(EVALUATION_HEADING):] if EVALUATION_HEADING in current else ""
    text = recorded_text(text, len(text))
    client.update_model_version(version.name, str(version.version), description=text + evaluation)
    if version.run_id:
        client.set_tag(version.run_id, "mlflow.note.content", text)   # the run page's Description


def describe_evaluation(version: ModelVersion, summary: str) -> None:
    """Replace the evaluation paragraph of a version's description with `summary`."""
    client = mlflow.MlflowClient()
    current = client.get_model_version(version.name, str(version.version)).description or ""
    base = current.split(EVALUATION_HEADING)[0]
    client.update_model_version(version.name, str(version.version), description=base + EVALUATION_HEADING + summary)
