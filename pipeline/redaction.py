"""Keep credentials out of MLflow params, logged config artifacts and printed logs.

A config may carry secrets three ways: a value under a secret-looking key (`storage_options.secret`,
`api_key`, `aws_secret_access_key`, `hf_token`, `*password*`), a URL with `user:password@` in it
(`s3://user:pw@bucket/x`, `http://user:pw@mlflow:5000`), or a secret environment variable interpolated into any
string (`${AWS_SECRET_ACCESS_KEY}`). `redact(tree)` replaces the first kind, strips the password of the second and
masks the values of secret-named environment variables wherever they appear; `redact_text(line)` does the last two
for free text (plans, progress lines). Workers still receive the unredacted config: only what is shown or stored
for people goes through here.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"

# Words (of a key split at `_`, `-`, `.`) that make a key secret on their own.
_SECRET_WORDS = ("secret", "password", "passwd", "credential", "authorization")
# `<word>_key` is secret for these words (api_key, access_key, aws_secret_access_key, private_key); a bare
# `key`/`keep`/`keys` field is not.
_KEY_QUALIFIERS = {"api", "access", "secret", "private", "session", "auth", "account", "signing", "encryption"}
# s3fs names its credentials `key`, `secret`, `token`: inside a filesystem options mapping a bare `key` is one.
_FS_OPTION_SECTIONS = ("storage_options", "client_kwargs")
# `user:password@` of a URL; the scheme is optional because error messages quote URLs without it (s3fs's
# "invalid bucket name 'user:pw@bucket'").
_URL_CREDENTIALS = re.compile(r"(?P<user>[^/\s:@'\"]+):(?P<password>[^/\s@'\"]+)@")
# Environment values shorter than this are not masked in free text (too likely to occur by chance).
_MIN_ENV_SECRET_CHARS = 8


def is_secret_key(name: str, parent: str = "") -> bool:
    """True for keys that name a credential: *secret*, *password*, *token (word), api_key, access_key, ..."""
    words = [w for w in re.split(r"[_\-.\s]+", name.lower()) if w]
    if any(s in w for w in words for s in _SECRET_WORDS) or "pwd" in words or "token" in words:
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
    values = {v for k, v in env.items() if is_secret_key(k) and len(v) >= _MIN_ENV_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is masked whole


def redact_text(text: str) -> str:
    """`text` with URL passwords replaced by *** and secret environment variable values masked."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['user']}:{MASK}@", text)
    for value in _secret_env_values():
        text = text.replace(value, MASK)
    return text


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
