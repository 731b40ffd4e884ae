"""Shard set health check: samples per shard, optional full decode of every mp4, duration statistics, and the
shards that hold no sample or that the manifest beside them does not list (or lists with another count)."""

from __future__ import annotations

import json
import math
import statistics
import tarfile
from typing import Any

from tqdm import tqdm

from pipeline.data.decode import decode_clip, probe_video
from pipeline.data.manifest import iter_shard, listed_sample_counts
from pipeline.data.urls import expand_shard_urls, register_fsspec_openers


def _check_sample(sample: dict[str, Any], decode: bool) -> tuple[float | None, str | None]:
    """(duration, None) for a good sample, (None, reason) for a bad one."""
    if "mp4" not in sample or "json" not in sample:
        return None, f"missing member(s): has {sorted(k for k in sample if not k.startswith('__'))}"
    try:
        meta = json.loads(sample["json"])
        duration = float(meta["duration"])
        if not math.isfinite(duration) or duration < 0:
            return None, f"duration {meta['duration']!r} is not a finite number of seconds >= 0"
        if decode:
            # Full decode: every frame must come out, not just the headers.
            info = probe_video(sample["mp4"])
            decode_clip(sample["mp4"], info.num_frames, "middle")
    except (KeyError, ValueError, TypeError, RecursionError) as err:  # RecursionError: JSON nested too deep
        return None, repr(err)
    return duration, None


def inspect_shards(spec: str | list[str], decode: bool = False, progress: bool = False) -> dict[str, Any]:
    """Report on a shard set: per-shard counts, bad samples with reasons, duration stats, empty shards, and the
    manifest's view of each shard (`not_in_manifest`, `manifest_mismatch`)."""
    register_fsspec_openers()
    urls = expand_shard_urls(spec)
    shards, bad, durations = [], [], []
    for url in tqdm(urls, unit="shard", disable=not progress):
        count = 0
        try:
            for sample in iter_shard(url):
                count += 1
                duration, reason = _check_sample(sample, decode)
                if reason is None:
                    durations.append(duration)
                else:
                    bad.append({"shard": url, "key": sample["__key__"], "reason": reason})
        except (OSError, ValueError, tarfile.TarError) as err:  # unreadable, truncated or corrupt tar
            bad.append({"shard": url, "key": None, "reason": f"shard unreadable after {count} samples: {err!r}"})
        shards.append({"url": url, "num_samples": count})
    total = sum(s["num_samples"] for s in shards)
    try:
        listed, manifest_error = listed_sample_counts(urls), None
    except OSError as err:  # an unreadable manifest is one more finding, not the end of the report
        listed, manifest_error = [], repr(err)
    unreadable = {b["shard"] for b in bad if b["key"] is None}
    return {
        "num_shards": len(urls),
        "num_samples": total,
        "num_bad": len(bad),
        "bad_fraction": len(bad) / total if total else 1.0,
        "decoded": decode,
        "duration_s": {
            "total": round(sum(durations), 3),
            "min": min(durations, default=0.0),
            "mean": round(statistics.fmean(durations), 3) if durations else 0.0,
            "max": max(durations, default=0.0),
        },
        "shards": shards,
        "bad": bad,
        "empty_shards": [s["url"] for s in shards if s["num_samples"] == 0 and s["url"] not in unreadable],
        "manifest_error": manifest_error,
        "not_in_manifest": [url for url, count in zip(urls, listed, strict=False) if count is None],
        "manifest_mismatch": [{"url": s["url"], "manifest": count, "read": s["num_samples"]}
                              for s, count in zip(shards, listed, strict=False)
                              if count is not None and count != s["num_samples"] and s["url"] not in unreadable],
    }
