"""The clip decoder a loader uses, chosen by config: `data.decoder` pyav (default) or torchcodec, on
`data.decode_device` cpu or cuda. Both address frames the same way (index in presentation order) and draw the same
indices from the same generator, so switching decoders changes speed, not which frames a clip gets."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.data.decode import DecodeOptions, decode_clip
from pipeline.data.decode_torchcodec import decode_clip_torchcodec, torchcodec_problem

ClipDecoder = Callable[..., "np.ndarray | torch.Tensor"]
"""decode(video_bytes, mode=sampling_mode, rng=generator) -> uint8 RGB frames (T, H, W, 3), a numpy array or a
torch tensor. A partial of a module-level function: it pickles, so a stream holding one can go to spawned workers."""


def clip_decoder(cfg: DataConfig) -> ClipDecoder:
    """The decoder for `cfg`; raises ConfigError when torchcodec is asked for but cannot run in this process."""
    common = {"num_frames": cfg.num_frames, "frame_stride": cfg.frame_stride, "trim_seconds": cfg.trim_seconds}
    if cfg.decoder == "pyav":
        options = DecodeOptions(threads=cfg.decode_threads, skip_nonref=cfg.decode_skip_nonref,
                                short_side=cfg.decode_short_side)  # fmt: skip
        return functools.partial(decode_clip, **common, options=options)
    device = cfg.decode_device if cfg.decode_device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    problem = torchcodec_problem(device)
    if problem:
        raise ConfigError(f"data.decoder: 'torchcodec' cannot run here: {problem}; or set data.decoder=pyav")
    if cfg.decode_short_side is not None:
        raise ConfigError("data.decode_short_side: only the pyav decoder scales while decoding; unset it for "
                          "torchcodec (or preprocess the shards: jobs/make_shards.py --short-side)")  # fmt: skip
    return functools.partial(decode_clip_torchcodec, **common, device=device, threads=cfg.decode_threads)

