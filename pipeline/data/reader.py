"""Streaming loader: WebDataset shards (local, s3, gs, ... via fsspec) -> decoded, transformed batches.

    loader = build_loader(cfg.data, "train")      # infinite; the engine counts steps
    for batch in loader: ...                       # video (B,3,T,S,S) float, text list[str],
                                                   # index (B,) long, key list[str], [keep (B,T*P) bool],
                                                   # [label (B,) long: labelled shards]
    loader.stats                                   # samples read / skipped, shard errors

train: every (rank, loader worker) resamples shards with replacement from the whole list with its own
seed (seed, epoch, segment, rank, slot), shuffles samples in a buffer, and yields full batches forever.
Epochs are nominal (resampling has no true end): every `data.samples_per_epoch` samples (over all ranks;
default the manifests' count) the stream moves on to the next epoch's seed. The worker processes stay up:
each one reseeds itself after its share of the epoch's batches (`worker_epoch_shares`). A resume continues
the epoch it stopped in with a fresh stream segment (new seed, no replay) and the remaining batches.

eval: one exact pass. Shards are split by rank (urls[rank::world]) then by loader worker; every rank
yields the SAME number of batches of the SAME size, computed from the manifests' sample counts, so
collective ops never hang at the end of the pass. `data.eval_remainder` decides how: "pad" (default)
sees every sample once and fills the gaps by repeating samples with `valid`=False; "drop" stops every
rank after the number of full batches the smallest rank has. Eval batches carry `valid` bool (B,).

Corrupt samples are skipped, counted and logged; the loader raises DataQualityError once more than
`data.max_bad_fraction` of at least `data.bad_check_min_samples` samples were bad. Shards that cannot be read
(missing, access denied) and shards that hold no sample (an empty tar, members without a `<key>.<ext>` name) are
counted (`data/shard_errors`, `data/shards_empty`) and named in a warning; a worker stops with an error after
`_MAX_CONSECUTIVE_SHARD_ERRORS` unreadable shards in a row, or once every shard of the training stream turned out
empty (resampling them would loop forever without a batch).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import distributed
from pipeline.config import DataConfig
from pipeline.data import loader_workers
from pipeline.data.augment import ClipAugment
from pipeline.data.decoders import clip_decoder
from pipeline.data.keys import sample_id
from pipeline.data.labels import sample_label
from pipeline.data.manifest import listed_sample_counts, shard_sample_counts
from pipeline.data.masks import DATA_MASK_TYPES, make_keep_mask
from pipeline.data.transforms import eval_transform, train_transform
from pipeline.data.urls import expand_shard_urls, register_fsspec_openers

log = logging.getLogger(__name__)

# A worker that fails to open this many shards in a row without one good sample stops the run
# (e.g. wrong credentials): otherwise a resampled stream would retry forever.
_MAX_CONSECUTIVE_SHARD_ERRORS = 8
# With no decodable sample among this many (or data.bad_check_min_samples, if larger) the stream stops whatever
# data.max_bad_fraction allows: it could never fill a batch.
_MIN_SAMPLES_WITHOUT_ONE_GOOD = 100
_STATS_KEY = "_stats"
_MASK_STREAM = 0x6D61736B  # "mask": keeps the mask generator's seed apart from the streams' seeds


class DataQualityError(RuntimeError):
    """Too many samples could not be decoded (see `data.max_bad_fraction`)."""


@dataclass
class LoaderStats:
    """Counters summed over the loader's worker processes."""

    samples_ok: int = 0
    samples_bad: int = 0
    shard_errors: int = 0
    """Shards that could not be opened or read to the end (missing, access denied, truncated)."""
    shards_empty: int = 0
    """Shards that opened but held no sample."""
    recent_errors: list[str] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        total = self.samples_ok + self.samples_bad
        return self.samples_bad / total if total else 0.0

    def as_metrics(self) -> dict[str, float]:
        """The counters as `data/*` metrics (this rank's loader)."""
        return {"data/bad_fraction": self.bad_fraction, "data/samples_bad": float(self.samples_bad),
                "data/shard_errors": float(self.shard_errors), "data/shards_empty": float(self.shards_empty)}


