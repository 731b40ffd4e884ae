"""The engine on the local (no Ray) path with the toy task: learning, exact resume, MLflow, non-finite policy."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.engine import NonFiniteError, train


def toy_cfg(tmp_path, *overrides: str):
    base = [
        "task.name=toy", "stage=toy", "scaling.use_ray=false", f"output_dir={tmp_path}/out",
        f"checkpoint.path={tmp_path}/ckpt", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "data.batch_size=16", "deepspeed.zero_stage=2", "optim.lr=0.03", "optim.weight_decay=0.0",
        "tracking.log_interval=10", "checkpoint.interval_steps=10",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


def history(tmp_path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.timeout(240)
def test_loss_decreases_metrics_logged_and_resume_is_exact(tmp_path):
    constant_lr = ["optim.warmup_steps=0", "optim.min_lr=0.03"]  # so a run can be extended without a new schedule
    straight = train(toy_cfg(tmp_path, "tracking.run_name=straight", "optim.max_steps=40", "scaling.peak_tflops=0.5",
                             *constant_lr))  # fmt: skip
    # model FLOPs: 6 per multiply-add (fwd + bwd) x (16*32 + 32*4) MACs per sample
    m = straight.metrics
    assert m["train/tflops_per_worker"] == pytest.approx(6 * (16 * 32 + 32 * 4) * m["train/clips_per_s"] / 1e12)
    assert m["train/mfu"] == pytest.approx(m["train/tflops_per_worker"] / 0.5)

    losses = history(tmp_path, straight.mlflow_run_id, "train/loss")
    assert [s for s, _ in losses] == [10, 20, 30, 40]
    assert losses[-1][1] < 0.3 * losses[0][1], losses
    for key in ("train/lr", "train/grad_norm", "train/clips_per_s", "train/data_wait_fraction", "train/memory_gib",
                "train/mse", "train/mae", "train/tflops_per_worker", "eval/mse"):  # fmt: skip
        assert history(tmp_path, straight.mlflow_run_id, key), key
    assert straight.metrics["eval/mse"] < 0.5 * losses[0][1]
    exported = torch.load(straight.export_path)
    assert exported["meta"]["model_name"] == "toy_mlp" and exported["meta"]["step"] == 40
    assert sorted(exported["state_dict"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]

    # The same run in two launches (stop at 20, rerun to 40) must match the straight run exactly:
    # optimizer, scheduler, step counter, data position and RNG all come back from the checkpoint.
    first = train(toy_cfg(tmp_path, "tracking.run_name=split", "optim.max_steps=20", *constant_lr))
    second = train(toy_cfg(tmp_path, "tracking.run_name=split", "optim.max_steps=40", *constant_lr))
    assert (first.resumed_from_step, second.resumed_from_step, second.step) == (None, 20, 40)
    assert second.mlflow_run_id == first.mlflow_run_id
    assert [s for s, _ in history(tmp_path, second.mlflow_run_id, "train/loss")] == [10, 20, 30, 40]
    resumed = torch.load(second.export_path)["state_dict"]
    for key, value in exported["state_dict"].items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_nonfinite_stop_names_step_and_keeps_last_checkpoint(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = toy_cfg(tmp_path, "task.nan_at_batches=[5]", "checkpoint.interval_steps=2", "optim.max_steps=10")
    with pytest.raises(NonFiniteError, match=r"step 6: non-finite loss parts \{loss: nan, mse: nan"):
        train(cfg)
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt" / "toy").glob("checkpoint_*"))
    assert checkpoints == ["checkpoint_00000002", "checkpoint_00000004"]
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(["1"])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.timeout(180)
def test_nonfinite_skip_counts_and_fails_past_the_limit(tmp_path):
    ok = train(toy_cfg(tmp_path, "nonfinite=skip", "task.nan_at_batches=[3,5]", "optim.max_steps=10",
                       "max_skipped_steps=2", "tracking.run_name=skip_ok"))  # fmt: skip
    assert ok.step == 10 and ok.metrics["train/skipped_batches"] == 2.0
    assert all(v == v for v in ok.metrics.values())  # no NaN leaked into the logged averages
    with pytest.raises(NonFiniteError, match=r"step 5: 2 non-finite batches skipped, more than max_skipped_steps=1"):
        train(toy_cfg(tmp_path, "nonfinite=skip", "task.nan_at_batches=[3,5]", "optim.max_steps=10",
                      "max_skipped_steps=1", "tracking.run_name=skip_fail"))  # fmt: skip


@pytest.mark.timeout(180)
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_gradient_never_reaches_the_weights(tmp_path, zero_stage):
    # finite loss, NaN gradient: ZeRO-0 is checked by the engine before the update, ZeRO 1-3 skip it themselves
    common = [f"deepspeed.zero_stage={zero_stage}", "task.nan_grad_at_batches=[3]", "optim.max_steps=6"]
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite gradient norm (nan|inf)"):
        train(toy_cfg(tmp_path, *common, "tracking.run_name=grad_stop"))
    skipped = train(toy_cfg(tmp_path, *common, "nonfinite=skip", "tracking.run_name=grad_skip"))
    assert skipped.step == 6 and skipped.metrics["train/skipped_batches"] == 1.0
    weights = torch.load(skipped.export_path)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())
