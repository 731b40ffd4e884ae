"""Shared test fixtures: a real local S3 server (moto), tiny real video shards, an offline Hugging Face cache."""

from __future__ import annotations

import urllib.request

import pytest


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 (random port) with dummy credentials; yields the endpoint URL.

    s3fs/boto3 find it through AWS_ENDPOINT_URL, exactly as they would find a real endpoint.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # moto keeps its buckets and IAM users in process-wide state: each test starts from an empty server
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        s3fs.S3FileSystem.clear_instance_cache()  # instances cache the endpoint they were built with
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A tiny synthetic set written through the real writer: 12 clips (8 train in 4 shards, 4 eval in 4 shards),
    8 frames of 32x32 px. Returns make_synthetic's dict of paths."""
    from pipeline.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("tiny_synthetic")
    return make_synthetic(str(root), num_videos=12, split_ratio=8 / 12, seed=3, num_frames=8, size=32, shard_size=2)


@pytest.fixture(scope="module")
def footage() -> dict[str, bytes]:
    """Every kind of test footage (pipeline/data/footage.py) at 96x64 for 1 s: the properties under test do not
    depend on the size."""
    from pipeline.data.footage import FOOTAGE, render_footage, small

    return {name: render_footage(small(spec)) for name, spec in FOOTAGE.items()}


@pytest.fixture
def offline_clip_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and a Hugging Face cache that holds open_clip's ViT-B-16 `openai` weights file, laid out as
    `huggingface-cli download timm/vit_base_patch16_clip_224.openai` leaves it (a placeholder file: dry runs look
    the weights up, they do not load them). Returns the cache folder."""
    from huggingface_hub import constants

    root = tmp_path / "hf_hub_cache"
    repo = root / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors").write_bytes(b"placeholder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root