def choose_caption(caption: str | list[str], mode: str, rng: random.Random) -> str:
    """One text per sample: `random` / `first` caption of a list, or `join` them into a paragraph.

    ValueError (a bad sample) for anything but a string or a non-empty list of strings."""
    if isinstance(caption, str):
        return caption
    if not isinstance(caption, list) or not caption or not all(isinstance(c, str) for c in caption):
        raise ValueError(f"caption must be a string or a non-empty list of strings, got {caption!r:.80}")
    if mode == "random":
        return rng.choice(caption)
    if mode == "first":
        return caption[0]
    if mode == "join":
        return " ".join(caption)
    raise ValueError(f"unknown caption mode {mode!r}; choose random, first or join")


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "video": torch.stack([s["video"] for s in samples]),
        "text": [s["text"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
    if all("label" in s for s in samples):  # labelled shards (classification)
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


def worker_epoch_shares(
    epoch: int, batches_done: int, batches_per_epoch: int | None, worker: int, num_workers: int
) -> Iterator[tuple[int, int, int | None]]:
    """(epoch, slot, batches) for each nominal epoch a loader worker takes part in, from a stream started
    `batches_done` batches into `epoch`: the worker yields `batches` batches seeded with `slot`, then moves on.

    The DataLoader hands out its workers' batches round-robin, so the n-th batch after the start is worker
    n % num_workers's: each worker can tell from that alone which of its batches belong to which epoch, and
    reseed itself there without the main process restarting it. `slot` is the worker's turn counted from
    the epoch's first batch, so an epoch's batches do not depend on where the stream started (a fresh loader
    at that epoch yields them too). batches_per_epoch None: one endless epoch."""
    if not batches_per_epoch:
        yield epoch, worker, None
        return
    for e in itertools.count(epoch):
        first = (e - epoch) * batches_per_epoch - batches_done  # epoch e's first batch, counted from the start
        begin = max(first, 0)  # the started epoch's first `batches_done` batches were handed out before
        mine = len(range(begin + (worker - begin) % num_workers, first + batches_per_epoch, num_workers))
        if mine:
            yield e, (worker - first) % num_workers, mine


class ClipStream(IterableDataset):
    """The per-worker WebDataset pipeline: shards -> samples -> [shuffle] -> decode/transform -> batches."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        urls: list[str],
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        batches_per_epoch: int | None = None,
    ):
        super().__init__()
        self.cfg, self.split, self.urls = cfg, split, urls
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.batches_per_epoch = batches_per_epoch
        """Train: this rank's batches per nominal epoch; None = one endless epoch."""
        self.segment = 0
        """Restarts of the stream within `epoch` (one per resume): each gets a fresh seed."""
        self.batches_done = 0
        """Batches of `epoch` handed out before the stream starts (a resume); the workers yield the rest."""
        self.train = split == "train"
        self.caption_mode = cfg.caption_mode if cfg.caption_mode != "auto" else ("random" if self.train else "first")
        self.sampling = cfg.sampling if self.train else cfg.eval_sampling
        self.augment = ClipAugment.from_config(cfg.augment)
        self.repeats = cfg.augment.repeats if self.train else 1
        self.decode = clip_decoder(cfg)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        register_fsspec_openers()  # also inside loader worker processes
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stats = {"worker": worker, "ok": 0, "bad": 0, "shard_errors": 0, "shards_empty": 0, "consecutive": 0,
                 "errors": []}  # fmt: skip
        empty: set[str] = set()  # shards of this worker found to hold no sample
        if not self.train:
            rng = self._rng(self.epoch, self.segment, worker)
            shards = iter({"url": u} for u in self.urls[self.rank :: self.world_size][worker::num_workers])
            yield from self._batches(shards, rng, stats, empty)
            return
        shares = worker_epoch_shares(self.epoch, self.batches_done, self.batches_per_epoch, worker, num_workers)
        for epoch, slot, share in shares:
            rng = self._rng(epoch, self.segment if epoch == self.epoch else 0, slot)
            endless = ({"url": rng.choice(self.urls)} for _ in iter(int, 1))
            batches = self._batches(endless, rng, stats, empty)
            yielded = 0
            for batch in batches:
                yield batch
                yielded += "key" in batch  # stats-only messages are not batches
                if yielded == share:  # never for share None: one endless epoch
                    break
            batches.close()  # the epoch's open shard

    def _rng(self, epoch: int, segment: int, slot: int) -> random.Random:
        state = np.random.SeedSequence([self.seed, epoch, segment, self.rank, slot])
        return random.Random(int(state.generate_state(1)[0]))

    def _batches(self, shards: Iterator[dict[str, str]], rng: random.Random, stats: dict,
                 empty: set[str]) -> Iterator[dict[str, Any]]:
        """Batches from the shards, each carrying the worker's counters (`stats`, updated here)."""

        def on_shard_error(err: Exception) -> bool:
            stats["shard_errors"] += 1
            stats["consecutive"] += 1
            log.warning("cannot read shard data: %r", err)
            if stats["consecutive"] >= _MAX_CONSECUTIVE_SHARD_ERRORS:
                raise RuntimeError(f"{stats['consecutive']} shard read errors in a row; last: {err!r}") from err
            return True

        samples = self._shard_samples(shards, on_shard_error, stats, empty)
        if self.train and self.cfg.shuffle_buffer > 1:
            samples = wds.shuffle(self.cfg.shuffle_buffer, initial=min(100, self.cfg.shuffle_buffer), rng=rng)(
                iter(samples)
            )

        def with_stats(batch: dict[str, Any]) -> dict[str, Any]:
            batch[_STATS_KEY] = {k: (list(v) if isinstance(v, list) else v) for k, v in stats.items()}
            stats["errors"].clear()
            return batch

        rows: list[dict[str, Any]] = []
        for sample in samples:
            clips = self._process(sample, rng, stats)
            if clips is None:
                # A stats-only message: the main process sees failures even from a worker that never
                # fills a batch (otherwise an all-corrupt stream would hang silently).
                yield with_stats({})
                continue
            rows.extend(clips)  # data.batch_size is a multiple of the copies per video: batches stay full
            if len(rows) == self.cfg.batch_size:
                yield with_stats(_collate(rows))
                rows = []
        if rows:  # only a finite (eval) stream ends; its last batch may be partial
            yield with_stats(_collate(rows))
        yield with_stats({})  # the counters of shards read after the last batch (unreadable or empty ones)

    def _shard_samples(self, shards: Iterator[dict[str, str]], on_error, stats: dict,
                       empty: set[str]) -> Iterator[dict[str, Any]]:
        """The samples of each shard in turn (grouped per shard, so a shard's end is known: a shard that opened
        without error and yielded no sample is empty). Empty shards are counted and named once; when every shard
        of a training stream is empty the stream raises instead of drawing shards forever."""
        to_samples = wds.tarfile_to_samples(handler=on_error)
        for shard in shards:
            errors_before, count = stats["shard_errors"], 0
            for sample in to_samples(iter([shard])):
                count += 1
                yield sample
            if count or stats["shard_errors"] != errors_before:
                continue
            stats["shards_empty"] += 1
            if shard["url"] not in empty:
                empty.add(shard["url"])
                stats["errors"].append(f"{shard['url']}: no samples in this shard")
                log.warning("shard %s holds no samples (an empty tar, or no member named <key>.<ext>); skipping it",
                            shard["url"])
            if self.train and empty.issuperset(self.urls):
                raise DataQualityError(
                    f"every one of the {len(set(self.urls))} training shards holds no samples (e.g. {self.urls[0]}); "
                    "check them with `python jobs/inspect_shards.py URL`"
                )

    def _process(self, sample: dict[str, Any], rng: random.Random, stats: dict) -> list[dict] | None:
        """The rows of one sample (`data.augment.repeats` augmented copies in training), None when it is bad."""
        cfg, key = self.cfg, sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"])
            frames = self.decode(sample["mp4"], mode=self.sampling, rng=rng)
            # Labelled shards may have no caption: their text is the class name.
            text = choose_caption(meta["caption"], self.caption_mode, rng) if "caption" in meta else meta["label_name"]
            label = {"label": sample_label(meta)} if "label" in meta else {}
        # VideoDecodeError and JSON errors are ValueErrors; JSON nested deeper than the interpreter's recursion
        # limit raises RecursionError.
        except (KeyError, ValueError, TypeError, RecursionError) as err:
            stats["bad"] += 1
            stats["errors"].append(f"{key} ({sample.get('__url__')}): {err!r}")
            log.warning("skipping sample %s from %s: %r", key, sample.get("__url__"), err)
            return None
        stats["ok"] += 1
        stats["consecutive"] = 0
        if self.train:
            videos = [train_transform(frames, cfg.img_size, tuple(cfg.scale), cfg.flip, cfg.mean, cfg.std, rng,
                                      self.augment) for _ in range(self.repeats)]  # fmt: skip
        else:
            videos = [eval_transform(frames, cfg.img_size, cfg.mean, cfg.std, cfg.eval_crop)]
        return [{"video": video, "text": text, "index": sample_id(key), "key": key, **label} for video in videos]


class VideoLoader:
    """Iterates the torch DataLoader, gathers worker counters, enforces the bad-sample limit,
    for eval re-batches so every rank yields `num_batches` batches of exactly `batch_size`, and adds
    data-side masks (`keep`). For train it counts the batches of the nominal epoch (for `epoch` and the
    resume state); the worker processes move on to the next epoch's seed by themselves.

    Masks are drawn here, in the main process, from one generator per rank (seed, rank) that is part of
    `state_dict()`: the i-th batch after a resume gets the mask the uninterrupted run gave its i-th batch
    after that point, whatever the worker processes and their per-epoch seeds do."""

    def __init__(self, stream: ClipStream, num_batches: int | None):
        self.stream, self.cfg = stream, stream.cfg
        self.num_batches = num_batches
        self.batches_per_epoch = stream.batches_per_epoch
        """Train: this rank's batches per nominal epoch; None = one endless epoch."""
        self._epoch, self._segment = stream.epoch, stream.segment  # where the batches handed out are now
        self.batches_in_epoch = 0
        self.stats = LoaderStats()
        self._per_worker: dict[int, dict] = {}
        self._mask_rng = None
        if self.cfg.mask.type in DATA_MASK_TYPES:
            self._mask_rng = np.random.default_rng(np.random.SeedSequence([stream.seed, stream.rank, _MASK_STREAM]))
        self.dataloader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            # Workers die with this process (a killed rank's orphans would hold Ray's restart back) and use one thread.
            worker_init_fn=loader_workers.init_fn(one_thread=True) if self.cfg.num_workers else None,
            prefetch_factor=2 if self.cfg.num_workers else None,
            # Starting an iteration draws the workers' base seed (unused: ClipStream seeds itself) from this
            # generator instead of the global torch RNG, so dropout / drop-path randomness does not depend on
            # when the loader starts (a resume used to shift it by one draw).
            generator=torch.Generator().manual_seed(0),
        )

    @property
    def epoch(self) -> float:
        """The epoch in progress, with the fraction of it done (logged as `data/epoch`)."""
        done = self.batches_in_epoch / self.batches_per_epoch if self.batches_per_epoch else 0.0
        return self._epoch + done

    def state_dict(self) -> dict[str, Any]:
        """Resume state: epoch, stream segment, batches of the epoch handed out, and the mask generator.
        A resumed training stream finishes the epoch with a fresh segment's seed (new shard and sample order)
        rather than replaying the batches already seen."""
        state: dict[str, Any] = {"epoch": self._epoch, "segment": self._segment,
                                 "batches_in_epoch": self.batches_in_epoch}  # fmt: skip
        if self._mask_rng is not None:
            state["mask_rng"] = self._mask_rng.bit_generator.state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "segment" in state:
            self._epoch, self._segment = state["epoch"], state["segment"] + 1
            self.batches_in_epoch = state["batches_in_epoch"]
        else:  # a checkpoint from before epochs were counted: start the next epoch
            self._epoch, self._segment, self.batches_in_epoch = state["epoch"] + 1, 0, 0
        if self._mask_rng is not None and "mask_rng" in state:  # absent: a checkpoint from before masks were saved
            self._mask_rng.bit_generator.state = state["mask_rng"]

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the training stream is endless; count steps instead")
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats, self._per_worker = LoaderStats(), {}
        if self.num_batches is None:
            yield from self._train_batches()
            return
        yield from map(self._add_masks, self._equal_batches(self._worker_batches()))
        self._check_quality(final=True)

    def _worker_batches(self) -> Iterator[dict[str, Any]]:
        """One pass of the DataLoader over the stream, started where the loader is now (epoch, segment, batches
        of the epoch handed out): the worker processes are forked here, with that copy of the stream."""
        self.stream.epoch, self.stream.segment, self.stream.batches_done = (
            self._epoch, self._segment, self.batches_in_epoch)  # fmt: skip
        return (batch for batch in map(self._account, self.dataloader) if batch)

    def _train_batches(self) -> Iterator[dict[str, Any]]:
        """Endless. Counts the nominal epoch's batches; the workers switch seeds at the same boundaries."""
        for batch in self._worker_batches():
            if self.batches_per_epoch and self.batches_in_epoch >= self.batches_per_epoch:
                # On the next batch, not right after the last: a state_dict() taken in between resumes at the
                # boundary into the next epoch's usual segment 0, as the uninterrupted run goes on.
                self._epoch, self._segment, self.batches_in_epoch = self._epoch + 1, 0, 0
            self.batches_in_epoch += 1  # counted before the yield: state_dict() sees the batch handed out
            yield self._add_masks(batch)

    def _add_masks(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`keep` (B, T*P) bool for data-side mask types, drawn when the batch is handed out."""
        if self._mask_rng is not None:
            cfg, grid = self.cfg, self.cfg.img_size // self.cfg.patch_size
            masks = [make_keep_mask(cfg.mask.type, cfg.mask.ratio, cfg.num_frames, grid, grid, self._mask_rng)
                     for _ in batch["key"]]  # fmt: skip
            batch["keep"] = torch.from_numpy(np.stack(masks))
        return batch

    def _account(self, batch: dict[str, Any]) -> dict[str, Any]:
        worker_stats = batch.pop(_STATS_KEY)
        self._per_worker[worker_stats["worker"]] = worker_stats  # each worker's running totals
        workers = self._per_worker.values()
        self.stats.samples_ok = sum(w["ok"] for w in workers)
        self.stats.samples_bad = sum(w["bad"] for w in workers)
        self.stats.shard_errors = sum(w["shard_errors"] for w in workers)
        self.stats.shards_empty = sum(w["shards_empty"] for w in workers)
        self.stats.recent_errors = (self.stats.recent_errors + worker_stats["errors"])[-10:]
        self._check_quality(final=False)
        return batch

    def _check_quality(self, final: bool) -> None:
        s = self.stats
        total = s.samples_ok + s.samples_bad
        if not s.samples_ok and total >= max(self.cfg.bad_check_min_samples, _MIN_SAMPLES_WITHOUT_ONE_GOOD):
            raise DataQualityError(
                f"none of the {total} samples read so far could be decoded; recent errors: {s.recent_errors}. "
                "Check the shards with `python jobs/inspect_shards.py URL --decode`."
            )
        if total and (final or total >= self.cfg.bad_check_min_samples) and s.bad_fraction > self.cfg.max_bad_fraction:
            raise DataQualityError(
                f"{s.samples_bad} of {total} samples ({s.bad_fraction:.1%}) could not be decoded, above "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}; recent errors: {s.recent_errors}. "
                "Check the shards with `python jobs/inspect_shards.py URL --decode`."
            )

    def _equal_batches(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        size, emitted, pending, last = self.cfg.batch_size, 0, [], None
        for batch in batches:
            pending.append(batch)
            while sum(len(b["key"]) for b in pending) >= size and emitted < self.num_batches:
                last, pending = _take_rows(pending, size)
                last["valid"] = torch.ones(size, dtype=torch.bool)
                emitted += 1
                yield last
            if emitted == self.num_batches:
                return
        rows = sum(len(b["key"]) for b in pending)
        while emitted < self.num_batches:
            if rows:
                real, pending = _take_rows(pending, rows)
                filler = _repeat_rows(real, size - rows)
                last = _concat([real, filler])
                last["valid"] = torch.arange(size) < rows
                rows = 0
            elif last is not None:
                last = {**_repeat_rows(last, size), "valid": torch.zeros(size, dtype=torch.bool)}
            else:
                raise DataQualityError(
                    f"rank {self.stream.rank} decoded no eval samples but must yield {self.num_batches} batches"
                )
            emitted += 1
            yield last


def _concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, first in batches[0].items():
        parts = [b[name] for b in batches]
        out[name] = torch.cat(parts) if isinstance(first, torch.Tensor) else [x for p in parts for x in p]
    return out


def _slice(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {name: value[start:stop] for name, value in batch.items()}


def _take_rows(pending: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """First n rows of the queued batches, and the queue without them."""
    merged = _concat(pending)
    rest = len(merged["key"]) - n
    return _slice(merged, 0, n), ([_slice(merged, n, n + rest)] if rest else [])


def _repeat_rows(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """n rows cycling through the batch's rows (padding for eval)."""
    rows = [i % len(batch["key"]) for i in range(n)]
    return {
        k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows]) for k, v in batch.items() if k != "valid"
    }


