"""Everything MLflow, in one module: the tracking store (opened once per process), experiments with an
explicit artifact root, logging a pSp checkpoint as a registered pyfunc model, resolving `models:/`
references, importing a released checkpoint, recording an evaluation on a version, and moving an
alias (optionally only when the evaluation is better). `psp import-checkpoint`, `psp promote`,
`psp evaluate`, `psp invert` and `psp train` call these functions."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from psp_core import PSP, load_psp
from psp_core.inference import image_channels
from psp_core.options import FAMILY_NAMES
from psp_core.errors import InputError
from pipelines import encoder_model
from pipelines.io import file_digest

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
ARTIFACTS_FOLDER = "artifacts"
DEFAULT_REGISTERED_MODEL = "psp-encoder"
MODEL_NAME = "encoder"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the repository's SQLite store (created on demand), as an absolute URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):]).resolve()   # absolute: workers run in other directories
        database.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{database}"
    return uri


def use_tracking_store() -> str:
    """Point the mlflow client at `tracking_uri()` (once per process and URI) and return it."""
    uri = tracking_uri()
    if mlflow.get_tracking_uri() != uri or mlflow.get_registry_uri() != uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if needed. With a SQLite store its artifacts go in
    `artifacts/` beside the database file (not `./mlruns` of whatever directory the process runs
    in); a server decides its own artifact location."""
    uri = use_tracking_store()
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_FOLDER / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def encoder_signature(net: PSP) -> ModelSignature:
    """W+ [N, n_styles, 512] float32 out, and the predict params. No input schema: the model takes
    two image layouts (integer pixels [N, H, W, 3] or float [N, C, H, W]) and checks them itself."""
    codes = TensorSpec(np.dtype(np.float32), (-1, net.n_styles, net.arch.style_dim))
    params = ParamSchema([ParamSpec("n_iters", "long", encoder_model.PARAMS["n_iters"]),
                          ParamSpec("return_images", "boolean", encoder_model.PARAMS["return_images"])])
    return ModelSignature(outputs=Schema([codes]), params=params)


def log_encoder(checkpoint: Path, registered_model: str | None = DEFAULT_REGISTERED_MODEL,
                alias: str | None = "candidate", net: PSP | None = None) -> ModelVersion | None:
    """Log a pSp checkpoint in the active run as pyfunc model `encoder`; register it as a new
    version of `registered_model` and point `alias` at it. Returns the version (None if not registered).
    `net`: the checkpoint already loaded, when the caller has it (saves reading the file again)."""
    net = net if net is not None else load_psp(checkpoint)
    size = net.arch.encoder_input_size
    example = np.full((1, size, size, 3), 127, dtype=np.uint8) if image_channels(net) == 3 else \
        np.zeros((1, image_channels(net), size, size), dtype=np.float32)
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=encoder_model.__file__,
        artifacts={encoder_model.CHECKPOINT_ARTIFACT: str(checkpoint)},
        signature=encoder_signature(net),
        input_example=example,
        registered_model_name=registered_model,
        pip_requirements=[f"torch=={_version('torch')}", f"mlflow=={mlflow.__version__}", "psp-pipeline"],
    )
    if not registered_model:
        return None
    version = info.registered_model_version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_model, alias, str(version))
    log.info("registered %s version %s%s", registered_model, version, f" as @{alias}" if alias else "")
    return mlflow.MlflowClient().get_model_version(registered_model, str(version))


