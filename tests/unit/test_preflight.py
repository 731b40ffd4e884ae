"""The dry run checks the weight files, offline CLIP weights and shards a config names (pipeline/preflight.py)."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.urls import expand_shard_urls
from pipeline.jobs_common import run_training_job
from pipeline.preflight import check_shards, check_weights


def stage1(tmp_path, *overrides):
    return load_config("configs/stages/pretrain_mask_test.yaml", [f"output_dir={tmp_path}/out", *overrides])


def test_missing_weight_files_stop_the_dry_run(tmp_path):
    argv = ["--config", "configs/stages/pretrain_mask_test.yaml", f"output_dir={tmp_path}/out",
            f"model.pretrained={tmp_path}/no_such_backbone.pt", "--dry-run"]  # fmt: skip
    with pytest.raises(ConfigError, match=rf"model\.pretrained: '{tmp_path}/no_such_backbone\.pt' does not exist on "
                                          r"this machine; it must be a local file on every node"):
        run_training_job("stage 1", argv)
    assert not (tmp_path / "out" / "config.yaml").exists()
    with pytest.raises(ConfigError, match=r"task\.teacher_checkpoint: '/nope/t\.pt' does not exist"):
        check_weights(load_config("configs/stages/self_distill_test.yaml", ["task.teacher_checkpoint=/nope/t.pt"]))
    with pytest.raises(ConfigError, match=r"task\.teacher\.pretrained: 'opnai' does not exist on this machine; .* or "
                                          r"one of open_clip's tags for ViT-B-16"):
        check_weights(stage1(tmp_path, "task.teacher.pretrained=opnai", "task.teacher.vision_overrides={}"))
    with pytest.raises(ConfigError, match=r"model\.pretrained: 's3://b/m\.pt' is a URL; it must be a local file"):
        check_weights(stage1(tmp_path, "model.pretrained=s3://b/m.pt"))
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"weights")
    assert check_weights(stage1(tmp_path, f"model.pretrained={backbone}")) == [f"model.pretrained: {backbone} (file)"]


def test_offline_clip_tag_must_be_in_the_hugging_face_cache(tmp_path, offline_clip_cache, monkeypatch):
    """HF_HUB_OFFLINE=1 with `pretrained: openai` and an empty cache failed only when every worker built its teacher."""
    cfg = stage1(tmp_path, "task.teacher.pretrained=openai", "task.teacher.vision_overrides={}")
    note = check_weights(cfg)[0]
    assert note.startswith("task.teacher.pretrained: open_clip ViT-B-16/openai (")
    assert note.endswith("snapshots/0123abcd/open_clip_model.safetensors)")
    shutil.rmtree(offline_clip_cache)
    with pytest.raises(ConfigError, match=r"task\.teacher\.pretrained: open_clip weights ViT-B-16/'openai' are not in "
                                          r"the local Hugging Face cache and HF_HUB_OFFLINE is set .*huggingface-cli "
                                          r"download timm/vit_base_patch16_clip_224\.openai"):
        check_weights(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_weights(cfg) == ["task.teacher.pretrained: open_clip ViT-B-16/openai (from the Hugging Face hub or "
                                  "its cache)"]  # online the download is left to open_clip


def test_local_shards_are_listed_and_missing_ones_named(tiny_synthetic, tmp_path):
    for url in expand_shard_urls(tiny_synthetic["train_shards"])[:2]:
        shutil.copy(url, tmp_path)
    assert check_shards("data.train_shards", str(tmp_path)) == "data.train_shards: 2 shards found"
    assert check_shards("data.train_shards", f"{tmp_path}/train-{{000000..000001}}.tar") == \
        "data.train_shards: 2 shards found"
    with pytest.raises(ConfigError, match=rf"data\.train_shards: 2 of the 4 shards .* names do not exist: "
                                          rf"{tmp_path}/train-000002\.tar, {tmp_path}/train-000003\.tar"):
        check_shards("data.train_shards", f"{tmp_path}/train-{{000000..000003}}.tar")
    with pytest.raises(ConfigError, match=r"data\.eval_shards: 1 of the 1 shards .* names do not exist"):
        check_shards("data.eval_shards", [f"{tmp_path}/elsewhere/eval-000000.tar"])
    with pytest.raises(ConfigError, match=r"data\.eval_shards: no shards found for"):
        check_shards("data.eval_shards", str(tmp_path / "empty_dir"))
    argv = ["--config", "configs/stages/pretrain_mask_test.yaml", f"output_dir={tmp_path}/out",
            f"data.train_shards={tmp_path}/train-{{000000..000009}}.tar", "--dry-run"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.train_shards: 8 of the 10 shards"):
        run_training_job("stage 1", argv)


@pytest.mark.timeout(120)
def test_s3_shards_are_checked_with_one_listing(moto_s3, tiny_synthetic, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("shards")
    for url in expand_shard_urls(tiny_synthetic["train_shards"])[:3]:
        fs.put(url, f"shards/k400/{url.rsplit('/', 1)[1]}")
    assert check_shards("data.train_shards", "s3://shards/k400/train-{000000..000002}.tar") == \
        "data.train_shards: 3 shards found"
    with pytest.raises(ConfigError, match=r"data\.train_shards: 1 of the 4 shards .* s3://shards/k400/train-000003"):
        check_shards("data.train_shards", "s3://shards/k400/train-{000000..000003}.tar")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    note = check_shards("data.train_shards", "s3://shards/k400/train-{000000..000003}.tar")
    assert note.startswith("data.train_shards: not checked, s3://shards/k400/train-{000000..000003}.tar is not "
                           "readable from here (NoCredentialsError")


def test_signed_http_shard_urls_are_shards_and_are_not_listed():
    signed = "https://acct.blob.core.windows.net/c/train-{0..1}.tar?sv=2022&sig=abc"
    assert expand_shard_urls(signed) == ["https://acct.blob.core.windows.net/c/train-0.tar?sv=2022&sig=abc",
                                         "https://acct.blob.core.windows.net/c/train-1.tar?sv=2022&sig=abc"]
    assert check_shards("data.train_shards", signed) == (
        "data.train_shards: not checked, https://acct.blob.core.windows.net/c/train-{0..1}.tar?sv=2022&sig=*** names "
        "http(s) URLs, which cannot be listed")
