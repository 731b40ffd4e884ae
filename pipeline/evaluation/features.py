"""Feature extraction for retrieval: decode every annotated video once, encode videos and texts on N ranks.

Each rank encodes a disjoint, contiguous slice of the videos and of the texts; the slices are gathered so
every rank ends with the full (num_videos, E) and (num_texts, E) matrices in annotation order.
Videos come from a folder (local path or any fsspec URL) or from WebDataset shards (matched by the shard
key that `pipeline.data.keys.make_key` derives from the annotation's video path).

Legend: V videos, T texts (queries), E joint embedding width, C/T/H/W clip dims as in `video_BCTHW`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from pipeline.data import loader_workers
from pipeline.data.decode import VideoDecodeError, decode_clip
from pipeline.data.keys import make_key
from pipeline.data.manifest import iter_shard
from pipeline.data.transforms import eval_transform
from pipeline.data.urls import expand_shard_urls, filesystem, join_url, register_fsspec_openers, split_protocol
from pipeline.distributed import all_gather_uneven, get_rank, get_world_size
from pipeline.evaluation.timing import PhaseTimer


@dataclass(frozen=True)
class ClipSpec:
    """Everything that decides the pixels the model sees (part of the feature-cache key)."""

    num_frames: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    trim_seconds: float | None

    def load(self, source: str | bytes) -> Tensor:
        """Decode segment-middle frames, resize them (bicubic, no crop) and normalise: float (C, T, H, W)."""
        frames_THW3 = decode_clip(source, self.num_frames, "middle", trim_seconds=self.trim_seconds)
        return eval_transform(frames_THW3, self.img_size, list(self.mean), list(self.std))


class ClipLoader(Protocol):
    """What `map_clips` decodes a video with: ClipSpec (one clip), or the classification test's views."""

    def load(self, source: str | bytes) -> Tensor: ...


class FolderVideos:
    """Videos as files under a root folder or URL prefix (`<root>/<annotation video path>`)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fs = filesystem(root)
        self.local = split_protocol(root)[0] == "file"

    def describe(self) -> str:
        return self.root

    def exists(self, video: str) -> bool:
        return self.fs.isfile(join_url(self.root, video))

    def iter_sources(
        self, wanted: dict[str, int], worker: int, num_workers: int
    ) -> Iterator[tuple[int, str, str | bytes]]:
        """(index, video, path or bytes) for this loader worker's share of `wanted` {video: index}."""
        for video, index in list(wanted.items())[worker::num_workers]:
            path = join_url(self.root, video)
            yield index, video, (path if self.local else self.fs.cat_file(path))


class ShardVideos:
    """Videos inside WebDataset shards (`<key>.mp4` members, key = make_key(annotation video path)).

    Shards written by `pipeline.data.shards` from a list whose `video` column holds the annotation's
    paths have exactly these keys. Every rank streams every shard and decodes only its own videos.
    """

    def __init__(self, shards: str | list[str]) -> None:
        register_fsspec_openers()
        self.urls = expand_shard_urls(shards)
        self._keys: set[str] | None = None

    def describe(self) -> str:
        return f"{len(self.urls)} shard(s) starting {self.urls[0]}"

    def exists(self, video: str) -> bool:
        if self._keys is None:
            self._keys = {key for url in self.urls for key in self._mp4_keys(url)}
        return make_key(video) in self._keys

    @staticmethod
    def _mp4_keys(url: str) -> Iterator[str]:
        # Headers only: a seekable tar read skips over the payloads (range reads on object stores).
        with filesystem(url).open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for name in tar.getnames():
                key, _, ext = name.rsplit("/", 1)[-1].partition(".")
                if ext == "mp4":
                    yield key

    def iter_sources(self, wanted: dict[str, int], worker: int, num_workers: int) -> Iterator[tuple[int, str, bytes]]:
        by_key = {make_key(video): (video, index) for video, index in wanted.items()}
        for url in self.urls[worker::num_workers]:
            for sample in iter_shard(url):
                if sample["__key__"] in by_key and "mp4" in sample:
                    video, index = by_key[sample["__key__"]]
                    yield index, video, sample["mp4"]


VideoSource = FolderVideos | ShardVideos


class _ClipStream(IterableDataset):
    """Yields (index, clip_CTHW) for the wanted videos, split across DataLoader workers."""

    def __init__(self, source: VideoSource, wanted: dict[str, int], spec: ClipLoader) -> None:
        self.source, self.wanted, self.spec = source, wanted, spec

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for index, video, payload in self.source.iter_sources(self.wanted, worker, num_workers):
            try:
                clip_CTHW = self.spec.load(payload)
            except VideoDecodeError as err:
                raise VideoDecodeError(f"{video} (in {self.source.describe()}): {err}") from err
            yield index, clip_CTHW


