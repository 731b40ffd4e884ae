"""Access-denied errors that name the object and where this process's credentials come from.

s3fs reports a 403 as `PermissionError("Access Denied")`: no bucket, no key, no hint which credentials were refused.
`access_named(url, verb)` re-raises it as `AccessDenied` naming the object, what was attempted (read, write, list)
and, for s3, the credential source botocore picked (environment variables, a profile in ~/.aws, the node's IAM
role, web identity, explicit `storage_options` keys), so the message says which identity lacks the permission.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.redaction import redact_text

# botocore's Credentials.method, as a person would name the source.
_SOURCES = {
    "env": "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
    "shared-credentials-file": "~/.aws/credentials (profile AWS_PROFILE or default)",
    "config-file": "~/.aws/config (profile AWS_PROFILE or default)",
    "iam-role": "the node's instance IAM role",
    "container-role": "the container's task role",
    "assume-role": "an assumed role of ~/.aws/config",
    "assume-role-with-web-identity": "web identity (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, e.g. an EKS service "
                                     "account)",
    "sso": "AWS SSO (aws sso login)",
}


class AccessDenied(PermissionError):
    """A storage request was refused; the message names the object and where the credentials come from."""


def s3_credential_source(storage_options: dict[str, Any] | None = None) -> str:
    """Where s3fs/boto3 take this process's credentials from, in words."""
    options = storage_options or {}
    if options.get("anon"):
        return "none (storage_options anon: true)"
    if options.get("key") or options.get("secret"):
        return "the key and secret in storage_options"
    import botocore.session

    session = botocore.session.Session(profile=options.get("profile"))
    credentials = session.get_credentials()
    if credentials is None:
        return "nowhere: no AWS credentials found"
    return _SOURCES.get(credentials.method, f"botocore's {credentials.method!r} provider")


@contextmanager
def access_named(url: str, verb: str = "read", storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Re-raise a PermissionError of the block as AccessDenied naming `url`, `verb` and the credential source."""
    try:
        yield
    except AccessDenied:
        raise
    except PermissionError as err:
        detail = err.strerror or (err.args[0] if err.args else "")
        source = ""
        if url.startswith(("s3://", "s3a://")):
            source = f"; this process's s3 credentials come from {s3_credential_source(storage_options)}"
        raise AccessDenied(
            f"access denied to {redact_text(url)} ({detail}): the credentials this process uses (for s3: "
            f"AWS_ACCESS_KEY_ID / AWS_PROFILE / the node's IAM role, or storage_options) may not {verb} it{source}"
        ) from err
