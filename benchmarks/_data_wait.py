"""The data wait of a Stage 1 run (VideoMamba-S student, CLIP ViT-B/16 teacher, CUDA graphs) fed by the real
training loader from S3 shards on a moto server, on one GPU; and that moto server for bench_data.py.

The step is built as benchmarks/bench_masked.py builds it (the stage config's task cast to bf16, the pipeline's
AdamW; no DeepSpeed or Ray, which the GPU image lacks). The loop does what the engine's does per step
(pipeline/engine.py): wait for the next batch (timed: the data wait), copy it to the GPU, forward + backward +
optimizer step, read the loss (a host sync, as the engine's finiteness check). The same steps on one batch held on
the GPU give the step time without the loader, in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import replace

import torch


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An in-process moto S3 server with a bucket `bench`; s3fs (and loader workers) reach it by AWS_ENDPOINT_URL."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("bench")
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()


def stage1_data_wait(shards: str, workers: int, batch: int, steps: int, warmup: int = 5, device: str = "cuda",
                     model: str | None = None, img_size: int = 224, backend: str = "triton") -> dict:  # fmt: skip
    """Step and data-wait times of Stage 1 VideoMamba-S (CUDA graphs on a GPU) fed from `shards` by `workers`
    loader processes. `model`, `img_size` and `backend` shrink it for a CPU check (videomamba_test, 32, ref)."""
    from bench_masked import build

    from pipeline.data.reader import build_loader

    device = torch.device(device)
    args = Namespace(backend=backend, batch=batch, img_size=img_size, model=model)
    task, optimizer, cfg = build("s", args, device, cuda_graph=device.type == "cuda")
    dtype = next(task.parameters()).dtype

    def step(batch_on_gpu: dict) -> float:
        loss = task(batch_on_gpu)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    held = {"video": torch.randn(batch, 3, cfg.data.num_frames, img_size, img_size, device=device, dtype=dtype)}
    for _ in range(warmup):
        step(held)
    in_memory = []
    for _ in range(steps):
        start = time.perf_counter()
        step(held)
        in_memory.append(time.perf_counter() - start)

    data_cfg = replace(cfg.data, train_shards=shards, num_workers=workers, batch_size=batch, samples_per_epoch=None,
                       shuffle_buffer=64)  # fmt: skip
    batches = iter(build_loader(data_cfg, "train", rank=0, world_size=1))
    waits, totals = [], []
    for index in range(warmup + steps):
        start = time.perf_counter()
        loaded = next(batches)
        waited = time.perf_counter() - start
        on_gpu = {k: v.to(device, non_blocking=True) for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        on_gpu = {k: v.to(dtype) if v.is_floating_point() else v for k, v in on_gpu.items()}
        step(on_gpu)
        if index >= warmup:  # the first batches include the loader workers' start
            waits.append(waited)
            totals.append(time.perf_counter() - start)
    stage = f"Stage 1 {cfg.model.name}" + (", CUDA graphs" if device.type == "cuda" else "")
    return {"stage": stage, "batch": batch, "loader_workers": workers,
            "source": "S3 (moto) shards, preprocessed 720p long-GOP", "steps": steps,
            "step_ms_in_memory": 1e3 * statistics.median(in_memory), "step_ms_with_loader": 1e3 * sum(totals) / steps,
            "data_wait_ms": 1e3 * sum(waits) / steps, "data_wait_fraction": sum(waits) / sum(totals),
            "clips_per_s_with_loader": batch * steps / sum(totals)}  # fmt: skip
