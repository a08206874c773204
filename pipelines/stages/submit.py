"""`psp submit`: run `psp train` as a Ray job on a cluster (`ray job submit`), uploading the code only.

The job's working directory is this repository without data, MLflow store, DVC cache, results and
git history; local paths in the train section are made absolute (they must be on storage every node
sees; URIs pass as they are), and MLFLOW_TRACKING_URI and the object store's endpoint and region (never
its credentials: each node has its own) are passed on so the job tracks and reads where this shell does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.params.loading import load_section
from pipelines.params.schema import TrainConfig
from pipelines.services.storage import is_remote
from pipelines.services.tracking import tracking_uri

log = logging.getLogger(__name__)

UPLOAD_EXCLUDES = [".git", ".venv", ".dvc/cache", ".dvc/tmp", "data", "mlflow", "ray_results", "reports",
                   "pretrained_models", "benchmarks/results", "**/__pycache__", "*.pt", "*.pth"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STORE_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")
"""Object-store settings (no secrets) the job inherits from the submitting shell."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                        help="Ray job server (dashboard) address (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return instead of streaming the job's logs")
    parser.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command instead of running it")
    parser.epilog = ("`ray start --head` turns token authentication on; this command sets RAY_AUTH_MODE=token "
                     "unless it is already set. Overrides apply to the train section, as for `psp train`.")


def submit_command(args: argparse.Namespace) -> list[str]:
    """The `ray job submit` command line for `psp train` with these params and overrides."""
    cfg = load_section("train", TrainConfig, args.overrides, args.params)
    pinned = [f"train.{key}={value}" for key, value in absolute_paths(cfg).items()]
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        log.warning("MLflow store is the local SQLite file %s: only a cluster on this machine can write it; "
                    "set MLFLOW_TRACKING_URI to an MLflow server for a real cluster", uri)
    endpoints = {name: os.environ[name] for name in STORE_SETTINGS if os.environ.get(name)}
    runtime_env = {"excludes": UPLOAD_EXCLUDES,
                   "env_vars": {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **endpoints}}
    entrypoint = ["python", "-m", "pipelines.cli", "train", "--params", Path(args.params).name, *args.overrides, *pinned]
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    return [ray, "job", "submit", "--address", args.address, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), *(["--no-wait"] if args.no_wait else []), "--", *entrypoint]


def absolute_paths(cfg: TrainConfig) -> dict[str, str]:
    """The train section's file paths, absolute (URIs unchanged), as the job must see them."""
    paths = {"shards": cfg.shards, "generator": cfg.generator, "irse50": cfg.irse50, "report": cfg.report,
             "storage_path": cfg.storage_path}
    return {key: str(value) if is_remote(value) else str(Path(value).resolve()) for key, value in paths.items()}


def run(args: argparse.Namespace) -> int:
    command = submit_command(args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    return subprocess.run(command, env=env).returncode
