"""Storage faults on a real (moto) S3 server: an output folder given as a URL, a bucket that does not exist, and
access denied to checkpoints and exports (moto enforcing IAM, as for data reads in tests/unit/test_data_faults.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkpointing import latest_checkpoint, layout, write_run_record
from pipeline.config import ConfigError, load_config
from pipeline.jobs_common import run_training_job

TOY = "configs/stages/toy.yaml"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("loader", ["stage", "retrieval", "classification", "recipe"])
def test_an_output_folder_given_as_a_url_is_refused_at_load(tmp_path, monkeypatch, loader):
    """`output_dir=s3://...` became a folder `./s3:/...` on rank 0's disk; the error says what to use instead."""
    from pipeline.evaluation.cls_config import load_cls_eval_config
    from pipeline.evaluation.config import load_eval_config
    from pipeline.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    url = "s3://bucket/runs/mask"
    load = {
        "stage": lambda: run_training_job("toy", ["--config", f"{REPO}/{TOY}", f"output_dir={url}", "--dry-run"]),
        "retrieval": lambda: load_eval_config(None, [f"output_dir={url}"]),
        "classification": lambda: load_cls_eval_config(None, [f"output_dir={url}"]),
        "recipe": lambda: load_recipe(f"{REPO}/configs/recipes/demo_cpu.yaml", [f"out_dir={url}"]),
    }[loader]
    key = "out_dir" if loader == "recipe" else "output_dir"
    with pytest.raises(ConfigError, match=rf"{key}: 's3://bucket/runs/mask' is a URL, but {key} must be a local "
                                          r"folder .*checkpoint.path=s3://.*jobs/export_checkpoint.py"):
        load()
    assert list(tmp_path.iterdir()) == []  # no ./s3: folder


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", ["checkpoint.path", "tracking.artifact_location"])
def test_a_missing_bucket_stops_the_dry_run_and_is_never_created(moto_s3, tmp_path, key):
    """s3fs (and Ray's fsspec storage) created a bucket named by a typo on the first write."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("runs-bucket")
    args = ["--config", TOY, f"output_dir={tmp_path}/out"]
    with pytest.raises(ConfigError, match=rf"{key}: the bucket 'runs-bukcet' of s3://runs-bukcet/videomamba does "
                                          r"not exist; fix the name or create the bucket .* never creates buckets"):
        run_training_job("toy", [*args, f"{key}=s3://runs-bukcet/videomamba", "--dry-run"])
    s3fs.S3FileSystem.clear_instance_cache()
    assert not s3fs.S3FileSystem().exists("runs-bukcet")
    run_training_job("toy", [*args, f"{key}=s3://runs-bucket/videomamba", "--dry-run"])  # an existing one passes


@pytest.mark.timeout(60)
def test_the_run_record_never_creates_a_bucket(moto_s3):
    """The driver's record write went through s3fs's makedirs, which creates a missing bucket."""
    import s3fs

    cfg = load_config(None, ["task.name=toy", "stage=toy", "checkpoint.path=s3://gone-bucket/runs"])
    with pytest.raises(FileNotFoundError):
        write_run_record(cfg, {"step": 1})
    assert not s3fs.S3FileSystem().exists("gone-bucket")


@pytest.fixture
def s3_run_and_iam_users(moto_s3, monkeypatch):
    """A run folder s3://ckpt-iam/runs/toy with one complete-looking checkpoint; IAM users `nobody` (no policy),
    `manifest_reader` (list, and get only checkpoint.json) and `reader` (list and get); moto enforcing IAM.
    Yields `use(user)`, which switches this process's environment credentials to that user."""
    import boto3
    import s3fs
    from moto.core.authorization import enable_iam_authentication

    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpt-iam")
    root = f"ckpt-iam/runs/toy/{layout.checkpoint_dir_name(10)}"
    fs.pipe({f"{root}/{layout.MANIFEST}": json.dumps(layout.manifest(10, 1, 0, False)).encode(),
             f"{root}/{layout.CONFIG}": b"{}", f"{root}/{layout.LATEST}": b"state",
             f"{root}/{layout.DEEPSPEED_TAG}/{layout.MODEL_STATES[0]}": b"x",
             f"{root}/{layout.rank_state_name(0)}": b"x"})
    iam = boto3.client("iam")
    keys = {}
    manifests = f"arn:aws:s3:::ckpt-iam/runs/toy/*/{layout.MANIFEST}"
    users = {"nobody": [], "manifest_reader": [("s3:ListBucket", "*"), ("s3:GetObject", manifests)],
             "reader": [("s3:ListBucket", "*"), ("s3:GetObject", "*")]}
    for user, grants in users.items():
        iam.create_user(UserName=user)
        if grants:
            statements = [{"Effect": "Allow", "Action": action, "Resource": resource} for action, resource in grants]
            policy = {"Version": "2012-10-17", "Statement": statements}
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        keys[user] = iam.create_access_key(UserName=user)["AccessKey"]

    def use(user: str) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[user]["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[user]["SecretAccessKey"])
        s3fs.S3FileSystem.clear_instance_cache()

    with enable_iam_authentication():
        yield use


_FROM_ENV = r"this process's s3 credentials come from the environment \(AWS_ACCESS_KEY_ID"
_DENIED = r"\((Access Denied|Forbidden)\)"  # s3fs's words for a 403 with a body, and for one without (HEAD)


@pytest.mark.timeout(120)
def test_access_denied_to_checkpoints_names_the_object_and_the_credentials(s3_run_and_iam_users):
    """s3fs said only "Access Denied" (listing the run for resume, writing or reading its record)."""
    use = s3_run_and_iam_users
    cfg = load_config(None, ["task.name=toy", "stage=toy", "checkpoint.path=s3://ckpt-iam/runs"])
    use("nobody")
    with pytest.raises(PermissionError, match=rf"access denied to s3://ckpt-iam/runs/toy {_DENIED}: .* may not list "
                                              rf"it; {_FROM_ENV}"):
        latest_checkpoint(cfg)
    use("reader")
    assert latest_checkpoint(cfg) == "s3://ckpt-iam/runs/toy/checkpoint_00000010"
    with pytest.raises(PermissionError, match=rf"access denied to s3://ckpt-iam/runs/toy/result.json "
                                              rf"\(Access Denied\): .* may not write it; {_FROM_ENV}"):
        write_run_record(cfg, {"step": 10})


@pytest.mark.timeout(120)
def test_access_denied_to_an_export_source_or_target_names_the_object(s3_run_and_iam_users, tmp_path):
    from pipeline.checkpointing.export import export_checkpoint

    use = s3_run_and_iam_users
    use("manifest_reader")  # may find the checkpoint, not download it
    with pytest.raises(PermissionError, match=rf"access denied to s3://ckpt-iam/runs/toy/checkpoint_00000010 "
                                              rf"{_DENIED}: .* may not read it; {_FROM_ENV}"):
        export_checkpoint("s3://ckpt-iam/runs/toy", str(tmp_path / "model.pt"))
    use("nobody")
    with pytest.raises(PermissionError, match=rf"access denied to s3://ckpt-iam/runs/toy {_DENIED}: .* may not list "
                                              r"it"):
        export_checkpoint("s3://ckpt-iam/runs/toy", "s3://ckpt-iam/exports/model.pt")


def test_the_credential_source_is_named(monkeypatch, tmp_path):
    from pipeline.access import s3_credential_source

    assert s3_credential_source({"key": "k", "secret": "s"}) == "the key and secret in storage_options"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    assert s3_credential_source().startswith("the environment")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text("[team]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = x\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    assert s3_credential_source({"profile": "team"}).startswith("~/.aws/credentials")
