"""Checks a training job runs on the driver before any worker starts: the weights and shards the config names exist.

Without them a typo in `model.pretrained`, a teacher whose weights are not in the offline Hugging Face cache, or a
shard pattern one digit off passed the dry run and failed minutes later in every worker (or, for shards, only
warned while the stream resampled the rest). Found problems raise `ConfigError` naming the key and the value.

Weights: `model.pretrained` and every task field named `pretrained` or `*_checkpoint` (the convention the task
configs follow) must be a local file, since the loaders read them with `torch.load` on every node. A `pretrained`
beside an open_clip model name (`model_name` / `name`) may instead be one of open_clip's tags for that model; with
`HF_HUB_OFFLINE` set its weights must already be in the local Hugging Face cache (looked up the way open_clip will
load them, without downloading). Online, the tag is left to open_clip.

Shards: `data.train_shards` / `data.eval_shards` are expanded and every `.tar` they name is looked up in one
listing per directory (local folders and fsspec URLs alike; for s3 a LIST per prefix, not a request per shard;
http(s) URLs have no listing and are not checked).
Storage this machine cannot read (no credentials here, access denied) is reported in the plan instead of failing:
a dry run on a laptop may lack the cluster's credentials.

Buckets: the bucket of an s3:// `checkpoint.path` and `tracking.artifact_location` must exist (one HEAD request
each). s3fs creates a missing bucket on its first directory write and Ray's fsspec storage does too, so a typo in
the bucket name made a new bucket with the credentials' default region and no policy. The pipeline never creates
buckets; `check_storage` also runs at every launch (recipe stages included). Storage not readable from here is
noted, as for shards.

Task files: a task config may define `preflight() -> list[str]` for files only its task reads (the classification
task's `task.class_index`).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.data.urls import expand_shard_urls, filesystem, split_protocol
from pipeline.redaction import redact_text

_OPEN_CLIP_NAME_FIELDS = ("model_name", "name")
_UNLISTABLE = ("http", "https")
_BUCKET_SCHEMES = ("s3", "s3a")


def weight_references(cfg: Config) -> list[tuple[str, str, str | None]]:
    """(key, value, open_clip model name or None) of every weight reference the config sets."""
    refs = [("model.pretrained", cfg.model.pretrained, None)] if cfg.model.pretrained else []
    return refs + _section_references(cfg.task, "task")


def _section_references(section: Any, prefix: str) -> list[tuple[str, str, str | None]]:
    refs: list[tuple[str, str, str | None]] = []
    clip_name = next((getattr(section, f) for f in _OPEN_CLIP_NAME_FIELDS if hasattr(section, f)), None)
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            refs += _section_references(value, key)
        elif isinstance(value, str) and value and (f.name == "pretrained" or f.name.endswith("_checkpoint")):
            refs.append((key, value, clip_name if f.name == "pretrained" else None))
    return refs


def check_weights(cfg: Config) -> list[str]:
    """Raise ConfigError for a weight reference that cannot load here; one plan note per reference."""
    return [_check_weight(key, value, clip_name) for key, value, clip_name in weight_references(cfg)]


def _check_weight(key: str, value: str, clip_name: str | None) -> str:
    if os.path.isfile(value):
        return f"{key}: {value} (file)"
    if clip_name is not None:
        import open_clip

        if value in open_clip.list_pretrained_tags_by_model(clip_name):
            return f"{key}: {_check_cached_tag(key, clip_name, value, open_clip)}"
    where = "a local file on every node (weights are read with torch.load; copy or mount it)"
    if "://" in value:
        raise ConfigError(f"{key}: {redact_text(value)!r} is a URL; it must be {where}")
    tags = f" or one of open_clip's tags for {clip_name}" if clip_name else ""
    raise ConfigError(f"{key}: {value!r} does not exist on this machine; it must be {where}{tags}")


def _check_cached_tag(key: str, clip_name: str, tag: str, open_clip) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("", "0", "false", "no"):
        return f"open_clip {clip_name}/{tag} (from the Hugging Face hub or its cache)"
    pretrained_cfg = open_clip.get_pretrained_cfg(clip_name, tag)
    try:  # offline, open_clip's own lookup only reads the cache
        path = open_clip.pretrained.download_pretrained(pretrained_cfg)
    except Exception as err:  # huggingface_hub raises several kinds; the message below says what to do
        hub = pretrained_cfg.get("hf_hub", "").rstrip("/")
        raise ConfigError(
            f"{key}: open_clip weights {clip_name}/{tag!r} are not in the local Hugging Face cache and HF_HUB_OFFLINE "
            f"is set ({type(err).__name__}); download them where there is internet (`huggingface-cli download {hub}`) "
            "and copy ~/.cache/huggingface to every node (or set HF_HOME to a shared copy), or give a local "
            "checkpoint file"
        ) from None
    return f"open_clip {clip_name}/{tag} ({path})"


def missing_shards(urls: list[str]) -> list[str]:
    """The URLs that one listing of each directory does not show; OSError when a directory cannot be listed."""
    missing = []
    by_directory: dict[str, list[str]] = {}
    for url in urls:
        by_directory.setdefault(posixpath.dirname(url), []).append(url)
    for directory, members in by_directory.items():
        try:
            listed = {posixpath.basename(p) for p in filesystem(directory).ls(split_protocol(directory)[1],
                                                                              detail=False)}
        except FileNotFoundError:
            listed = set()
        missing += [url for url in members if posixpath.basename(url) not in listed]
    return missing


def check_shards(key: str, spec: str | list[str] | None) -> str:
    """Raise ConfigError when `spec` matches nothing or names shards that are absent; one plan note otherwise."""
    if not spec:
        return f"{key}: -"
    shown = redact_text(str(spec))
    try:
        urls = expand_shard_urls(spec)
        if any(split_protocol(u)[0] in _UNLISTABLE for u in urls):
            return f"{key}: not checked, {shown} names http(s) URLs, which cannot be listed"
        missing = missing_shards(urls)
    except ValueError as err:  # nothing matched a directory / prefix
        raise ConfigError(f"{key}: {redact_text(str(err))}") from None
    except Exception as err:  # no credentials here (botocore's NoCredentialsError is no OSError), access denied,
        # an unreachable endpoint: the workers may well have what this machine lacks, so note it and plan on
        return f"{key}: not checked, {shown} is not readable from here ({type(err).__name__}: {redact_text(str(err))})"
    if missing:
        examples = ", ".join(redact_text(u) for u in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConfigError(f"{key}: {len(missing)} of the {len(urls)} shards {shown} names do not exist: {examples}")
    return f"{key}: {len(urls)} shards found"


def check_bucket(key: str, url: str | None, storage_options: dict[str, Any] | None = None) -> str | None:
    """Raise ConfigError when the bucket of the s3:// URL `url` does not exist; a plan note otherwise (None when
    `url` is not on s3)."""
    if not url or split_protocol(url)[0] not in _BUCKET_SCHEMES:
        return None
    import fsspec

    bucket = split_protocol(url)[1].split("/", 1)[0].rsplit("@", 1)[-1]  # s3://key:secret@bucket/... is allowed
    try:
        fsspec.core.url_to_fs(url, **(storage_options or {}))[0].call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise ConfigError(
            f"{key}: the bucket {bucket!r} of {redact_text(url)} does not exist; fix the name or create the bucket "
            "(with the region and policies it needs): the pipeline never creates buckets"
        ) from None
    except Exception as err:  # no credentials here, access denied, endpoint unreachable: as for shards, plan on
        return f"{key}: bucket {bucket} not checked, not readable from here ({type(err).__name__}: " \
               f"{redact_text(str(err))})"
    return f"{key}: bucket {bucket} exists"


def check_storage(cfg: Config) -> list[str]:
    """`check_bucket` for the checkpoint path and the MLflow artifact location, and where a new experiment's
    artifacts go (ConfigError for a database store without `tracking.artifact_location`); their plan notes."""
    from pipeline.tracking import tracking_uri
    from pipeline.tracking_artifacts import experiment_artifact_location

    notes = [check_bucket("checkpoint.path", cfg.checkpoint.path, cfg.checkpoint.storage_options)]
    if cfg.tracking.enabled:
        tracking = cfg.tracking
        location = experiment_artifact_location(tracking_uri(cfg), tracking.artifact_location, tracking.experiment)
        notes += [check_bucket("tracking.artifact_location", tracking.artifact_location),
                  f"tracking: a new experiment {tracking.experiment!r} keeps artifacts in "
                  f"{redact_text(location) if location else 'the place its file store or server chooses'}"]
    return [note for note in notes if note is not None]


def preflight(cfg: Config) -> list[str]:
    """Every check above, then the task config's own `preflight()` when it has one (the files only that task reads,
    e.g. the classification class-index file); the plan's notes when all pass."""
    notes = check_weights(cfg) + check_storage(cfg)
    notes += [check_shards(f"data.{split}_shards", getattr(cfg.data, f"{split}_shards")) for split in ("train", "eval")]
    task_checks = getattr(cfg.task, "preflight", None)
    if callable(task_checks):
        notes += task_checks()
    return notes
