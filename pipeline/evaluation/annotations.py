"""Retrieval annotations in UMT's JSON layout: a list of `{"video": path, "caption": str | [str]}`.

`load_annotations` turns the file into the index maps the metrics need:
- one-caption mode (MSR-VTT 1k-A): each caption is a separate text query whose answer is its video;
- paragraph mode (DiDeMo, ActivityNet): a video's captions are joined with spaces into one query.
Entries naming the same video are merged into one video (their captions concatenated in file order), so
identical videos never compete with each other in the ranking. With `clean`, every query (a caption, or a
joined paragraph) goes through UMT's caption cleaning (`pipeline.data.captions.clean_caption`), as the
released evaluation does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.data.captions import clean_caption


@dataclass(frozen=True)
class RetrievalAnnotations:
    videos: list[str]
    """Video paths relative to the data root (or shard lookup names), one per distinct video."""
    texts: list[str]
    """Text queries (captions, or joined paragraphs)."""
    txt2vid: list[int]
    """txt2vid[i]: index into `videos` of the answer to text i."""
    vid2txt: list[list[int]]
    """vid2txt[j]: indices into `texts` of every correct text of video j."""
    sha256: str
    """Digest of the annotation file's bytes (part of the feature-cache key)."""
    missing: list[str] = field(default_factory=list)
    """Videos dropped because their files were absent (only with skip_missing)."""


def load_annotations(path: str | Path, paragraph: bool, clean: bool = False) -> RetrievalAnnotations:
    """Read a UMT-layout annotation JSON; `paragraph` joins each video's captions into one query; `clean`
    cleans every query as UMT does (after joining, as released)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {str(path)!r} does not exist; set data.annotation to a UMT-layout JSON "
            "(see docs/evaluation.md for where to get msrvtt_ret_test1k.json, didemo_ret_test.json, anet_ret_val.json)"
        )
    raw = path.read_bytes()
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f'{path}: expected a non-empty JSON list of {{"video": ..., "caption": ...}} objects')

    captions_by_video: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        video, captions = _parse_entry(entry, f"{path}[{i}]")
        captions_by_video.setdefault(video, []).extend(captions)

    videos, texts, txt2vid, vid2txt = [], [], [], []
    for j, (video, captions) in enumerate(captions_by_video.items()):
        queries = [" ".join(captions)] if paragraph else captions
        queries = [clean_caption(q) for q in queries] if clean else queries
        videos.append(video)
        vid2txt.append(list(range(len(texts), len(texts) + len(queries))))
        texts.extend(queries)
        txt2vid.extend([j] * len(queries))
    return RetrievalAnnotations(videos, texts, txt2vid, vid2txt, hashlib.sha256(raw).hexdigest())


def _parse_entry(entry: object, where: str) -> tuple[str, list[str]]:
    if not isinstance(entry, dict) or "video" not in entry or "caption" not in entry:
        raise ValueError(f'{where}: each entry must be an object with "video" and "caption" keys, got {entry!r}')
    video, caption = entry["video"], entry["caption"]
    if not isinstance(video, str) or not video:
        raise ValueError(f'{where}: "video" must be a non-empty string (a path under the data root), got {video!r}')
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f'{where}: "caption" must be a string or a non-empty list of strings, got {caption!r}')
    return video, [c.strip() for c in captions]


def drop_missing(
    anno: RetrievalAnnotations, exists: Callable[[str], bool], skip_missing: bool, source: str
) -> RetrievalAnnotations:
    """Keep the videos `exists` finds; without skip_missing any absence is an error listing the files.

    `source` names where videos were looked for (the data root or shard spec) for the error message.
    """
    missing = [v for v in anno.videos if not exists(v)]
    if not missing:
        return anno
    if not skip_missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(anno.videos)} videos in the annotation are not in {source}:\n  {shown}\n"
            "Fix data.root / data.shards, or set data.skip_missing=true to evaluate without them "
            "(the report then counts the skipped videos and the numbers are not comparable to published ones)."
        )
    if len(missing) == len(anno.videos):
        raise FileNotFoundError(f"none of the {len(anno.videos)} annotated videos is in {source}; check data.root")
    absent = set(missing)
    videos, texts, txt2vid, vid2txt = [], [], [], []
    for video, text_ids in zip(anno.videos, anno.vid2txt, strict=True):
        if video in absent:
            continue
        vid2txt.append(list(range(len(texts), len(texts) + len(text_ids))))
        texts.extend(anno.texts[i] for i in text_ids)
        txt2vid.extend([len(videos)] * len(text_ids))
        videos.append(video)
    return replace(anno, videos=videos, texts=texts, txt2vid=txt2vid, vid2txt=vid2txt, missing=missing)
