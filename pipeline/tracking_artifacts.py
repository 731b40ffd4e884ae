"""Where MLflow keeps a run's artifacts: with the tracking store, or under `tracking.artifact_location`.

MLflow gives an experiment created without an artifact location its store's default root. For a database store
(sqlite included) opened by a client, that root is `./mlruns` of the creating process's working directory: rank 0's
cwd, or a Ray job's unpacked working dir in the Ray session folder (temporary, on one node). The runs' `config.yaml`
artifacts were gone afterwards, or on another node. So the pipeline creates every experiment with an explicit
location, `experiment_artifact_location`:

- `tracking.artifact_location` when set (a folder, made absolute on the driver, or `s3://bucket/prefix`):
  `<artifact_location>/<experiment>`;
- else beside a sqlite store: `<folder of the .db>/mlartifacts/<experiment>`;
- a file store (`file:` or a path) already keeps artifacts inside itself, and a tracking server (http/https)
  chooses its own root (`--default-artifact-root` / `--artifacts-destination`): nothing is passed;
- any other database (postgresql, mysql, ...) has no folder to sit beside: ConfigError asking for
  `tracking.artifact_location`.

An experiment keeps the location it was created with (MLflow cannot move it): `warn_if_elsewhere` prints a warning
naming the experiment's location when it differs, e.g. for an experiment created by an older version in a ./mlruns.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.redaction import redact_text

ARTIFACTS_BESIDE_SQLITE = "mlartifacts"
_SQLITE = "sqlite:///"
_SERVER_SCHEMES = ("http", "https", "databricks")


def _scheme(uri: str) -> str:
    """"sqlite", "file", "http", "postgresql+psycopg2", ...; "file" for a plain path."""
    head, colon, _ = uri.partition(":")
    return head.lower() if colon and "/" not in head else "file"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative paths as written), None for other URIs and in-memory."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri[len(_SQLITE):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def absolute_tracking_uri(uri: str) -> str:
    """`uri` with a relative sqlite or file-store path made absolute (Ray workers do not share the driver's cwd)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"{_SQLITE}{db.resolve()}"
    if _scheme(uri) == "file" and not uri.startswith("file:"):
        return str(Path(uri).resolve())
    return uri


def absolute_artifact_root(root: str | None) -> str | None:
    """`tracking.artifact_location` with a local folder made absolute; URLs as given."""
    if root is None or "://" in root:
        return root
    return str(Path(root).expanduser().resolve())


def experiment_artifact_location(uri: str, root: str | None, experiment: str) -> str | None:
    """Where a new experiment `experiment` of the store `uri` keeps its runs' artifacts; None = MLflow's own
    choice, which is right for file stores and tracking servers. ConfigError for a database with no root."""
    if root:
        base = absolute_artifact_root(root)
    elif (db := sqlite_path(uri)) is not None:
        base = str(db.resolve().parent / ARTIFACTS_BESIDE_SQLITE)
    elif _scheme(uri) in ("file", "sqlite", *_SERVER_SCHEMES):  # sqlite here: in memory, nothing outlives it
        return None
    else:
        raise ConfigError(
            f"tracking.uri {redact_text(uri)!r} is a database with no folder for artifacts: MLflow would write "
            "them to ./mlruns of whichever process creates the experiment. Set tracking.artifact_location to a "
            "folder every node sees or to s3://bucket/prefix (or log through an MLflow server, which keeps them)"
        )
    return base.rstrip("/") + "/" + experiment if "://" in base else posixpath.join(base, experiment)


def _same_location(a: str, b: str) -> bool:
    def norm(location: str) -> str:
        return location.removeprefix("file://").rstrip("/")

    return norm(a) == norm(b)


def warn_if_elsewhere(experiment: str, uri: str, actual: str, wanted: str | None) -> None:
    """Print a warning when the existing `experiment` keeps its artifacts somewhere else than `wanted`."""
    if wanted is None or _same_location(actual, wanted):
        return
    lost = " (a Ray session folder: temporary, on one node)" if "/ray/session_" in actual else ""
    print(
        f"[tracking] warning: experiment {experiment!r} of {redact_text(uri)} keeps its artifacts in "
        f"{redact_text(actual)}{lost}, not in {redact_text(wanted)}: it was created elsewhere (older versions of "
        "this pipeline gave every experiment ./mlruns of the creating process's working directory). MLflow cannot "
        "move an experiment, so this run's artifacts go to the old place too; set a new tracking.experiment to "
        "keep them with the store.",
        flush=True,
    )
