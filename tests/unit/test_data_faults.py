"""Shard-level faults: empty shards (a valid tar without samples), missing shards, shards their manifest does not
list, and object-store access denied. None may hang the loader; each is counted, named, and reaches MLflow."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile

import pytest

from pipeline.config import DataConfig
from pipeline.data.check import inspect_shards
from pipeline.data.manifest import shard_sample_counts
from pipeline.data.reader import DataQualityError, build_loader
from pipeline.data.urls import expand_shard_urls


def data_cfg(shards, **overrides) -> DataConfig:
    base = dict(train_shards=shards, eval_shards=shards, num_frames=4, img_size=32, batch_size=2, num_workers=0,
                shuffle_buffer=1, flip=False)  # fmt: skip
    return DataConfig(**{**base, **overrides})


def write_empty_tar(path) -> str:
    """A valid tar archive with no members (what an interrupted writer or `tar cf x.tar --files-from /dev/null`
    leaves)."""
    with tarfile.open(path, "w"):
        pass
    return str(path)


def write_tar_without_samples(path) -> str:
    """A valid tar whose members have no `<key>.<ext>` name, so webdataset groups no sample from it."""
    readme = path.parent / "README"
    readme.write_text("not a sample\n")
    with tarfile.open(path, "w") as tar:
        tar.add(readme, arcname="README")
    return str(path)


def copy_shards(tiny_synthetic, dest, count: int) -> list[str]:
    """The first `count` synthetic training shards, copied without their manifest."""
    dest.mkdir(exist_ok=True)
    return [shutil.copy(url, dest) for url in expand_shard_urls(tiny_synthetic["train_shards"])[:count]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_stream_of_only_empty_shards_stops_with_an_error(tmp_path, num_workers):
    """It used to draw shards forever without yielding a batch: the run hung at its first step."""
    write_empty_tar(tmp_path / "a-000000.tar")
    write_tar_without_samples(tmp_path / "a-000001.tar")
    loader = build_loader(data_cfg(str(tmp_path), num_workers=num_workers), "train", 0, 1)
    with pytest.raises(DataQualityError, match=r"every one of the 2 training shards holds no samples"):
        next(iter(loader))


@pytest.mark.timeout(60)
def test_an_empty_shard_among_good_ones_is_skipped_counted_and_named_once(tiny_synthetic, tmp_path, caplog):
    copy_shards(tiny_synthetic, tmp_path, 2)
    empty = write_empty_tar(tmp_path / "train-empty.tar")
    loader = build_loader(data_cfg(str(tmp_path)), "train", 0, 1, seed=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reader"):
        batches = [batch for _, batch in zip(range(12), loader, strict=False)]
    assert len(batches) == 12 and all(len(b["key"]) == 2 for b in batches)
    stats = loader.stats
    assert stats.shards_empty >= 1 and stats.shard_errors == 0
    warnings = [r.getMessage() for r in caplog.records if "holds no samples" in r.getMessage()]
    assert warnings == [f"shard {empty} holds no samples (an empty tar, or no member named <key>.<ext>); skipping it"]
    assert stats.as_metrics()["data/shards_empty"] == float(stats.shards_empty)


@pytest.mark.timeout(60)
def test_a_missing_shard_is_counted_and_named(tiny_synthetic, tmp_path, caplog):
    copy_shards(tiny_synthetic, tmp_path, 2)
    pattern = f"{tmp_path}/train-{{000000..000002}}.tar"  # 000002 was never copied
    loader = build_loader(data_cfg(pattern), "train", 0, 1, seed=2)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reader"):
        batches = [batch for _, batch in zip(range(12), loader, strict=False)]
    assert len(batches) == 12
    assert loader.stats.shard_errors >= 1 and loader.stats.as_metrics()["data/shard_errors"] >= 1.0
    assert any(f"{tmp_path}/train-000002.tar" in r.getMessage() for r in caplog.records)


def test_shards_missing_from_their_manifest_are_named(tiny_synthetic, tmp_path, caplog):
    copy_shards(tiny_synthetic, tmp_path, 2)
    names = ["train-000000.tar", "train-000001.tar"]
    manifest = {"shards": [{"name": names[0], "num_samples": 2}]}  # lists only the first shard
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        build_loader(data_cfg(str(tmp_path)), "train", 0, 1)
        assert shard_sample_counts([str(tmp_path / n) for n in names]) == [2, 2]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"1 of 2 training shards are not listed in the manifest beside them ({tmp_path}/{names[1]})" in m
               for m in messages)  # fmt: skip
    assert f"shard {tmp_path}/{names[1]} is not listed in the manifest.json beside it; counting its samples by " \
           "reading it" in messages

    manifest["shards"][0]["num_samples"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    empty = write_empty_tar(tmp_path / "train-000002.tar")
    report = inspect_shards(str(tmp_path))
    assert report["not_in_manifest"] == [f"{tmp_path}/{names[1]}", empty]
    assert report["manifest_mismatch"] == [{"url": f"{tmp_path}/{names[0]}", "manifest": 5, "read": 2}]
    assert report["empty_shards"] == [empty]


def test_manifests_that_list_no_samples_stop_the_build(tmp_path):
    write_empty_tar(tmp_path / "a-000000.tar")
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "a-000000.tar", "num_samples": 0}]}))
    with pytest.raises(DataQualityError, match=r"the manifests list no samples in the 1 training shards"):
        build_loader(data_cfg(str(tmp_path)), "train", 0, 1)


@pytest.fixture
def s3_shards_and_a_reader_without_get(moto_s3, tiny_synthetic, monkeypatch):
    """Shards in s3://denied/train, then credentials of an IAM user that may list the bucket but not read objects,
    with moto enforcing IAM. Yields the prefix."""
    import boto3
    import s3fs
    from moto.core.authorization import enable_iam_authentication

    fs = s3fs.S3FileSystem()
    fs.mkdir("denied")
    fs.put(str(expand_shard_urls(tiny_synthetic["train_shards"])[0]), "denied/train/train-000000.tar")
    fs.pipe("denied/train/manifest.json", json.dumps({"shards": [{"name": "train-000000.tar", "num_samples": 2}]})
            .encode())  # fmt: skip
    iam = boto3.client("iam")
    iam.create_user(UserName="lister")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "*"}]}
    iam.put_user_policy(UserName="lister", PolicyName="list-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="lister")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3fs.S3FileSystem.clear_instance_cache()
    with enable_iam_authentication():
        yield "s3://denied/train"


@pytest.mark.timeout(120)
def test_s3_access_denied_names_the_object(s3_shards_and_a_reader_without_get):
    """s3fs reports a 403 as PermissionError('Access Denied'), which named neither the bucket nor the key."""
    prefix = s3_shards_and_a_reader_without_get
    with pytest.raises(PermissionError, match=rf"access denied to {prefix}/manifest.json \(Access Denied\): the "
                                              r"credentials this process uses \(for s3: AWS_ACCESS_KEY_ID"):
        build_loader(data_cfg(prefix), "eval", 0, 1)
    report = inspect_shards(prefix)
    assert report["bad"][0]["shard"] == f"{prefix}/train-000000.tar"
    assert f"access denied to {prefix}/train-000000.tar (Access Denied)" in report["bad"][0]["reason"]
    assert f"access denied to {prefix}/manifest.json" in report["manifest_error"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shard_faults_reach_mlflow(tiny_synthetic, tmp_path):
    """A short stage-1 run on shards with a missing and an empty one: the counters are MLflow metrics."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.engine import train

    copy_shards(tiny_synthetic, tmp_path / "shards", 2)
    write_empty_tar(tmp_path / "shards" / "train-000002.tar")
    shards = f"{tmp_path}/shards/train-{{000000..000003}}.tar"  # 000003 does not exist
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("configs/stages/pretrain_mask_test.yaml", [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        f"tracking.uri={uri}", f"data.train_shards={shards}", "data.num_workers=0", "data.shuffle_buffer=1",
        "data.batch_size=2",
        "data.samples_per_epoch=8", "optim.max_steps=6", "optim.warmup_steps=1", "tracking.log_interval=6",
        "checkpoint.interval_steps=6", "tracking.system_metrics_interval_s=0",
    ])  # fmt: skip
    result = train(cfg)
    metrics = MlflowClient(uri).get_run(result.mlflow_run_id).data.metrics
    assert metrics["data/shard_errors"] >= 1 and metrics["data/shards_empty"] >= 1
    assert metrics["data/samples_bad"] == 0 and metrics["data/bad_fraction"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_stream_without_one_decodable_sample_stops_even_when_bad_samples_are_tolerated(tmp_path,
                                                                                                num_workers):
    """data.max_bad_fraction=1.0 tolerates any fraction of bad samples, but a stream in which none decodes can never
    fill a batch: it drew and skipped samples forever."""
    import webdataset as wds

    meta = json.dumps({"caption": "c", "duration": 1.0}).encode()
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as tar:
        for i in range(3):
            tar.write({"__key__": f"bad{i}", "mp4": b"not a video", "json": meta})
    cfg = data_cfg(str(tmp_path), max_bad_fraction=1.0, bad_check_min_samples=20, num_workers=num_workers)
    with pytest.raises(DataQualityError, match=r"none of the \d+ samples read so far could be decoded"):
        next(iter(build_loader(cfg, "train", 0, 1)))
