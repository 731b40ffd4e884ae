"""Data parallelism is exact: ZeRO 1, 2 and 3 on 2 gloo ranks equal one process holding the whole global batch.

Three spawned processes run the real `Trainer` (DeepSpeed on CPU, gloo): ranks 0 and 1 of a 2-process group, each
fed its half of every global micro-batch, and a reference process (world 1) fed whole global micro-batches. Same
seed (same initial weights), same global batch, gradient accumulation and clipping on. Per-step loss and gradient
norm (both reduced over ranks by the engine) and the exported weights must agree within fp32 reduction-order noise.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests._spawn import free_port, run_spawned

GLOBAL_MICRO_BATCH = 8
ACCUM = 2
STEPS = 4
STAGES = (1, 2, 3)


def global_micro_batch(k: int) -> dict[str, torch.Tensor]:
    """The k-th global micro-batch of the toy regression (inputs and a fixed linear target)."""
    gen = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(GLOBAL_MICRO_BATCH, 16, generator=gen)
    y = x @ torch.linspace(-1, 1, 16 * 4).reshape(16, 4)
    return {"x": x, "y": y, "position": torch.tensor(k)}


def rank_batches(rank: int, world: int):
    """Rank `rank`'s contiguous slice of every global micro-batch, forever."""
    rows = GLOBAL_MICRO_BATCH // world
    k = 0
    while True:
        batch = global_micro_batch(k)
        yield {"x": batch["x"][rank * rows : (rank + 1) * rows], "y": batch["y"][rank * rows : (rank + 1) * rows],
               "position": batch["position"]}  # fmt: skip
        k += 1


def run_worker(index: int, out_dir: str, port: int) -> None:
    """Process body: index 0/1 = ranks of the 2-process group; index 2 = the one-process reference."""
    from pipeline.config import load_config
    from pipeline.engine import Trainer

    world = 1 if index == 2 else 2
    rank = 0 if index == 2 else index
    if world == 2:  # the launcher's rendezvous, as torchrun sets it
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for stage in STAGES:
        tag = f"zero{stage}_world{world}"
        cfg = load_config(None, [
            "task.name=toy", f"stage={tag}", "scaling.use_ray=false", f"output_dir={out_dir}/{tag}",
            f"checkpoint.path={out_dir}/ckpt", "tracking.enabled=false", f"deepspeed.zero_stage={stage}",
            f"data.batch_size={GLOBAL_MICRO_BATCH // world}", f"deepspeed.grad_accum_steps={ACCUM}",
            "deepspeed.grad_clip=0.5", "optim.lr=0.05", "optim.warmup_steps=1", f"optim.max_steps={STEPS}",
            "optim.weight_decay=0.01", "checkpoint.resume=false", "deepspeed.precision=fp32",
        ])  # fmt: skip
        trainer = Trainer(cfg, store=None)
        trainer.batches = rank_batches(rank, world)
        losses, grad_norms = [], []
        for _ in range(STEPS):
            trainer.train_step()
            trainer.log_metrics(force=True)  # reduces the window over ranks
            losses.append(trainer.last_metrics["train/loss"])
            grad_norms.append(trainer.last_metrics["train/grad_norm"])
        export = trainer.export()  # ZeRO-3: gathered from both ranks
        results[stage] = {"losses": losses, "grad_norms": grad_norms, "export": export}
    torch.save(results, f"{out_dir}/results_{index}.pt")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_zero_1_2_3_on_two_ranks_equal_one_process(tmp_path):
    run_spawned(run_worker, (str(tmp_path), free_port()), nprocs=3, deadline_s=200)

    reference = torch.load(tmp_path / "results_2.pt")
    ranks = torch.load(tmp_path / "results_0.pt")
    for stage in STAGES:
        ref, got = reference[stage], ranks[stage]
        assert ref["losses"][-1] < ref["losses"][0], ref["losses"]  # it trains
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-5,
                                   atol=1e-7)  # fmt: skip
        ref_weights = torch.load(ref["export"])["state_dict"]
        got_weights = torch.load(got["export"])["state_dict"]
        assert sorted(got_weights) == sorted(ref_weights)
        for key, value in ref_weights.items():
            torch.testing.assert_close(got_weights[key], value, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {key}")
