"""Credentials in a config never reach MLflow params, the config artifact, a checkpoint's config or printed output."""

from __future__ import annotations

import os
import threading

import pytest

from pipeline.config import load_config, to_yaml
from pipeline.redaction import is_secret_key, redact, redact_text

SECRETS = ("pw-in-url-9d1", "s3cr3t-from-env-77", "AKIA-EXAMPLE-ID", "tok-from-env-4242", "mlflow-pass-55")


@pytest.mark.parametrize(
    "name",
    ["aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "hf_token", "token", "api_key", "apiKey", "access_key",
     "db_password", "PASSWORD", "client_secret", "private_key", "credentials", "AWS_SESSION_TOKEN",
     "connection_string", "AZURE_STORAGE_CONNECTION_STRING", "passphrase", "key_passphrase", "AccountKey",
     "sas_token", "MYSQL_PWD"],
)  # fmt: skip
def test_secret_key_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize(
    "name", ["keep", "key_frames", "keys", "max_tokens", "tokenizer", "num_tokens", "monkey", "key", "log_interval",
             "connection_timeout", "string_length", "signal", "account_name", "keyFrames"]
)
def test_non_secret_key_names(name):
    assert not is_secret_key(name)


def test_fs_option_key_and_urls():
    tree = {"storage_options": {"key": "AKIA", "secret": "x", "endpoint_url": "http://u:p4ss@minio:9000"}, "key": 3}
    assert redact(tree) == {"storage_options": {"key": "***", "secret": "***", "endpoint_url": "http://u:***@minio:9000"},
                            "key": 3}  # fmt: skip
    assert redact_text("s3://user:pw@bucket/x and https://host/a@b") == "s3://user:***@bucket/x and https://host/a@b"


def test_working_directory_variable_is_not_a_secret(tmp_path, monkeypatch):
    """The shell's PWD holds the working directory: masked as a "password", every path under it became ***."""
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", str(tmp_path / "before"))
    assert redact_text(f"{tmp_path}/out/config.yaml") == f"{tmp_path}/out/config.yaml"
    cfg = load_config(None, [f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt"])
    assert redact({"output_dir": cfg.output_dir}) == {"output_dir": f"{tmp_path}/out"}
    assert f"path: {tmp_path}/ckpt" in to_yaml(cfg)
    monkeypatch.setenv("MYSQL_PWD", "a-real-db-password")  # a *PWD variable with more to its name still is one
    assert redact_text("mysql://db/a-real-db-password") == "mysql://db/***"


def test_url_tokens_connection_strings_and_signed_queries_are_masked():
    azure = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0+/k==;EndpointSuffix=core.windows.net"
    assert redact_text(azure) == "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=***;EndpointSuffix=" \
                                 "core.windows.net"
    assert redact({"storage_options": {"connection_string": azure, "account_name": "acct"}}) == {
        "storage_options": {"connection_string": "***", "account_name": "acct"}}
    assert redact({"ssh": {"passphrase": "open sesame"}}) == {"ssh": {"passphrase": "***"}}
    assert redact_text("git clone https://ghp_tok3n@github.com/org/repo") == "git clone https://***@github.com/org/repo"
    assert redact_text("https://oauth2:glpat-x1@gitlab.com/r") == "https://oauth2:***@gitlab.com/r"
    sas = "https://acct.blob.core.windows.net/shards/a.tar?sv=2022-11-02&sp=r&sig=AbC%2Fd3F&se=2026-01-01"
    assert redact_text(sas) == "https://acct.blob.core.windows.net/shards/a.tar?sv=2022-11-02&sp=r&sig=***&se=2026-01-01"
    assert redact_text("override checkpoint.storage_options.secret=s3kr1t lr=0.1") == \
        "override checkpoint.storage_options.secret=*** lr=0.1"
    assert redact_text("write to ops@example.com, key=3") == "write to ops@example.com, key=3"  # nothing secret


def secret_config(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_SECRET_KEY", SECRETS[1])
    monkeypatch.setenv("MY_API_TOKEN", SECRETS[3])
    (tmp_path / "run.yaml").write_text(
        "stage: toy\ntask: {name: toy}\n"
        f"output_dir: {tmp_path}/out\n"
        "checkpoint:\n"
        f"  path: s3://user:{SECRETS[0]}@bucket/ckpt\n"
        f"  storage_options: {{key: {SECRETS[2]}, secret: '${{S3_SECRET_KEY}}'}}\n"
        "data: {eval_shards: 'https://host/eval.tar?sig=${MY_API_TOKEN}', batch_size: 4}\n"
    )
    return load_config(tmp_path / "run.yaml", [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, secret


@pytest.mark.timeout(120)
def test_mlflow_params_and_config_artifact_are_redacted(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RunTracker

    cfg = secret_config(tmp_path, monkeypatch)
    assert cfg.checkpoint.storage_options["secret"] == SECRETS[1]  # the workers still get the real values
    tracker = RunTracker(cfg)
    run_id = tracker.start()
    tracker.end()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    params = client.get_run(run_id).data.params
    assert_no_secret(repr(params))
    assert params["checkpoint.path"] == "s3://user:***@bucket/ckpt"
    assert params["checkpoint.storage_options.secret"] == "***" and params["data.batch_size"] == "4"
    assert params["data.eval_shards"] == "https://host/eval.tar?sig=***"
    artifact = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    text = open(artifact).read()
    assert_no_secret(text)
    assert "s3://user:***@bucket/ckpt" in text and "batch_size: 4" in text


@pytest.mark.timeout(120)
def test_printed_config_plan_and_saved_config_are_redacted(tmp_path, monkeypatch, capsys, moto_s3):
    import s3fs

    from pipeline.jobs_common import run_training_job

    s3fs.S3FileSystem().mkdir("bucket")  # the checkpoint bucket must exist for the dry run to plan
    secret_config(tmp_path, monkeypatch)  # sets the environment
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS[4])
    argv = ["--config", str(tmp_path / "run.yaml"), f"tracking.uri=http://admin:{SECRETS[4]}@mlflow:5000",
            "--dry-run"]  # fmt: skip
    assert run_training_job("test", argv) is None
    out = capsys.readouterr().out
    assert_no_secret(out)
    assert "s3://user:***@bucket/ckpt/toy" in out and "http://admin:***@mlflow:5000" in out  # config and plan
    assert_no_secret((tmp_path / "out" / "config.yaml").read_text())


def test_redaction_survives_another_thread_changing_the_environment():
    """Ray workers run MLflow's telemetry thread, which unsets a variable while the engine redacts its config;
    iterating os.environ meanwhile raised KeyError (about 1 in 1000 copies here, measured)."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["_VIDEOMAMBA_TEST_CHURN"] = "x"
            del os.environ["_VIDEOMAMBA_TEST_CHURN"]

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(10000):
            assert redact_text("plain text") == "plain text"
    finally:
        stop.set()
        thread.join()
