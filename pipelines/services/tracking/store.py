"""The MLflow tracking store: which one (MLFLOW_TRACKING_URI, else the repository's SQLite file), pointed at
once per process, experiments with an explicit artifact root, and registry artifacts fetched into the
machine's weights cache."""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import mlflow
import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.services.storage import cached_copy, cached_weights, has_credentials, is_registry_reference, scrub
from psp_core.errors import InputError

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
ARTIFACTS_FOLDER = "artifacts"
_CHECKED_STORES: set[str] = set()


def tracking_uri(create: bool = True) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the repository's SQLite store, as an absolute URI. A SQLite store is
    created on demand, or with `create=False` (a command that only reads) must exist: else one line."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):]).resolve()   # absolute: workers run in other directories
        if create:
            database.parent.mkdir(parents=True, exist_ok=True)
        elif not database.is_file():
            raise InputError(f"no MLflow store at {database}: run in the repository that holds mlflow/mlflow.db, "
                             "or set MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{database}"
    return uri


def check_sqlite_store(database: Path) -> None:
    """A SQLite store that exists must be a readable, undamaged database (SQLite's quick check), so a garbage or
    corrupted file is one line, not a traceback from deep inside MLflow; a missing one is created later."""
    if not database.is_file():
        return
    try:
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as err:
        raise InputError(f"{database}: not a usable MLflow SQLite store ({err})") from None
    if verdict != "ok":
        raise InputError(f"{database}: a damaged SQLite database ({verdict}); restore it from a backup")


def use_tracking_store(create: bool = True) -> str:
    """Point the mlflow client at `tracking_uri(create)` (once per process and URI; a SQLite file checked first)
    and return it."""
    uri = tracking_uri(create)
    if uri.startswith("sqlite:///") and uri not in _CHECKED_STORES:
        check_sqlite_store(Path(uri[len("sqlite:///"):]))
        _CHECKED_STORES.add(uri)
    if mlflow.get_tracking_uri() != uri or mlflow.get_registry_uri() != uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if needed. With a SQLite store its artifacts go in
    `artifacts/` beside the database file (not `./mlruns` of whatever directory the process runs
    in); a server decides its own artifact location."""
    if has_credentials(name):
        raise InputError("an experiment name holding credentials (user:password@ in a URI, or a signed URL) is "
                         "refused: it would be stored and shown as it is")
    uri = use_tracking_store()
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_FOLDER / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def client() -> MlflowClient:
    """A client of the tracking store (pointed at first)."""
    use_tracking_store()
    return MlflowClient()


def cached_artifact(uri: str, cache_dir: Path | None = None) -> Path:
    """An MLflow `models:/` or `runs:/` artifact as a local path, fetched once per machine into the weights
    cache. `models:/NAME@ALIAS` is resolved to the version it points at now; the cache key holds the store
    and the run that logged the artifact, so another store's version of the same number is not mistaken
    for it."""
    store = use_tracking_store()
    immutable, run_id = _immutable(uri)

    def fetch(staging: Path) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=immutable, dst_path=str(staging)))
        except MlflowException as err:
            raise InputError(f"cannot fetch {immutable}: {scrub(err.message.splitlines()[0])}") from None

    return cached_copy(f"{store}#{immutable}", {"run_id": run_id}, fetch, cache_dir)


def _immutable(uri: str) -> tuple[str, str]:
    """(`models:/NAME/VERSION[/path]` for what `uri` names now, the id of the run that logged it)."""
    if uri.startswith("runs:/"):
        return uri, uri[len("runs:/"):].split("/", 1)[0]
    name, _, rest = uri[len("models:/"):].partition("/")
    name, _, alias = name.partition("@")
    try:
        if alias:
            version = MlflowClient().get_model_version_by_alias(name, alias)
        else:
            version, rest = MlflowClient().get_model_version(name, rest.split("/", 1)[0]), rest.partition("/")[2]
    except MlflowException as err:  # a missing model, version or alias
        raise InputError(f"{uri}: {scrub(err.message.splitlines()[0])}") from None
    suffix = f"/{rest}" if rest else ""
    return f"models:/{name}/{version.version}{suffix}", f"{version.run_id}@{version.creation_timestamp}"


def fetch_weights(reference: str | Path, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """A weights file of any reference kind as a local path: a local path as it is, an object-store URI or a
    registry artifact fetched once per machine into the cache (`cache_dir`, default the user's)."""
    if is_registry_reference(reference):
        return cached_weights(cached_artifact(str(reference), cache_dir), sha256)
    return cached_weights(reference, sha256, cache_dir)