REGISTERED_MODEL_DESCRIPTION = (
    "pSp-family image encoders (pSp, ReStyle, e4e): each version maps face images to W+ codes of its StyleGAN2 "
    "generator. Input: RGB pixels [N, H, W, 3] in 0..255 (integers), or float32 [N, C, H, W] in [-1, 1]; any "
    "size. Output: W+ codes float32 [N, n_styles, 512]; params n_iters (ReStyle refinement steps, default 5) "
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
    client.update_model_version(version.name, str(version.version), description=text + evaluation)
    if version.run_id:
        client.set_tag(version.run_id, "mlflow.note.content", text)   # the run page's Description


def describe_evaluation(version: ModelVersion, summary: str) -> None:
    """Replace the evaluation paragraph of a version's description with `summary`."""
    client = mlflow.MlflowClient()
    current = client.get_model_version(version.name, str(version.version)).description or ""
    base = current.split(EVALUATION_HEADING)[0]
    client.update_model_version(version.name, str(version.version), description=base + EVALUATION_HEADING + summary)


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def model_checkpoint(model_uri: str) -> Path:
    """Download a registered encoder (`models:/name@alias`, `models:/name/3`, `runs:/...`) and
    return the path of its pSp checkpoint file."""
    use_tracking_store()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as err:
        raise InputError(f"cannot resolve {model_uri}: {err.message.splitlines()[0]}") from None
    found = sorted((local / "artifacts").glob("*.pt")) + sorted((local / "artifacts").glob("*/*.pt"))
    if not found:
        raise InputError(f"{model_uri} holds no pSp checkpoint (is it a psp-encoder model?)")
    return found[0]


IMPORT_EXPERIMENT = "psp-imports"
SOURCE_TAG = "psp.source_checkpoint"
EVAL_PREFIX = "eval_"
EVAL_ARTIFACT_FOLDER = "eval"
DEFAULT_CHAMPION = "champion"

EVAL_CONDITION_TAGS: dict[str, tuple[str, ...]] = {
    "lpips": ("eval_dataset", "eval_lpips_backbone"),
    "id_similarity": ("eval_dataset", "eval_id_backend"),
}
"""Version tags that must agree before two versions' values of a metric are comparable
(metrics not listed depend only on the data)."""

COMPARABLE_METRICS = ("l2", "lpips", "ms_ssim", "id_similarity", "seconds_per_image")
"""The evaluation metrics `promote --if-better` can decide on."""

HIGHER_IS_BETTER = ("ms_ssim", "id_similarity")
"""Metrics where a larger value is a better reconstruction; the rest (l2, lpips, seconds) are errors or costs."""

MLFLOW_PARAM_KEY_LIMIT = 250
MLFLOW_PARAM_VALUE_LIMIT = 6000
MLFLOW_BATCH_LIMIT = 100

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


def opts_params(opts: Mapping[str, Any]) -> list[Param]:
    """A checkpoint's `opts` as MLflow params: values stringified, keys and values cut to MLflow's limits."""
    return [Param(str(key)[:MLFLOW_PARAM_KEY_LIMIT], str(value)[:MLFLOW_PARAM_VALUE_LIMIT])
            for key, value in sorted(opts.items(), key=lambda item: str(item[0]))]


def checkpoint_opts(path: Path) -> Mapping[str, Any]:
    """The `opts` entry of a pSp checkpoint, read memory-mapped (weights only) so its tensors are not loaded."""
    opts = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("opts")
    return opts if isinstance(opts, Mapping) else {}


def import_checkpoint(path: str | Path, name: str = DEFAULT_REGISTERED_MODEL,
                      alias: str | None = None) -> ModelVersion:
    """Validate a released pSp checkpoint strictly, then register it as a new version of `name` from a
    run in experiment `psp-imports` that records its opts and its file hash."""
    path = Path(path)
    net = load_psp(path)  # strict: a wrong architecture raises CheckpointError before anything is logged
    opts = checkpoint_opts(path)
    source = f"{path.name} sha256:{file_digest(path)}"
    experiment_id = ensure_experiment(IMPORT_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"import-{path.stem}") as run:
        mlflow.set_tag(SOURCE_TAG, source)
        params = opts_params(opts)
        client = mlflow.MlflowClient()
        for start in range(0, len(params), MLFLOW_BATCH_LIMIT):
            client.log_batch(run.info.run_id, params=params[start:start + MLFLOW_BATCH_LIMIT])
        version = log_encoder(path, name, alias, net=net)
    describe_version(version, f"{FAMILY_NAMES[net.arch.family]} encoder ({net.arch.encoder_type}) imported by "
                              f"`psp import-checkpoint` from {source}: {net.arch.encoder_input_size} px input, "
                              f"{net.arch.output_size} px generator; its training data is not recorded.")
    return version


def eval_key(metric: str) -> str:
    """The version tag / run metric name of an evaluation metric (`lpips` -> `eval_lpips`)."""
    return metric if metric.startswith(EVAL_PREFIX) else EVAL_PREFIX + metric


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of this evaluation metric means a better encoder."""
    return eval_key(metric)[len(EVAL_PREFIX):] in HIGHER_IS_BETTER


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
            from pipelines.lineage import log_datasets

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


@dataclass(frozen=True)
class ResolvedModel:
    """An encoder reference made concrete: the local checkpoint file and, for a registry
    reference, the version it points at now."""

    reference: str
    checkpoint: Path
    version: ModelVersion | None

    @property
    def pinned(self) -> str:
        """The exact reference: `models:/name/<version>` for registry models (an alias can move),
        `file:<name>@sha256:<prefix>` for checkpoint files."""
        if self.version is not None:
            return f"models:/{self.version.name}/{self.version.version}"
        return f"file:{self.checkpoint.name}@sha256:{file_digest(self.checkpoint)[:16]}"


def resolve_model(reference: str) -> ResolvedModel:
    """A `models:/NAME@ALIAS` or `models:/NAME/VERSION` reference (downloaded, pinned to the version
    it resolves to now), a train report (`reports/train.json`: the exact version that run
    registered) or a pSp checkpoint file path."""
    if reference.endswith(".json"):
        reference = registered_by(Path(reference))
    ref = parse_registry_uri(reference)
    if ref is not None:
        version = resolve_version(ref)
        return ResolvedModel(reference, model_checkpoint(f"models:/{ref.name}/{version.version}"), version)
    if "://" in reference or reference.startswith(("models:", "runs:")):
        raise InputError(f"model {reference!r}: use models:/NAME@ALIAS, models:/NAME/VERSION, a train report "
                         "(.json) or a .pt file path")
    path = Path(reference)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {path} not found")
    return ResolvedModel(reference, path.resolve(), None)


def registered_by(report: Path) -> str:
    """The `models:/NAME/VERSION` a `psp train` report names (so a pipeline uses exactly what it trained)."""
    try:
        summary = json.loads(report.read_text())
        return f"models:/{summary['registered_model']}/{summary['model_version']}"
    except FileNotFoundError:
        raise FileNotFoundError(f"train report {report} not found: run `psp train` first, or name a model") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{report}: not a `psp train` report naming a registered version ({err!r})") from None
