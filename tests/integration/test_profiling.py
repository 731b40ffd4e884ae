"""The communication profile: interval arithmetic against a brute-force grid, and real 1- and 2-rank gloo runs of
the Trainer whose profiled windows find the second rank's gradient exchange."""

from __future__ import annotations

import gzip
import json
import os
import random
import socket

import pytest
import torch.multiprocessing as mp

from pipeline.config import ConfigError, load_config
from pipeline.profiling import communication_fractions, merged, total, uncovered


def grid_length(intervals, predicate, resolution=0.01):
    """Length of the points of [0, 10) on a fine grid for which `predicate(inside any interval)` holds."""
    hits = 0
    for i in range(int(10 / resolution)):
        x = (i + 0.5) * resolution
        hits += predicate(x, intervals)
    return hits * resolution


def inside(x, intervals):
    return any(s <= x < e for s, e in intervals)


def random_intervals(rng, count):
    out = []
    for _ in range(count):
        start = round(rng.uniform(0, 9), 2)
        out.append((start, round(min(10.0, start + rng.uniform(0.05, 2)), 2)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_union_and_uncovered_lengths_match_a_grid(seed):
    rng = random.Random(seed)
    comm, compute = random_intervals(rng, 6), random_intervals(rng, 8)
    assert all(a[1] < b[0] for a, b in zip(merged(comm), merged(comm)[1:], strict=False))  # disjoint and sorted
    assert total(comm) == pytest.approx(grid_length(comm, inside), abs=0.011)
    outside = grid_length(comm, lambda x, _: inside(x, comm) and not inside(x, compute))
    assert uncovered(comm, compute) == pytest.approx(outside, abs=0.011)


def test_fractions_of_the_wall_time():
    fractions = communication_fractions([(0, 4), (2, 6)], [(5, 8)], wall=10)
    assert fractions == {"profile/comm_busy_fraction": 0.6, "profile/comm_exposed_fraction": 0.5,
                         "profile/compute_busy_fraction": 0.3}  # fmt: skip
    with pytest.raises(ValueError, match="wall time must be positive"):
        communication_fractions([], [], wall=0)


def test_profile_settings_are_checked():
    with pytest.raises(ConfigError, match="tracking.profile_start must be >= 0"):
        load_config(None, ["task.name=toy", "tracking.profile_start=-1"])
    with pytest.raises(ConfigError, match="profiles up to step 12, past optim.max_steps=10"):
        window = ["tracking.profile_start=10", "tracking.profile_steps=3"]
        load_config(None, ["task.name=toy", "optim.max_steps=10", *window])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.engine import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = load_config(None, [
        "task.name=toy", f"stage=profile_w{world}", "scaling.use_ray=false", f"output_dir={out_dir}/w{world}",
        f"checkpoint.path={out_dir}/ckpt_w{world}", "tracking.enabled=false", "deepspeed.zero_stage=2",
        "data.batch_size=8", "optim.max_steps=5", "checkpoint.interval_steps=100", "tracking.profile_start=3",
        "tracking.profile_steps=2", "deepspeed.precision=fp32",
    ])  # fmt: skip
    result = train(cfg)
    if rank == 0:
        with open(f"{out_dir}/metrics_w{world}.json", "w") as f:
            json.dump(result.metrics, f)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_profiled_window_finds_the_collectives_of_two_ranks(tmp_path):
    for world in (1, 2):
        mp.spawn(_train, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    one, two = (json.loads((tmp_path / f"metrics_w{w}.json").read_text()) for w in (1, 2))
    # One rank still calls DeepSpeed's (trivial) collectives; two ranks exchange gradients over loopback.
    assert 2 * one["profile/comm_busy_fraction"] < two["profile/comm_busy_fraction"] < 1.0
    # gloo blocks the process: nothing overlaps a CPU collective, so all of it is exposed
    assert two["profile/comm_exposed_fraction"] == pytest.approx(two["profile/comm_busy_fraction"])
    assert two["profile/step_s"] > 0
    (trace,) = (tmp_path / "w2" / "profile").iterdir()
    assert trace.name == "rank0_steps3-4.json.gz"
    names = {event.get("name", "") for event in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert any(name.startswith("c10d::") for name in names)
