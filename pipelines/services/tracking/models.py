"""Encoders in the model registry: logging a pSp checkpoint as the registered pyfunc model (a HyperStyle one with its
W encoder beside it), describing a version, importing a released checkpoint, and resolving an encoder reference (a
version, an alias, a train report or a file) to a local checkpoint."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
import torch
from mlflow.entities import Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from pipelines.services.storage import file_digest
from pipelines.services.tracking import pyfunc
from pipelines.services.tracking.registry import (
    check_registry_names,
    describe_version,
    parse_registry_uri,
    resolve_version,
)
from pipelines.services.tracking.store import cached_artifact, ensure_experiment
from pipelines.services.tracking.vocabulary import (
    DEFAULT_REGISTERED_MODEL,
    IMPORT_EXPERIMENT,
    MLFLOW_BATCH_LIMIT,
    MLFLOW_PARAM_KEY_LIMIT,
    MODEL_NAME,
    SOURCE_TAG,
    recorded_text,
)
from psp_core import PSP, HyperStyle, load_psp
from psp_core.errors import InputError
from psp_core.inference import image_channels
from psp_core.nets.hyperstyle_checkpoints import find_w_encoder, w_encoder_name
from psp_core.options import FAMILY_NAMES

log = logging.getLogger(__name__)


def encoder_signature(net: PSP | HyperStyle) -> ModelSignature:
    """W+ [N, n_styles, 512] float32 out, and the predict params. No input schema: the model takes
    two image layouts (integer pixels [N, H, W, 3] or float [N, C, H, W]) and checks them itself."""
    codes = TensorSpec(np.dtype(np.float32), (-1, net.n_styles, net.arch.style_dim))
    params = ParamSchema([ParamSpec("n_iters", "long", pyfunc.PARAMS["n_iters"]),
                          ParamSpec("return_images", "boolean", pyfunc.PARAMS["return_images"])])
    return ModelSignature(outputs=Schema([codes]), params=params)


def log_encoder(checkpoint: Path, registered_model: str | None = DEFAULT_REGISTERED_MODEL,
                alias: str | None = "candidate", net: PSP | HyperStyle | None = None,
                w_encoder: Path | None = None) -> ModelVersion | None:
    """Log a pSp checkpoint in the active run as pyfunc model `encoder` (a HyperStyle checkpoint with its `w_encoder`
    file beside it: `encoder_artifacts`); register it as a new version of `registered_model` and point `alias` at it.
    Returns the version (None if not registered). `net`: the checkpoint already loaded, when the caller has it
    (saves reading the file again)."""
    net = net if net is not None else load_psp(checkpoint, w_encoder=w_encoder)
    size = net.arch.encoder_input_size
    example = np.full((1, size, size, 3), 127, dtype=np.uint8) if image_channels(net) == 3 else \
        np.zeros((1, image_channels(net), size, size), dtype=np.float32)
    with encoder_artifacts(checkpoint, w_encoder) as artifacts:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=pyfunc.__file__,
            artifacts=artifacts,
            signature=encoder_signature(net),
            input_example=(example, {"n_iters": 1}),   # MLflow predicts it when logging: one step checks enough
            registered_model_name=registered_model,
            pip_requirements=[f"torch=={package_version('torch')}", f"mlflow=={mlflow.__version__}", "psp-pipeline"],
        )
    if not registered_model:
        return None
    version = info.registered_model_version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_model, alias, str(version))
    log.info("registered %s version %s%s", registered_model, version, f" as @{alias}" if alias else "")
    return mlflow.MlflowClient().get_model_version(registered_model, str(version))


@contextmanager
def encoder_artifacts(checkpoint: Path, w_encoder: Path | None) -> Iterator[dict[str, str]]:
    """The pyfunc model's artifacts: the checkpoint, and a HyperStyle checkpoint's W encoder under the name its opts
    give (`w_encoder_name`; linked, else copied, into a temporary folder when the file is named otherwise), so that
    MLflow stores both in one folder and `load_psp` of the stored checkpoint finds the W encoder beside it."""
    if w_encoder is None:
        yield {pyfunc.CHECKPOINT_ARTIFACT: str(checkpoint)}
        return
    name = w_encoder_name(checkpoint_opts(checkpoint))
    if name == checkpoint.name:
        raise InputError(f"{checkpoint}: the checkpoint has the name of its W encoder ({name}); rename it to "
                         "register both")
    with tempfile.TemporaryDirectory(prefix="psp-w-encoder-") as staging:
        named = w_encoder
        if w_encoder.name != name:
            named = Path(staging) / name
            try:
                os.link(w_encoder, named)
            except OSError:   # another file system
                shutil.copyfile(w_encoder, named)
        yield {pyfunc.CHECKPOINT_ARTIFACT: str(checkpoint), pyfunc.W_ENCODER_ARTIFACT: str(named)}


def model_checkpoint(model_uri: str) -> Path:
    """The pSp checkpoint file of a registered encoder (`models:/name@alias`, `models:/name/3`, `runs:/...`): the
    pyfunc model's `checkpoint` artifact (a HyperStyle one's W encoder lies beside it), fetched once per machine
    into the weights cache."""
    local = cached_artifact(model_uri)
    try:
        artifacts = Model.load(local).flavors["python_function"]["artifacts"]
        found = local / artifacts[pyfunc.CHECKPOINT_ARTIFACT]["path"]
    except (OSError, MlflowException, KeyError, TypeError):
        found = None
    if found is None or not found.is_file():
        raise InputError(f"{model_uri} holds no pSp checkpoint (is it a psp-encoder model?)")
    return found


def opts_params(opts: Mapping[str, Any]) -> list[Param]:
    """A checkpoint's `opts` as MLflow params: values stringified, keys and values cut to MLflow's limits."""
    return [Param(recorded_text(key, MLFLOW_PARAM_KEY_LIMIT), recorded_text(value))
            for key, value in sorted(opts.items(), key=lambda item: str(item[0]))]


def checkpoint_opts(path: Path) -> Mapping[str, Any]:
    """The `opts` entry of a pSp checkpoint, read memory-mapped (weights only) so its tensors are not loaded."""
    opts = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("opts")
    return opts if isinstance(opts, Mapping) else {}


def import_checkpoint(path: str | Path, name: str = DEFAULT_REGISTERED_MODEL, alias: str | None = None,
                      w_encoder: str | Path | None = None) -> ModelVersion:
    """Validate a released checkpoint strictly (a HyperStyle one with its W encoder: `w_encoder`, else the file its
    opts name, found as `find_w_encoder` says), then register it as a new version of `name` from a run in experiment
    `psp-imports` that records its opts and the files' hashes; a HyperStyle version carries both files."""
    check_registry_names(name, alias, setting="--name", alias_setting="--alias")
    path = Path(path)
    # strict: a wrong architecture or a missing W encoder raises CheckpointError before anything is logged
    net = load_psp(path, w_encoder=w_encoder)
    opts = checkpoint_opts(path)
    w_path = find_w_encoder(path, opts, w_encoder) if isinstance(net, HyperStyle) else None
    source = f"{path.name} sha256:{file_digest(path)}"
    if w_path is not None:
        source += f" + W encoder {w_path.name} sha256:{file_digest(w_path)}"
    experiment_id = ensure_experiment(IMPORT_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"import-{path.stem}") as run:
        mlflow.set_tag(SOURCE_TAG, source)
        params = opts_params(opts)
        client = mlflow.MlflowClient()
        for start in range(0, len(params), MLFLOW_BATCH_LIMIT):
            client.log_batch(run.info.run_id, params=params[start:start + MLFLOW_BATCH_LIMIT])
        version = log_encoder(path, name, alias, net=net, w_encoder=w_path)
    describe_version(version, f"{FAMILY_NAMES[net.arch.family]} encoder ({net.arch.encoder_type}) imported by "
                              f"`psp import-checkpoint` from {source}: {net.arch.encoder_input_size} px input, "
                              f"{net.arch.output_size} px generator; its training data is not recorded.")
    return version


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
