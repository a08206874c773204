"""Credentials never shown: the secret AWS variables' values, userinfo in URLs and signed-URL queries are
removed (`scrub`) from every message the CLI prints or logs and every value written to MLflow, and a setting
that holds any is refused (`has_credentials`)."""
from __future__ import annotations

import os
import re

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
"""Environment variables whose values never appear in a message."""

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@"
                       r"|(?P<folded>[A-Za-z][A-Za-z0-9+.-]*:/)[^/@\s:]+:[^/@\s]+@")
"""Userinfo in a URL, also in one a Path has folded to `scheme:/user:password@host` (only with a password there:
`models:/NAME@ALIAS` is a registry reference, not a user)."""
_SIGNED_QUERY = re.compile(r"(?i)\b(X-Amz-(?:Credential|Signature|Security-Token)|Signature|AWSAccessKeyId)=[^&\s]+")


def scrub(text: str) -> str:
    """`text` without credentials: values of the AWS secret variables, userinfo in URLs, signed-URL queries."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    text = _USERINFO.sub(lambda m: f"{m.group('scheme') or m.group('folded')}***@", text)
    return _SIGNED_QUERY.sub(lambda m: f"{m.group(1)}=***", text)


def has_credentials(text: str) -> bool:
    """Whether `text` holds what `scrub` removes."""
    return scrub(text) != text