def eval_batch_count(counts_per_rank: list[int], batch_size: int, remainder: str) -> int:
    """Batches every rank yields in an exact pass: max over ranks of ceil (pad) or min of floor (drop)."""
    if remainder == "pad":
        return max(math.ceil(n / batch_size) for n in counts_per_rank)
    if remainder == "drop":
        return min(n // batch_size for n in counts_per_rank)
    raise ValueError(f"data.eval_remainder: {remainder!r} is not allowed; choose pad or drop")


def build_loader(
    data_cfg: DataConfig,
    split: str = "train",
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int = 0,
    seed: int = 0,
) -> VideoLoader:
    """The batch iterable for `split` ("train": endless resampled stream; "eval": one exact pass)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    spec = data_cfg.train_shards if split == "train" else data_cfg.eval_shards
    if not spec:
        raise ValueError(f"data.{split}_shards is not set; point it at the {split} shards (a directory or URL)")
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    register_fsspec_openers()
    urls = expand_shard_urls(spec)
    num_batches = batches_per_epoch = None
    if split == "train":
        samples_per_epoch = data_cfg.samples_per_epoch or manifest_sample_total(urls)
        if samples_per_epoch:
            videos_per_batch = data_cfg.batch_size // data_cfg.augment.repeats  # repeats: copies of one video
            batches_per_epoch = math.ceil(samples_per_epoch / (world_size * videos_per_batch))
    if split == "eval":
        readers = world_size * max(1, data_cfg.num_workers)
        if len(urls) < readers:
            raise ValueError(
                f"data.eval_shards has {len(urls)} shards but {world_size} ranks x {max(1, data_cfg.num_workers)} "
                f"loader workers need at least {readers} (one per reader in an exact pass); write smaller shards "
                "(jobs/make_shards.py --shard-size) or lower data.num_workers"
            )
        counts = shard_sample_counts(urls)
        per_rank = [sum(counts[r::world_size]) for r in range(world_size)]
        num_batches = eval_batch_count(per_rank, data_cfg.batch_size, data_cfg.eval_remainder)
    stream = ClipStream(data_cfg, split, urls, rank, world_size, epoch, seed, batches_per_epoch)
    return VideoLoader(stream, num_batches)


def manifest_sample_total(urls: list[str]) -> int | None:
    """Samples in the shards according to their manifests; None, with a warning naming the shards, when the
    manifests do not list them all (counting by reading every training shard would be too slow to do at every
    start). DataQualityError when the manifests list every shard and no sample."""
    counts = listed_sample_counts(urls)
    unlisted = [url for url, count in zip(urls, counts, strict=True) if count is None]
    if unlisted:
        log.warning("data.samples_per_epoch is not set and %d of %d training shards are not listed in the manifest "
                    "beside them (%s): the training stream runs as one endless epoch", len(unlisted), len(urls),
                    ", ".join(unlisted[:3]) + (", ..." if len(unlisted) > 3 else ""))
        return None
    if not sum(counts):
        raise DataQualityError(f"the manifests list no samples in the {len(urls)} training shards (e.g. {urls[0]}); "
                               "rewrite them with jobs/make_shards.py or point data.train_shards elsewhere")
    return sum(counts)
