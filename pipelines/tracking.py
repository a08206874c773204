"""MLflow wiring: the default local store, experiments with an explicit artifact root, logging a
pSp checkpoint as a registered pyfunc model, aliases, and loading an encoder back from the registry."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from psp_core import PSP, load_psp
from psp_core.errors import InputError
from pipelines import encoder_model

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
    """Point the mlflow client at `tracking_uri()` and return it."""
    uri = tracking_uri()
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
    """Images [N, C, H, W] float32 in, W+ [N, n_styles, 512] float32 out."""
    arch = net.arch
    image = TensorSpec(np.dtype(np.float32), (-1, arch.input_nc, arch.encoder_input_size, arch.encoder_input_size))
    codes = TensorSpec(np.dtype(np.float32), (-1, net.n_styles, arch.style_dim))
    return ModelSignature(inputs=Schema([image]), outputs=Schema([codes]))


def log_encoder(checkpoint: Path, registered_model: str | None = DEFAULT_REGISTERED_MODEL,
                alias: str | None = "candidate", net: PSP | None = None) -> ModelVersion | None:
    """Log a pSp checkpoint in the active run as pyfunc model `encoder`; register it as a new
    version of `registered_model` and point `alias` at it. Returns the version (None if not registered).
    `net`: the checkpoint already loaded, when the caller has it (saves reading the file again)."""
    net = net if net is not None else load_psp(checkpoint)
    size, channels = net.arch.encoder_input_size, net.arch.input_nc
    example = np.zeros((1, channels, size, size), dtype=np.float32)
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
    "pSp-family image encoders (pixel2style2pixel): each version maps face images to W+ codes of its StyleGAN2 "
    "generator. Input: images float32 [N, C, H, W] in [-1, 1] (C = 3 for photos; H = W = the version's encoder "
    "input size). Output: W+ codes float32 [N, n_styles, 512]. Call: "
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


def load_registered_psp(model_uri: str) -> PSP:
    """The full pSp network (encoder and generator) behind a registered encoder."""
    return load_psp(model_checkpoint(model_uri))
