"""The S3 client, built from the standard AWS environment (endpoint, region, profile; credentials left to the
SDK's own chain), and fsspec's filesystems for the schemes pyarrow lacks."""
from __future__ import annotations

import functools
import os
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pyarrow.fs as pafs
from botocore.session import Session

from pipelines.services.storage.credentials import SECRET_ENV_VARS, scrub
from psp_core.errors import InputError

CONNECT_TIMEOUT_S = 5.0
"""Seconds to wait for a TCP connection to an object store before an attempt fails."""
CHECK_TIMEOUT_S = 4.0
"""Seconds `check_access` waits for a connection and for an answer (one attempt, no retries): a dead
endpoint fails in seconds."""

_S3_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", *SECRET_ENV_VARS)
"""The environment an S3 client is built from: a change of any of them builds a new one."""


def s3_filesystem(fail_fast: bool = False) -> pafs.S3FileSystem:
    """pyarrow's S3 client configured from the standard AWS environment (one per configuration: building
    one takes tens of milliseconds).

    The endpoint (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then the profile's `endpoint_url`, which
    pyarrow does not read itself) and the region (AWS_REGION, then AWS_DEFAULT_REGION) are passed
    explicitly; credentials are left to the AWS SDK's own chain (environment, profile, instance role).
    """
    return _s3_filesystem(fail_fast, tuple(os.environ.get(name) for name in _S3_ENV_VARS))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(fail_fast: bool, environment: tuple[str | None, ...]) -> pafs.S3FileSystem:
    """Build the client from the current environment; `environment` (its values) is the cache key only."""
    options: dict[str, Any] = {"connect_timeout": CHECK_TIMEOUT_S if fail_fast else CONNECT_TIMEOUT_S}
    endpoint = s3_endpoint()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        options["scheme"] = parts.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"
    if fail_fast:
        options["request_timeout"] = CHECK_TIMEOUT_S
        options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    return pafs.S3FileSystem(**options)


def s3_endpoint() -> str | None:
    """The S3 endpoint URL the environment names, if any (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or _profile_endpoint()


def _profile_endpoint() -> str | None:
    """The `endpoint_url` of the active AWS profile (`[profile NAME]` or its `s3` sub-section), if any."""
    try:
        config = Session().get_scoped_config()
    except Exception:  # a broken or missing profile: the SDK reports it on first use
        return None
    nested = config.get("s3")
    return (nested.get("endpoint_url") if isinstance(nested, dict) else None) or config.get("endpoint_url")


def fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem pyarrow lacks, through fsspec (wrapped for pyarrow)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise InputError(f"{uri}: no filesystem for this scheme ({scrub(str(err))})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
