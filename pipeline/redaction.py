"""Keep credentials out of MLflow params, logged config artifacts and printed logs.

A config may carry secrets four ways: a value under a secret-looking key (`storage_options.secret`,
`api_key`, `aws_secret_access_key`, `hf_token`, `*password*`, `passphrase`, Azure's `connection_string`), a URL
with credentials in its user part (`s3://user:pw@bucket/x`, `http://user:pw@mlflow:5000`, a bare token as in
`https://TOKEN@host/repo`), a `key=value` parameter of a connection string or query (`AccountKey=...;`,
`?sig=...`), or a secret environment variable interpolated into any string (`${AWS_SECRET_ACCESS_KEY}`).
`redact(tree)` replaces the first kind and passes every string to `redact_text(line)`, which masks the other
three in free text (plans, progress lines). Workers still receive the unredacted config: only what is shown or
stored for people goes through here.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

MASK = "***"

# Words (of a key split at `_`, `-`, `.` and camelCase) that make a key secret on their own.
_SECRET_WORDS = ("secret", "password", "passwd", "passphrase", "credential", "authorization", "signature")
# Word pairs that name a secret together: Azure's `connection_string` / `AZURE_STORAGE_CONNECTION_STRING` hold the
# account key.
_SECRET_PAIRS = {("connection", "string"), ("conn", "str"), ("sas", "url")}
# `<word>_key` is secret for these words (api_key, access_key, aws_secret_access_key, private_key); a bare
# `key`/`keep`/`keys` field is not.
_KEY_QUALIFIERS = {"api", "access", "secret", "private", "session", "auth", "account", "signing", "encryption"}
# s3fs names its credentials `key`, `secret`, `token`: inside a filesystem options mapping a bare `key` is one.
_FS_OPTION_SECTIONS = ("storage_options", "client_kwargs")
# `user:password@` of a URL; the scheme is optional because error messages quote URLs without it (s3fs's
# "invalid bucket name 'user:pw@bucket'").
_URL_CREDENTIALS = re.compile(r"(?P<user>[^/\s:@'\"]+):(?P<password>[^/\s@'\"]+)@")
# A user part without a password right after a scheme (`https://TOKEN@host`): git hosts and package indexes
# take a bare token there, so the whole user part goes. Without the scheme an `a@b` is an e-mail address.
_URL_TOKEN = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<token>[^/\s:@'\"]+)@")
# `name=value` parameters of connection strings (`;AccountKey=...`), URL queries (`?sig=...&`) and command lines
# (`checkpoint.storage_options.secret=...`).
_PARAMETER = re.compile(r"(?P<lead>(?:^|[;?&\s])\s*)(?P<name>[A-Za-z][\w.-]*)=(?P<value>[^;&\s'\"]+)")
# Query parameters that carry a signature or token under a short name (Azure SAS `sig`, GCS/S3 presigned URLs).
_SECRET_PARAMETERS = {"sig", "x-goog-signature", "x-amz-signature", "x-amz-security-token"}
# Shell variables that hold the working directory, not a credential (`PWD` would otherwise read as a password
# and mask every path under the current directory).
_NOT_SECRET_ENV = {"PWD", "OLDPWD"}
# Environment values shorter than this are not masked in free text (too likely to occur by chance).
_MIN_ENV_SECRET_CHARS = 8


def is_secret_key(name: str, parent: str = "") -> bool:
    """True for keys that name a credential: *secret*, *password*, *token (word), api_key, access_key, ..."""
    words = [w for w in re.split(r"[_\-.\s]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()) if w]
    if any(s in w for w in words for s in _SECRET_WORDS) or "pwd" in words or "token" in words:
        return True
    if any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words)):
        return True
    if any(w in ("apikey", "accesskey", "privatekey", "authtoken", "apitoken") for w in words):
        return True
    if any(w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words)):
        return True
    return words == ["key"] and parent.lower().endswith(_FS_OPTION_SECTIONS)


def environ_snapshot(attempts: int = 20) -> dict[str, str]:
    """A copy of os.environ that tolerates other threads changing it: iterating os.environ while a thread unsets a
    variable raises KeyError (MLflow's telemetry thread does so in Ray workers), so copy again until one is clean."""
    for _ in range(attempts - 1):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def _secret_env_values() -> list[str]:
    env = environ_snapshot()
    values = {v for k, v in env.items()
              if k not in _NOT_SECRET_ENV and is_secret_key(k) and len(v) >= _MIN_ENV_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is masked whole


def redact_text(text: str) -> str:
    """`text` with URL credentials, secret `name=value` parameters and secret environment values replaced by ***."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['user']}:{MASK}@", text)
    text = _URL_TOKEN.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _PARAMETER.sub(_mask_parameter, text)
    for value in _secret_env_values():
        text = text.replace(value, MASK)
    return text


def _mask_parameter(match: re.Match) -> str:
    name = match["name"]
    if name.lower() in _SECRET_PARAMETERS or is_secret_key(name):
        return f"{match['lead']}{name}={MASK}"
    return match[0]


def redact(data: Any, parent: str = "") -> Any:
    """A copy of a nested dict/list config tree with secret-keyed values masked and strings passed to redact_text."""
    if isinstance(data, dict):
        return {
            k: (MASK if is_secret_key(str(k), parent) and v not in (None, "", {}) else redact(v, str(k)))
            for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact(v, parent) for v in data]
    if isinstance(data, str):
        return redact_text(data)
    return data
