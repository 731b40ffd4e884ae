"""Shard set health check: samples per shard, optional full decode of every mp4, duration statistics."""

from __future__ import annotations

import json
import statistics
from typing import Any

from tqdm import tqdm

from pipeline.data.decode import decode_clip, probe_video
from pipeline.data.manifest import iter_shard
from pipeline.data.urls import expand_shard_urls, register_fsspec_openers


def _check_sample(sample: dict[str, Any], decode: bool) -> tuple[float | None, str | None]:
    """(duration, None) for a good sample, (None, reason) for a bad one."""
    if "mp4" not in sample or "json" not in sample:
        return None, f"missing member(s): has {sorted(k for k in sample if not k.startswith('__'))}"
    try:
        meta = json.loads(sample["json"])
        duration = float(meta["duration"])
        if decode:
            # Full decode: every frame must come out, not just the headers.
            info = probe_video(sample["mp4"])
            decode_clip(sample["mp4"], info.num_frames, "middle")
    except (KeyError, ValueError, TypeError) as err:
        return None, repr(err)
    return duration, None


def inspect_shards(spec: str | list[str], decode: bool = False, progress: bool = False) -> dict[str, Any]:
    """Report on a shard set: per-shard counts, bad samples with reasons, duration stats."""
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
        except (OSError, ValueError) as err:  # unreadable or truncated tar
            bad.append({"shard": url, "key": None, "reason": f"shard unreadable after {count} samples: {err!r}"})
        shards.append({"url": url, "num_samples": count})
    total = sum(s["num_samples"] for s in shards)
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
    }