def rank_slice(n: int) -> range:
    """This rank's contiguous share of `n` items (shares differ by at most one; none is empty)."""
    rank, world_size = get_rank(), get_world_size()
    if n < world_size:
        raise ValueError(f"{n} items cannot be split over {world_size} ranks; use fewer workers (scaling.num_workers)")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def precision_autocast(device: torch.device, precision: str):
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def map_clips(
    fn: Callable[[Tensor, Tensor], Tensor], videos: list[str], source: VideoSource, spec: ClipLoader,
    device: torch.device, batch_size: int, num_workers: int, precision: str = "fp32", desc: str = "videos",
    timer: PhaseTimer | None = None,
) -> Tensor:
    """Rows `fn(index_B, clip_BCTHW) -> (B, ...)` for all `videos` in order, on CPU.

    This rank decodes and processes its slice (`num_workers` decoding processes), then all ranks gather.
    `timer` gets `<desc>_decode` (waiting for decoded clips: the decoding itself when num_workers is 0)
    and `<desc>_forward` (`fn`, with the copy to the device).
    """
    timer = timer or PhaseTimer()
    mine = rank_slice(len(videos))
    wanted = {videos[i]: i for i in mine}
    workers = min(num_workers, len(wanted))
    loader = DataLoader(_ClipStream(source, wanted, spec), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=loader_workers.init_fn() if workers else None)
    indices, rows = [], []
    with tqdm(total=len(wanted), desc=desc, unit="clip", disable=get_rank() != 0) as bar:
        for index_B, clip_BCTHW in timer.iterate(loader, f"{desc}_decode"):
            with timer.phase(f"{desc}_forward", device), precision_autocast(device, precision):
                index_B = index_B.to(device)
                rows.append(fn(index_B, clip_BCTHW.to(device, non_blocking=True)).float())
            indices.append(index_B)
            bar.update(len(index_B))
    return gather_rows(indices, rows, len(videos), mine)


def encode_videos(model, videos: list[str], source: VideoSource, spec: ClipSpec, device: torch.device,
                  batch_size: int, num_workers: int, precision: str = "fp32", timer: PhaseTimer | None = None,
                  ) -> Tensor:
    """(V, E) L2-normalised video features in annotation order (timer phases `video_decode`, `video_forward`)."""
    return map_clips(lambda _, clip_BCTHW: model.encode_video(clip_BCTHW), videos, source, spec, device,
                     batch_size, num_workers, precision, desc="video", timer=timer)


@torch.no_grad()
def map_texts(fn: Callable[[list[str]], tuple[Tensor, ...]], texts: list[str], device: torch.device, batch_size: int,
              precision: str = "fp32", timer: PhaseTimer | None = None) -> tuple[Tensor, ...]:
    """`fn(texts) -> (rows_B..., ...)` over all `texts` in order, each output assembled to (num_texts, ...) on CPU:
    this rank maps its slice, then all ranks gather. Tokenising and the forward pass count as `text_forward`."""
    timer = timer or PhaseTimer()
    mine = rank_slice(len(texts))
    indices, outputs = [], []
    for start in range(mine.start, mine.stop, batch_size):
        stop = min(start + batch_size, mine.stop)
        with timer.phase("text_forward", device), precision_autocast(device, precision):
            outputs.append(fn(texts[start:stop]))
        indices.append(torch.arange(start, stop, device=device))
    return tuple(gather_rows(indices, list(rows), len(texts), mine) for rows in zip(*outputs, strict=True))


def encode_texts(model, texts: list[str], device: torch.device, batch_size: int, precision: str = "fp32",
                 timer: PhaseTimer | None = None, max_tokens: int | None = None) -> Tensor:
    """(T, E) features of all `texts` in order (`model.encode_text`, at most `max_tokens` tokens per text)."""
    return map_texts(lambda chunk: (model.encode_text(chunk, max_tokens=max_tokens).float(),), texts, device,
                     batch_size, precision, timer)[0]


def gather_rows(indices: list[Tensor], rows: list[Tensor], total: int, mine: range) -> Tensor:
    """Gather every rank's (index, row) pairs and place the rows in item order: (total, ...) on CPU."""
    index_N = torch.cat(indices)
    if len(index_N) != len(mine):
        raise RuntimeError(f"rank {get_rank()} produced {len(index_N)} rows but owns {len(mine)} items")
    all_index_N = all_gather_uneven(index_N)
    all_rows_N = all_gather_uneven(torch.cat(rows))
    out = all_rows_N.new_empty((total, *all_rows_N.shape[1:]))
    out[all_index_N] = all_rows_N
    return out.cpu()
