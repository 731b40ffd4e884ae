"""Video data: shard writer, streaming reader (s3/gs/file via fsspec), PyAV decoding, transforms, masks,
and the synthetic demo set. See docs/data.md."""

from pipeline.data.check import inspect_shards
from pipeline.data.decode import VideoDecodeError, decode_clip, probe_video, sample_frame_indices
from pipeline.data.keys import make_key, sample_id
from pipeline.data.masks import DATA_MASK_TYPES, make_keep_mask
from pipeline.data.reader import DataQualityError, LoaderStats, VideoLoader, build_loader
from pipeline.data.shards import TranscodeOptions, make_shards
from pipeline.data.synthetic import make_synthetic

__all__ = [
    "DATA_MASK_TYPES",
    "DataQualityError",
    "LoaderStats",
    "TranscodeOptions",
    "VideoDecodeError",
    "VideoLoader",
    "build_loader",
    "decode_clip",
    "inspect_shards",
    "make_keep_mask",
    "make_key",
    "make_shards",
    "make_synthetic",
    "probe_video",
    "sample_frame_indices",
    "sample_id",
]
