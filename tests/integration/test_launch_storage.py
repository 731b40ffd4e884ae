"""Run storage on a real (moto) S3 server: finding the newest complete checkpoint, and the result record."""

from __future__ import annotations

import json

import pytest

from pipeline.checkpointing import latest_checkpoint, layout, pop_run_record, write_run_record
from pipeline.config import load_config


@pytest.mark.timeout(60)
def test_latest_complete_checkpoint_and_result_record_on_s3(moto_s3):
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpts-scan")
    overrides = ["task.name=toy", "stage=toy", "checkpoint.path=s3://ckpts-scan/runs", "scaling.num_workers=2"]
    cfg = load_config(None, overrides)
    assert latest_checkpoint(cfg) is None

    def put_checkpoint(step: int, ranks: list[int]) -> None:
        root = f"ckpts-scan/runs/toy/{layout.checkpoint_dir_name(step)}"  # 2 ranks without ZeRO: no optimizer shards
        fs.pipe({f"{root}/{layout.MANIFEST}": json.dumps(layout.manifest(step, 2, 0, False)).encode(),
                 f"{root}/{layout.CONFIG}": b"{}", f"{root}/{layout.LATEST}": b"state",
                 f"{root}/{layout.DEEPSPEED_TAG}/{layout.MODEL_STATES[0]}": b"x",
                 **{f"{root}/{layout.rank_state_name(r)}": b"x" for r in ranks}})

    put_checkpoint(10, [0, 1])
    put_checkpoint(20, [0, 1])
    put_checkpoint(30, [0])  # rank 1's shard has not arrived: incomplete, must not be resumed from
    assert latest_checkpoint(cfg) == "s3://ckpts-scan/runs/toy/checkpoint_00000020"
    # rank 1's file arrives from another process (as Ray's workers write): s3fs's listing cache must not hide it
    boto3.client("s3").put_object(Bucket="ckpts-scan", Key="runs/toy/checkpoint_00000030/rank1_state.pt", Body=b"x")
    assert latest_checkpoint(cfg) == "s3://ckpts-scan/runs/toy/checkpoint_00000030"

    assert pop_run_record(cfg) is None
    write_run_record(cfg, {"step": 30, "mlflow_run_id": "abc"})
    assert pop_run_record(cfg) == {"step": 30, "mlflow_run_id": "abc"}
    assert pop_run_record(cfg) is None  # read once: a later launch cannot mistake it for its own


@pytest.mark.timeout(60)
def test_storage_options_reach_s3fs_and_ray(moto_s3, monkeypatch):
    import s3fs

    from pipeline.launch import ray_storage

    s3fs.S3FileSystem().mkdir("ckpts-opts")
    # Without the environment's endpoint and keys, only checkpoint.storage_options can reach the server.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    s3fs.S3FileSystem.clear_instance_cache()
    options = f"{{key: testing, secret: testing, endpoint_url: '{moto_s3}'}}"
    cfg = load_config(None, ["task.name=toy", "stage=toy", "checkpoint.path=s3://ckpts-opts/runs",
                             f"checkpoint.storage_options={options}"])  # fmt: skip
    write_run_record(cfg, {"step": 1})
    assert pop_run_record(cfg) == {"step": 1}
    storage = ray_storage(cfg)  # what Ray's RunConfig gets: the bucket path on a pyarrow view of that s3fs
    assert storage["storage_path"] == "ckpts-opts/runs"
    storage["storage_filesystem"].create_dir("ckpts-opts/runs/probe")
    with storage["storage_filesystem"].open_output_stream("ckpts-opts/runs/probe/x") as f:
        f.write(b"via pyarrow")
    assert s3fs.S3FileSystem(**cfg.checkpoint.storage_options).cat("ckpts-opts/runs/probe/x") == b"via pyarrow"


def _read_while_others_restore(checkpoint, digest: str, ready, stop, result) -> None:
    """A rank that holds its restored checkpoint open and rereads it until told to stop."""
    import hashlib

    from pipeline.checkpointing import private_checkpoint_dir

    bad = reads = 0
    with private_checkpoint_dir(checkpoint) as local:
        ready.set()
        while not stop.is_set():
            bad += hashlib.sha256((local / "shard.pt").read_bytes()).hexdigest() != digest
            reads += 1
    result.put((reads, bad))


@pytest.mark.timeout(120)
def test_a_rank_restoring_late_does_not_rewrite_another_ranks_files(moto_s3):
    """Ranks of one node restore the same s3:// checkpoint at different moments: each reads its own copy.
    Ray hands every rank the same pickled Checkpoint, whose `as_directory()` download dir is shared by the node's
    processes and was rewritten under a reading rank by a later one (this test fails that way with it)."""
    import hashlib
    import multiprocessing as mp
    import os

    import ray.train
    import s3fs

    from pipeline.checkpointing import private_checkpoint_dir

    data = os.urandom(32 * 2**20)
    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpts-restore")
    fs.pipe({"ckpts-restore/run/checkpoint_00000010/shard.pt": data})
    checkpoint = ray.train.Checkpoint("s3://ckpts-restore/run/checkpoint_00000010")
    digest = hashlib.sha256(data).hexdigest()
    ctx = mp.get_context("spawn")
    ready, stop, result = ctx.Event(), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_read_while_others_restore, args=(checkpoint, digest, ready, stop, result))
    reader.start()
    try:
        assert ready.wait(60), "the reading rank did not restore"
        for _ in range(3):  # later ranks restore while the first one reads
            with private_checkpoint_dir(checkpoint) as local:
                assert hashlib.sha256((local / "shard.pt").read_bytes()).hexdigest() == digest
        stop.set()
        reads, bad = result.get(timeout=60)
    finally:
        stop.set()
        reader.join(30)
        if reader.is_alive():
            reader.kill()
    assert reads > 0 and bad == 0, f"{bad} of {reads} reads saw a rewritten file"
