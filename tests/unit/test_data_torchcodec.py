"""The optional torchcodec decoder against PyAV: exact frame-index seeking (VFR included) gives the frames a full
PyAV decode gives, rotation and the loader agree, and a process without FFmpeg libraries gets a clear ConfigError.

torchcodec finds FFmpeg only through the library path the process started with. Where this test process has none,
the tests that decode run in a child interpreter started with PyAV's bundled FFmpeg on LD_LIBRARY_PATH
(`test_torchcodec_decodes_with_pyav_ffmpeg`), as users run it (docs/data.md).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.data.decode import decode_clip, sample_frame_indices
from pipeline.data.footage import FOOTAGE, render_footage, small
from tests._footage import full_decode

torchcodec = pytest.importorskip("torchcodec", reason="torchcodec is not installed: it is the optional decoder "
                                 "(pip install torchcodec==0.17.0); PyAV is tested without it")  # fmt: skip
NO_FFMPEG_HERE = torchcodec.ffmpeg_major_version is None
needs_ffmpeg = pytest.mark.skipif(NO_FFMPEG_HERE, reason="this process started without FFmpeg libraries on its "
                                  "library path; test_torchcodec_decodes_with_pyav_ffmpeg runs these tests in a "
                                  "child process that has PyAV's")  # fmt: skip


def nearest(frame: np.ndarray, reference: list[np.ndarray]) -> int:
    return int(np.argmin([np.abs(frame.astype(np.int16) - r.astype(np.int16)).mean() for r in reference]))


@needs_ffmpeg
@pytest.mark.parametrize("name", list(FOOTAGE))
def test_exact_seeking_gives_the_frames_of_a_full_decode(footage, name):
    from pipeline.data.decode_torchcodec import decode_clip_torchcodec

    reference = full_decode(footage[name])
    ten_bit = "10bit" in name  # the 10 -> 8 bit conversions round differently: compare which frame it is
    for seed in range(3):
        for mode in ("rand", "stride"):
            expected = sample_frame_indices(len(reference), 8, mode, random.Random(seed), frame_stride=2)
            clip = decode_clip_torchcodec(footage[name], 8, mode, random.Random(seed), frame_stride=2).numpy()
            assert clip.shape == (8, *reference[0].shape)
            assert [nearest(frame, reference) for frame in clip] == expected
            if not ten_bit:
                np.testing.assert_array_equal(clip, np.stack([reference[i] for i in expected]))


@needs_ffmpeg
def test_pyav_and_torchcodec_agree_on_rotation_and_trim(footage):
    from pipeline.data.decode_torchcodec import decode_clip_torchcodec

    data = footage["480p_vfr_rotated_audio"]
    for trim in (None, 0.3):
        ours = decode_clip(data, 5, "middle", trim_seconds=trim)
        theirs = decode_clip_torchcodec(data, 5, "middle", trim_seconds=trim).numpy()
        np.testing.assert_array_equal(ours, theirs)


@needs_ffmpeg
def test_loader_batches_are_the_same_with_either_decoder(tiny_synthetic):
    from pipeline.data import build_loader

    batches = {}
    for decoder in ("pyav", "torchcodec"):
        cfg = DataConfig(train_shards=tiny_synthetic["train_shards"], num_frames=4, img_size=32, batch_size=2,
                         num_workers=0, shuffle_buffer=4, decoder=decoder)  # fmt: skip
        iterator = iter(build_loader(cfg, "train", rank=0, world_size=1, seed=5))
        batches[decoder] = [next(iterator) for _ in range(2)]
    for ours, theirs in zip(batches["pyav"], batches["torchcodec"], strict=True):
        assert ours["key"] == theirs["key"]
        torch.testing.assert_close(ours["video"], theirs["video"], rtol=0, atol=1e-5)


@pytest.mark.gpu
@needs_ffmpeg
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC decoding needs a CUDA device")
def test_nvdec_decodes_the_same_frames():
    from pipeline.data.decode_torchcodec import decode_clip_torchcodec

    for name in ("720p_longgop", "640x272_bframes", "720p_hevc_10bit", "720p_vp9"):
        data = render_footage(small(FOOTAGE[name], 320, 192))  # NVDEC's smallest HEVC frame is 144x144
        reference = full_decode(data)
        expected = sample_frame_indices(len(reference), 8, "rand", random.Random(1))
        clip = decode_clip_torchcodec(data, 8, "rand", random.Random(1), device="cuda")
        assert clip.device.type == "cuda"
        frames = clip.cpu().numpy()
        assert [nearest(frame, reference) for frame in frames] == expected
        # NVDEC's colour conversion is not swscale's: close, not equal
        assert np.abs(frames.astype(float) - np.stack([reference[i] for i in expected])).mean() < 3


@pytest.mark.skipif(not NO_FFMPEG_HERE, reason="FFmpeg is on this process's library path: the missing-FFmpeg "
                    "error cannot happen here")  # fmt: skip
def test_missing_ffmpeg_is_a_config_error_that_says_what_to_do():
    from pipeline.data.decoders import clip_decoder

    with pytest.raises(ConfigError, match=r"data.decoder: 'torchcodec' cannot run here.*pipeline.data.ffmpeg_libs"):
        clip_decoder(DataConfig(decoder="torchcodec"))


def test_decoder_settings_are_checked():
    with pytest.raises(ConfigError, match="data.decode_device: 'cuda' needs data.decoder=torchcodec"):
        DataConfig(decode_device="cuda", num_workers=0)
    with pytest.raises(ConfigError, match="data.num_workers=0"):
        DataConfig(decoder="torchcodec", decode_device="cuda", num_workers=2)
    with pytest.raises(ConfigError, match="data.decode_threads: must be >= 0"):
        DataConfig(decode_threads=-1)
    with pytest.raises(ConfigError, match="data.decode_short_side: must be >= 2"):
        DataConfig(decode_short_side=1)


@pytest.mark.timeout(600)
@pytest.mark.skipif(not NO_FFMPEG_HERE, reason="FFmpeg is on this process's library path: the decoding tests ran "
                    "in this process")  # fmt: skip
def test_torchcodec_decodes_with_pyav_ffmpeg():
    from pipeline.data.ffmpeg_libs import pyav_ffmpeg_dir

    library_path = os.pathsep.join(filter(None, [str(pyav_ffmpeg_dir()), os.environ.get("LD_LIBRARY_PATH")]))
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
        env=dict(os.environ, LD_LIBRARY_PATH=library_path), cwd=root, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    decoding_tests = len(FOOTAGE) + 2  # the exact-seeking cases, rotation/trim, the loader
    assert f"{decoding_tests + 2} passed" in result.stdout, result.stdout[-2000:]  # + the config and link checks


def test_ffmpeg_link_folder_replaces_a_stale_one_and_is_reused(tmp_path):
    """A folder left by another PyAV install (links into a removed venv) must not break the next run: CI once
    failed with `Directory not empty` because the cached folder pointed into an old checkout's venv."""
    from pipeline.data.ffmpeg_libs import pyav_ffmpeg_dir, pyav_library_files

    first = pyav_ffmpeg_dir(tmp_path)
    files = pyav_library_files()
    for name in files:  # make every link point somewhere that no longer exists, as after a venv was deleted
        (first / name).unlink()
        (first / name).symlink_to(tmp_path / "gone" / name)
    again = pyav_ffmpeg_dir(tmp_path)
    assert again == first
    assert {name: (again / name).resolve() for name in files} == files
    assert pyav_ffmpeg_dir(tmp_path) == again
    assert sorted(p.name for p in (tmp_path / "videomamba-pipeline").iterdir()) == [again.name]  # nothing left over
