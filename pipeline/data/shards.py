"""WebDataset shard writer: a CSV/JSONL list of videos (with captions or labels) -> `<name>-NNNNNN.tar` + manifest.

Each sample is `<key>.mp4` (H.264, optionally transcoded) and `<key>.json`
(`{"caption", "video_id", "duration", "source", "width", "height", "fps", "num_frames"}`, plus `label` (class
index) and `label_name` for a list with a `label` column; such a list may leave the caption out). Labelled shard
sets carry their class-index file, `classes.txt` (`pipeline.data.labels`).

Guarantees:
- keys come from the video reference (`keys.make_key`), and shard k holds input rows
  [k*shard_size, (k+1)*shard_size): the same list always gives the same shards, so resume is exact;
- a shard appears only complete: it is written to a temp file and renamed (local) or uploaded under
  its final name in one PUT (object stores);
- rerunning skips shards the manifest lists or that already exist, and refuses a changed input list;
- unreadable inputs are skipped and listed with the reason in the manifest.
"""

from __future__ import annotations

import concurrent.futures
import csv
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import Any

import fsspec
import webdataset as wds
from tqdm import tqdm

from pipeline.data import labels
from pipeline.data.decode import VideoDecodeError, probe_video
from pipeline.data.encode import TranscodeOptions, transcode_h264
from pipeline.data.keys import make_key
from pipeline.data.manifest import FORMAT, iter_shard, read_manifest, write_manifest
from pipeline.data.urls import join_url, split_protocol
from pipeline.writes import disk_full_named

log = logging.getLogger(__name__)

_MP4_FAMILY = "mov,mp4,m4a,3gp,3g2,mj2"


@dataclass(frozen=True)
class InputRow:
    video: str
    """The video reference as written in the list (the key is derived from it)."""
    path: str
    """Where to read it: the reference resolved against the list's folder."""
    caption: str | list[str] | None
    """None only in a labelled list without captions."""
    video_id: str
    key: str
    label: int | None = None
    """Class index (labelled lists only)."""
    label_name: str | None = None


@dataclass
class ShardResult:
    name: str
    num_samples: int
    duration_s: float
    skipped: list[dict[str, str]] = field(default_factory=list)


def _parse_caption(value: Any, where: str) -> str | list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json.loads(value)  # CSV cells may hold a JSON list of captions
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return value
    raise ValueError(f"{where}: caption must be a non-empty string or list of strings, got {value!r}")


def read_input_list(list_url: str, class_names: list[str] | None = None
                    ) -> tuple[list[InputRow], str, list[str] | None]:
    """Rows of a CSV (header `video,caption[,video_id]` or `video,label[,caption,video_id]`) or JSONL list, the
    list's sha256, and its classes (`class_names` if given, else derived; None for a list without labels).

    Relative video paths resolve against the list's folder. Raises ValueError naming the bad row.
    """
    with fsspec.open(list_url, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    if list_url.endswith((".jsonl", ".json")):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif list_url.endswith((".csv", ".tsv")):
        records = list(csv.DictReader(io.StringIO(text), delimiter="\t" if list_url.endswith(".tsv") else ","))
    else:
        raise ValueError(f"input list {list_url!r}: use a .csv/.tsv (header video,caption) or .jsonl file")
    base = posixpath.dirname(list_url)
    labelled = any(isinstance(r, dict) and r.get("label") not in (None, "") for r in records)
    if class_names is not None and not labelled:
        raise ValueError(f"input list {list_url!r}: a class-index file was given but the list has no 'label' column")
    if labelled and class_names is None:
        class_names = labels.derive_class_names([r.get("label") for r in records if isinstance(r, dict)])
    rows = []
    for number, record in enumerate(records, start=1):
        where = f"{list_url} row {number}"
        if not isinstance(record, dict) or not record.get("video"):
            raise ValueError(f"{where}: every row needs a 'video' field, got {record!r}")
        video = str(record["video"])
        path = video if ("://" in video or os.path.isabs(video)) else join_url(base, video)
        label = label_name = None
        if labelled:
            if record.get("label") in (None, ""):
                raise ValueError(f"{where}: the list has a 'label' column, but this row has no label")
            label, label_name = labels.resolve_label(record["label"], class_names, where)
        caption = record.get("caption")
        rows.append(
            InputRow(
                video=video,
                path=path,
                caption=None if labelled and caption in (None, "") else _parse_caption(caption, where),
                video_id=str(record.get("video_id") or posixpath.basename(video)),
                key=make_key(video),
                label=label,
                label_name=label_name,
            )
        )
    return rows, hashlib.sha256(raw).hexdigest(), class_names if labelled else None


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _encode_sample(row: InputRow, transcode: TranscodeOptions | None) -> dict[str, Any]:
    with fsspec.open(row.path, "rb") as f:
        data = f.read()
    if transcode is not None:
        data = transcode_h264(data, transcode)
    info = probe_video(data)
    if info.container != _MP4_FAMILY:
        raise VideoDecodeError(f"container is {info.container!r}, not mp4; rerun with --transcode")
    meta = {
        **({"caption": row.caption} if row.caption is not None else {}),
        **({"label": row.label, "label_name": row.label_name} if row.label is not None else {}),
        "video_id": row.video_id,
        "duration": round(info.duration_s, 4),
        "source": row.video,
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 4),
        "num_frames": info.num_frames,
    }
    return {"__key__": row.key, "mp4": data, "json": json.dumps(meta).encode("utf-8")}


