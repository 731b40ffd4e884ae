"""A full disk is named as such (path, free space, the setting to change) by the shard writer, the stage export,
checkpoints and the saved config, on a real full filesystem: a small tmpfs, or /dev/full (which fails every write
with ENOSPC)."""

from __future__ import annotations

import errno
import json
import subprocess

import numpy as np
import pytest
import torch

from pipeline.data.encode import encode_h264
from pipeline.data.shards import make_shards
from pipeline.writes import DiskFullError, disk_full_named, torch_save_file


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted under tmp_path (unmounted afterwards); skipped where mounting needs privileges this
    process does not have (mount(8) as root or with CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:  # lazily: a failed run may still hold a file open in it (a DataLoader or DeepSpeed writer thread)
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def noise_video(seed: int) -> bytes:
    """About 0.2 MB of H.264: random pixels do not compress."""
    frames = np.random.default_rng(seed).integers(0, 256, (24, 128, 128, 3), dtype=np.uint8)
    return encode_h264(frames, fps=8.0)


@pytest.mark.timeout(120)
def test_shard_writer_names_the_full_disk(small_disk, tmp_path):
    for i in range(6):
        (tmp_path / f"v{i}.mp4").write_bytes(noise_video(i))
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"video": f"v{i}.mp4", "caption": "noise"}) + "\n"
                                                 for i in range(6)))  # fmt: skip
    with pytest.raises(DiskFullError, match=rf"disk full writing the shard {small_disk}/\.out-000000\.tar\..*\.tmp: "
                                            rf"0\.0 MiB free of 1\.0 MiB on the filesystem of {small_disk} "
                                            r"\(\[Errno 28\] No space left on device\); free space there or set "
                                            r"--output to a filesystem with room") as raised:
        make_shards(str(tmp_path / "list.jsonl"), str(small_disk), shard_size=10, prefix="out", progress=False)
    assert raised.value.errno == errno.ENOSPC
    assert list(small_disk.iterdir()) == []  # the partial shard was removed, nothing half-written is left


def test_torch_writes_on_a_full_disk_are_named(small_disk):
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB
    with pytest.raises(DiskFullError, match=rf"disk full writing the stage export {small_disk}/a\.pt: 0\.0 MiB free "
                                            r"of 1\.0 MiB .*set output_dir to a filesystem with room"):
        torch_save_file(big, small_disk / "a.pt", "stage export", "output_dir")
    assert list(small_disk.iterdir()) == []  # written to a temp file and renamed: no truncated export is left
    # torch.save(obj, path) itself drops the errno ("unexpected pos ..."): recognised with the free space left.
    with pytest.raises(DiskFullError, match=r"disk full writing the checkpoint .*inline_container"):
        with disk_full_named(small_disk / "b.pt", "checkpoint"):
            torch.save(big, small_disk / "b.pt")


def test_other_write_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(IsADirectoryError):
        torch_save_file({}, tmp_path, "stage export")
    with pytest.raises(RuntimeError, match="unrelated"):  # torch-looking errors on a disk with room stay themselves
        with disk_full_named(tmp_path / "x.pt", "checkpoint"):
            raise RuntimeError("unrelated PytorchStreamWriter failed writing file")


def test_saved_config_on_a_full_device_is_named(tmp_path):
    from pipeline.jobs_common import run_training_job

    (tmp_path / "config.yaml").symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=rf"disk full writing the resolved config {tmp_path}/config\.yaml: .*set "
                                            r"output_dir to a filesystem with room"):
        run_training_job("toy", ["--config", "configs/stages/toy.yaml", f"output_dir={tmp_path}", "--dry-run"])


@pytest.mark.timeout(180)
def test_checkpoint_on_a_full_disk_is_named(small_disk, tmp_path):
    """DeepSpeed writes its files with torch.save(obj, path): the fault reaches the run as that named error."""
    from pipeline.config import load_config
    from pipeline.engine import train

    cfg = load_config("configs/stages/toy.yaml", [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={small_disk}/ckpt",
        "tracking.enabled=false", "optim.max_steps=2", "optim.warmup_steps=0", "checkpoint.interval_steps=2",
        "task.hidden_dim=4096",  # ~0.4M parameters: its fp32 weights and Adam states do not fit 1 MiB
    ])  # fmt: skip
    with pytest.raises(DiskFullError, match=rf"disk full writing the checkpoint {small_disk}/ckpt/toy/"
                                            r"\.staging_checkpoint_00000002: .*set checkpoint\.path to a filesystem"):
        train(cfg)
