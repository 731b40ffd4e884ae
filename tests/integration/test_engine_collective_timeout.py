"""A stalled rank fails the group within `scaling.collective_timeout_s`, once the first step is done.

Two spawned processes run the real `Trainer` (DeepSpeed ZeRO-2 on CPU, gloo) as ranks 0 and 1. Before the first
step every process group keeps the launcher's timeout; after it, every group, DeepSpeed's own included, has the
configured one. Then rank 1 stalls before its second step, and rank 0's second step must fail in about that
time, instead of waiting out gloo's default 30 minutes (the test's own timeout would end that first).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests._spawn import free_port, run_spawned

TIMEOUT_S = 3.0
STALL_S = 20.0


def group_timeouts_s() -> list[float]:
    """The collective timeout of every process group of this process, in seconds (gloo backends)."""
    from torch.distributed import distributed_c10d as c10d

    return [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for pg in c10d._world.pg_map]


def run_rank(rank: int, out_dir: str, port: int) -> None:
    from pipeline.config import load_config
    from pipeline.engine import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = load_config(None, [
        "task.name=toy", "stage=timeout", "scaling.use_ray=false", f"output_dir={out_dir}/out",
        f"checkpoint.path={out_dir}/ckpt", "tracking.enabled=false", "deepspeed.zero_stage=2",
        "deepspeed.precision=fp32", "data.batch_size=4", "optim.max_steps=10", "checkpoint.resume=false",
        f"scaling.collective_timeout_s={TIMEOUT_S}",
    ])  # fmt: skip
    trainer = Trainer(cfg, store=None)
    report = {"before": group_timeouts_s()}
    trainer.train_step()
    report["after"] = group_timeouts_s()
    if rank == 1:
        time.sleep(STALL_S)
    start = time.monotonic()
    try:
        trainer.train_step()
        report["second_step"] = "completed"
    except Exception as err:  # noqa: BLE001 - what the stalled collective raised is the result
        report["second_step"] = f"{type(err).__name__}: {err}"
    report["second_step_s"] = time.monotonic() - start
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stalled_rank_fails_the_group_within_the_collective_timeout(tmp_path):
    run_spawned(run_rank, (str(tmp_path), free_port()), nprocs=2, deadline_s=150)

    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    # The launcher's groups (the default one and DeepSpeed's clone of it, at least) keep gloo's 30 minutes until
    # the first step is done, then all of them have the configured timeout.
    assert len(rank0["before"]) >= 2, rank0
    assert all(t == 1800 for t in rank0["before"]), rank0["before"]
    assert rank0["after"] == [TIMEOUT_S] * len(rank0["before"]), rank0["after"]
    # Rank 0's second step waited on the stalled rank 1 and failed after about the timeout, long before the stall
    # ended.
    assert rank0["second_step"] != "completed", rank0
    assert "timed out" in rank0["second_step"].lower(), rank0["second_step"]
    assert TIMEOUT_S - 0.5 < rank0["second_step_s"] < STALL_S - 5, rank0