def write_shard(output: str, name: str, rows: list[InputRow], transcode: TranscodeOptions | None) -> ShardResult:
    """Write one shard from its rows; unreadable videos are skipped and reported in the result."""
    result = ShardResult(name=name, num_samples=0, duration_s=0.0)
    protocol, final_path = split_protocol(join_url(output, name))
    local_dir = os.path.dirname(final_path) if protocol == "file" else None
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{name}.", suffix=".tmp")
    room = "--output" if protocol == "file" else "TMPDIR (shards are staged there before the upload)"
    try:
        with disk_full_named(tmp, "shard", room), os.fdopen(fd, "wb") as f, wds.TarWriter(f) as tar:
            for row in rows:
                try:
                    sample = _encode_sample(row, transcode)
                except (VideoDecodeError, OSError) as err:
                    log.warning("skipping %s: %s", row.video, err)
                    result.skipped.append({"video": row.video, "reason": str(err)})
                    continue
                tar.write(sample)
                result.num_samples += 1
                result.duration_s += json.loads(sample["json"])["duration"]
        if protocol == "file":
            os.replace(tmp, final_path)  # atomic: readers never see a partial shard
        else:
            fsspec.filesystem(protocol).put_file(tmp, final_path)  # one object, visible only when complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def _recover_result(output: str, name: str, rows: list[InputRow]) -> ShardResult:
    """Rebuild a shard's record from the shard itself (it was committed but the manifest update was lost)."""
    result = ShardResult(name=name, num_samples=0, duration_s=0.0)
    keys = set()
    for sample in iter_shard(join_url(output, name)):
        keys.add(sample["__key__"])
        result.num_samples += 1
        result.duration_s += json.loads(sample["json"])["duration"]
    result.skipped = [
        {"video": r.video, "reason": "skipped in an interrupted run (reason not recorded)"}
        for r in rows
        if r.key not in keys
    ]
    return result


def _remove_stale_temps(output: str) -> None:
    protocol, path = split_protocol(output)
    if protocol == "file":
        for tmp in glob.glob(os.path.join(path, ".*.tmp")):
            os.unlink(tmp)


def _plan(rows: list[InputRow], shard_size: int) -> tuple[list[list[InputRow]], list[dict[str, str]]]:
    """Drop later duplicates of a key, then shard k = unique rows [k*size, (k+1)*size)."""
    first_row: dict[str, int] = {}
    unique, duplicates = [], []
    for number, row in enumerate(rows, start=1):
        if row.key in first_row:
            duplicates.append({"video": row.video, "reason": f"duplicate of row {first_row[row.key]}"})
        else:
            first_row[row.key] = number
            unique.append(row)
    return [unique[i : i + shard_size] for i in range(0, len(unique), shard_size)], duplicates


