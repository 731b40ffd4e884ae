"""Synthetic video-text demo data: coloured shapes moving over a plain background.

Every caption is fully determined by what is on screen (colour, shape, count, direction), so a
video-text model can learn the task and zero-shot retrieval on a held-out split measures whether the
whole pipeline works. Each clip is also labelled with its motion direction (4 classes, chance 25%), the
classification set that fine-tuning learns. Clips are rendered with numpy, encoded to H.264 with PyAV and
written through the real shard writer (`shards.make_shards`):

    <out>/videos/{train,eval}/<name>.mp4     the clips
    <out>/videos/{train,eval}/list.jsonl     writer input lists ({"video": "<name>.mp4", "caption": [...],
                                             "label": "<direction>"}), so shard keys = make_key("<name>.mp4")
                                             = the annotation's video
    <out>/classes.txt                        the class-index file: left, right, up, down (also beside the shards)
    <out>/shards/{train,eval}/               WebDataset shards + manifest.json + classes.txt
    <out>/eval_annotations.json              UMT layout [{"video": "<name>.mp4", "caption": str}],
                                             video paths relative to <out>/videos/eval
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import fsspec
import numpy as np

from pipeline.data.encode import encode_h264
from pipeline.data.labels import CLASS_INDEX_FILE, write_class_index
from pipeline.data.shards import make_shards
from pipeline.data.urls import join_url, split_protocol

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_COUNT_WORDS = {1: "a", 2: "two"}
_DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip: its content (captioned) and its layout (not captioned)."""

    colour: str
    shape: str
    count: int
    direction: str
    background: int
    starts: tuple[tuple[float, float], ...]
    """Start centre (x, y) of each shape, as fractions of the frame size."""


def captions(spec: ClipSpec) -> list[str]:
    """[canonical, paraphrase]: "two blue squares move up", "two blue squares moving upwards"."""
    noun = spec.shape + ("s" if spec.count > 1 else "")
    subject = f"{_COUNT_WORDS[spec.count]} {spec.colour} {noun}"
    verb = "moves" if spec.count == 1 else "move"
    return [f"{subject} {verb} {spec.direction}", f"{subject} moving {_DIRECTION_PHRASES[spec.direction]}"]


# Shapes span 2*_RADIUS of the frame and travel _TRAVEL of it over the clip.
_RADIUS = 0.1
_TRAVEL = 0.45


def random_spec(rng: np.random.Generator) -> ClipSpec:
    """Draw a clip's content uniformly and a layout that keeps every shape inside the frame."""
    direction = str(rng.choice(list(DIRECTIONS)))
    count = int(rng.integers(1, 3))
    dx, dy = DIRECTIONS[direction]
    lanes = rng.permutation([0.25, 0.5, 0.75])[:count]  # distinct lanes: shapes never overlap
    starts = []
    for lane in lanes:
        low, high = _RADIUS + 0.02, 1 - _RADIUS - 0.02 - _TRAVEL
        along = float(rng.uniform(low, high))
        along = along if (dx + dy) > 0 else 1 - along  # moving left/up starts near the far edge
        starts.append((along, float(lane)) if dx else (float(lane), along))
    return ClipSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        count=count,
        direction=direction,
        background=int(rng.integers(20, 90)),
        starts=tuple(starts),
    )