def _manifest(state: dict[str, Any], results: dict[int, ShardResult], complete: bool) -> dict[str, Any]:
    done = [results[i] for i in sorted(results)]
    skipped = list(state["duplicates"]) + [s for r in done for s in r.skipped]
    return {
        **{k: v for k, v in state.items() if k != "duplicates"},
        "complete": complete,
        "num_samples": sum(r.num_samples for r in done),
        "total_duration_s": round(sum(r.duration_s for r in done), 3),
        "shards": [
            {"name": r.name, "num_samples": r.num_samples, "duration_s": round(r.duration_s, 3), "skipped": r.skipped}
            for r in done
        ],
        "skipped": skipped,
    }


def make_shards(
    input_list: str,
    output: str,
    shard_size: int = 100,
    transcode: TranscodeOptions | None = None,
    workers: int = 1,
    prefix: str | None = None,
    progress: bool = True,
    class_index: str | None = None,
) -> dict[str, Any]:
    """Write (or resume writing) the shard set for `input_list` into `output`; returns the manifest.

    A labelled list (a `label` column) gets its class-index file written as `<output>/classes.txt`: `class_index`
    (a file, see `pipeline.data.labels`) when given, else the classes derived from the list.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    class_names = labels.read_class_index(class_index) if class_index is not None else None
    rows, sha, class_names = read_input_list(input_list, class_names)
    if not rows:
        raise ValueError(f"input list {input_list!r} has no rows")
    prefix = prefix or posixpath.basename(output.rstrip("/")) or "shard"
    plan, duplicates = _plan(rows, shard_size)
    options: dict[str, Any] = {"transcode": transcode.manifest_entry() if transcode else None, "prefix": prefix}
    if class_names is not None:  # only labelled sets record it, so unlabelled shard sets resume as before
        options["classes_sha256"] = hashlib.sha256("\n".join(class_names).encode("utf-8")).hexdigest()
    state = {
        "format": FORMAT,
        "shard_size": shard_size,
        "source": input_list,
        "source_sha256": sha,
        "options": options,
        "num_shards": len(plan),
        "duplicates": duplicates,
        **({"num_classes": len(class_names)} if class_names is not None else {}),
    }
    fsspec.filesystem(split_protocol(output)[0]).makedirs(split_protocol(output)[1], exist_ok=True)
    if class_names is not None:
        labels.write_class_index(join_url(output, labels.CLASS_INDEX_FILE), class_names)
    _remove_stale_temps(output)
    results = _resume(output, state, plan, prefix)
    todo = [i for i in range(len(plan)) if i not in results]
    bar = tqdm(total=len(plan), initial=len(results), unit="shard", disable=not progress, desc=prefix)
    with _executor(workers) as pool:
        futures = {pool.submit(write_shard, output, shard_name(prefix, i), plan[i], transcode): i for i in todo}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            write_manifest(output, _manifest(state, results, complete=False))
            bar.update(1)
            bar.set_postfix(samples=sum(r.num_samples for r in results.values()))
    bar.close()
    manifest = _manifest(state, results, complete=True)
    write_manifest(output, manifest)
    return manifest


def _resume(output: str, state: dict[str, Any], plan: list[list[InputRow]], prefix: str) -> dict[int, ShardResult]:
    """Shards finished by an earlier run with the same list and options."""
    previous = read_manifest(output)
    results: dict[int, ShardResult] = {}
    if previous is not None:
        for key in ("source_sha256", "shard_size", "options"):
            if previous.get(key) != state[key]:
                raise ValueError(
                    f"{output} holds shards written with a different {key} ({previous.get(key)!r} vs "
                    f"{state[key]!r}); write to a new output location or delete the old shards"
                )
        listed = {s["name"]: s for s in previous["shards"]}
    else:
        listed = {}
    fs, root = fsspec.core.url_to_fs(output)
    for index, rows in enumerate(plan):
        name = shard_name(prefix, index)
        if name in listed:
            entry = listed[name]
            results[index] = ShardResult(name, entry["num_samples"], entry["duration_s"], entry["skipped"])
        elif fs.exists(posixpath.join(root, name)):
            results[index] = _recover_result(output, name, rows)
    return results


class _InlineExecutor(concurrent.futures.Executor):
    """Runs submissions immediately in this process (workers=1: no process start-up, easy debugging)."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _executor(workers: int) -> concurrent.futures.Executor:
    if workers <= 1:
        return _InlineExecutor()
    # spawn: forked children would inherit s3fs's event loop and threads from the parent.
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