def _shape_mask(shape: str, radius_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    if shape == "circle":
        return xx**2 + yy**2 <= radius_px**2
    if shape == "square":
        return np.ones_like(xx, dtype=bool)
    if shape == "triangle":  # apex up, base at the bottom
        return (yy >= -radius_px) & (np.abs(xx) <= (yy + radius_px) / 2)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_clip(spec: ClipSpec, num_frames: int, size: int) -> np.ndarray:
    """uint8 RGB frames (T, size, size, 3)."""
    frames = np.full((num_frames, size, size, 3), spec.background, dtype=np.uint8)
    radius = max(2, int(_RADIUS * size))
    mask = _shape_mask(spec.shape, radius)
    dx, dy = DIRECTIONS[spec.direction]
    for t in range(num_frames):
        shift = _TRAVEL * t / max(1, num_frames - 1)
        for x0, y0 in spec.starts:
            cx, cy = int(round((x0 + dx * shift) * size)), int(round((y0 + dy * shift) * size))
            region = frames[t, cy - radius : cy + radius + 1, cx - radius : cx + radius + 1]
            region[mask] = COLOURS[spec.colour]
    return frames


def make_synthetic(
    output: str,
    num_videos: int = 200,
    split_ratio: float = 0.8,
    seed: int = 0,
    num_frames: int = 16,
    size: int = 64,
    fps: float = 8.0,
    shard_size: int = 50,
    workers: int = 1,
) -> dict[str, str]:
    """Render, encode and shard the demo set; returns the paths of its parts (see the module doc)."""
    if not 0.0 < split_ratio < 1.0:
        raise ValueError(f"split_ratio is the train fraction and must be in (0, 1), got {split_ratio}")
    num_train = int(round(num_videos * split_ratio))
    if num_train == 0 or num_train == num_videos:
        raise ValueError(f"{num_videos} videos at split_ratio={split_ratio} leave one split empty")
    remote = split_protocol(output)[0] != "file"
    # Remote outputs: render into a local staging folder, upload it, then shard from it.
    with tempfile.TemporaryDirectory(prefix="synthetic-") as tmp:
        staging = tmp if remote else output
        lists = _render_split_lists(staging, num_videos, num_train, seed, num_frames, size, fps)
        write_class_index(os.path.join(staging, CLASS_INDEX_FILE), list(DIRECTIONS))
        if remote:
            protocol, path = split_protocol(output)
            fsspec.filesystem(protocol).put(staging + "/", path, recursive=True)
        # Small eval shards: an exact eval pass needs one shard per (rank, loader worker), so give it >= 8.
        sizes = {"train": shard_size, "eval": min(shard_size, max(1, len(lists["eval"]) // 8))}
        for split in lists:
            make_shards(
                os.path.join(staging, "videos", split, "list.jsonl"),
                join_url(output, "shards", split),
                shard_size=sizes[split],
                workers=workers,
                progress=False,
                class_index=join_url(output, CLASS_INDEX_FILE),
            )
    return {
        "train_shards": join_url(output, "shards", "train"),
        "eval_shards": join_url(output, "shards", "eval"),
        "eval_annotations": join_url(output, "eval_annotations.json"),
        "eval_video_root": join_url(output, "videos", "eval"),
        "class_index": join_url(output, CLASS_INDEX_FILE),
    }


def _render_split_lists(
    root: str, num_videos: int, num_train: int, seed: int, num_frames: int, size: int, fps: float
) -> dict[str, list[dict]]:
    """Write the clips, per-split writer lists and the eval annotations under `root`."""
    lists: dict[str, list[dict]] = {"train": [], "eval": []}
    for split in lists:
        os.makedirs(os.path.join(root, "videos", split), exist_ok=True)
    for i in range(num_videos):
        split = "train" if i < num_train else "eval"
        spec = random_spec(np.random.default_rng([seed, i]))
        name = f"clip{i:06d}.mp4"
        with open(os.path.join(root, "videos", split, name), "wb") as f:
            f.write(encode_h264(render_clip(spec, num_frames, size), fps))
        lists[split].append({"video": name, "caption": captions(spec), "label": spec.direction})
    for split, rows in lists.items():
        with open(os.path.join(root, "videos", split, "list.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    annotations = [{"video": r["video"], "caption": r["caption"][0]} for r in lists["eval"]]
    with open(os.path.join(root, "eval_annotations.json"), "w") as f:
        json.dump(annotations, f, indent=0)
    return lists
