"""Per-step CPU losses of every stage task, through the real Trainer, against values recorded from a reference commit.

A refactor of the task, engine or checkpoint code must leave a stage's training bit-identical on CPU with fixed
seeds. `run_stages` trains each stage of the shipped `*_test.yaml` configs (plus the toy task) for a few steps on
the local path (`scaling.use_ray=false`, one thread, fixed seeds), with a checkpoint on the way, and reads every
step's deterministic `train/*` metrics back from MLflow. The variants cover the code the stages share: attention
masks (stage 1 and video-text), data-side masks with CLIP alignment (self-distillation, whose teacher is stage 1's
export, as in a recipe) and masked-token alignment (both video-text tasks; the BERT one with MLM too).

The shards are committed (`data/stage_losses_shards`: the 8 training clips of `pipeline.data.synthetic.
make_synthetic(num_videos=12, split_ratio=8/12, seed=3, num_frames=8, size=32, shard_size=8)`) rather than written
by the test: libx264 does not encode these tiny clips reproducibly (the same frames encoded twice in one process
now and then give different bitstreams, which decode to different pixels).

`stage_losses_cpu.json` beside this file holds the values; it was recorded on code before the refactor it guards
(the commit that added it says from which). They are compared bit for bit on the CPU that recorded them (its model,
vector ISA and torch, `cpu` in the file) and to a relative 1e-4 elsewhere: CPU kernels round differently per ISA.
When a change is *meant* to alter training (a new data order, a fixed
loss), record the file again and say so in the commit message:

    python tests/integration/test_stage_losses.py --record tests/integration/stage_losses_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED = Path(__file__).with_name("stage_losses_cpu.json")
SHARDS = Path(__file__).resolve().parents[1] / "data" / "stage_losses_shards"
STEPS = 3
TINY_CLIP = "{layers: 2, width: 64, head_width: 32}"
# Metrics that measure time or memory, not the numerics.
_NOT_NUMERICS = ("train/clips_per_s", "train/data_wait_fraction", "train/memory_gib", "train/tflops_per_worker",
                 "train/mfu")

# (run name, config file, overrides); `{mask_export}` is the first run's export (self-distillation's teacher).
RUNS: list[tuple[str, str, list[str]]] = [
    ("masked_alignment", "configs/stages/pretrain_mask_test.yaml", ["data.batch_size=2"]),
    ("self_distill", "configs/stages/self_distill_test.yaml", [
        "data.batch_size=2", "task.teacher_checkpoint={mask_export}", "data.mask.type=tube", "data.mask.ratio=0.5",
        "task.clip_weight=0.5", "task.clip_teacher.pretrained=null",
        f"task.clip_teacher.vision_overrides={TINY_CLIP}"]),
    ("video_text", "configs/stages/pretrain_vtc_test.yaml", [
        "data.batch_size=4", "data.mask.type=attention", "data.mask.ratio=0.5", "task.uta_weight=1.0",
        "task.teacher.pretrained=null", f"task.teacher.vision_overrides={TINY_CLIP}"]),
    ("video_text_bert", "configs/stages/pretrain_vtc_bert_test.yaml", [
        "data.batch_size=4", "data.mask.type=attention", "data.mask.ratio=0.5", "task.uta_weight=1.0",
        "task.teacher.pretrained=null", f"task.teacher.vision_overrides={TINY_CLIP}"]),
    ("toy", "configs/stages/toy.yaml", ["scaling.num_workers=1"]),
]


def run_stages(root: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{run: {metric: {step: value}}} of `STEPS` training steps of every run in `RUNS`, outputs under `root`."""
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.engine import train

    torch.set_num_threads(1)  # CPU reductions split by thread count: one thread makes the sums machine-independent
    values: dict[str, dict[str, dict[str, float]]] = {}
    exports: dict[str, str] = {}
    for name, config, overrides in RUNS:
        out = root / name
        cfg = load_config(REPO / config, [
            "scaling.use_ray=false", f"output_dir={out}", f"checkpoint.path={out}/ckpt",
            f"tracking.uri=sqlite:///{out}/mlflow.db", f"data.train_shards={SHARDS}",
            f"optim.max_steps={STEPS}", "optim.warmup_steps=1", "tracking.log_interval=1",
            "checkpoint.interval_steps=2", "tracking.system_metrics_interval_s=0",
            *(o.replace("{mask_export}", str(exports.get("masked_alignment"))) for o in overrides),
        ])
        result = train(cfg)
        exports[name] = result.export_path
        client = MlflowClient(cfg.tracking.uri)
        keys = sorted(k for k in client.get_run(result.mlflow_run_id).data.metrics
                      if k.startswith("train/") and k not in _NOT_NUMERICS)
        values[name] = {key: {str(m.step): m.value for m in client.get_metric_history(result.mlflow_run_id, key)}
                        for key in keys}
    return values


def _run_in_subprocess(out_file: Path, timeout_s: float) -> dict[str, Any]:
    # A fresh interpreter: its thread count, RNG and process group are this run's alone.
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--record", str(out_file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out_file.read_text())


def cpu_fingerprint() -> str:
    """The CPU's model and the vector ISA torch dispatches to: CPU kernels round differently per ISA and vendor (the
    same commit gave 1-ulp different step-1 losses on an AVX-512 AMD EPYC and on the machine that recorded the file)."""
    import platform

    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model} / {torch.backends.cpu.get_cpu_capability()} / torch {torch.__version__}"


# On another CPU (or torch) than the recording's the same code drifts by float rounding only: up to 2e-5 relative
# after three steps here. A change of what training computes (a mask, a data order, a loss term) moves far more.
OTHER_MACHINE_RTOL = 1e-4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stage_losses_are_bit_identical_to_the_recorded_ones(tmp_path):
    recorded = json.loads(EXPECTED.read_text())
    expected = recorded["runs"]
    result = _run_in_subprocess(tmp_path / "losses.json", timeout_s=850)
    got = result["runs"]
    exact = recorded.get("cpu") == result["cpu"]
    assert sorted(got) == sorted(expected)
    for run, metrics in expected.items():
        assert sorted(got[run]) == sorted(metrics), run
        assert list(metrics["train/loss"]) == [str(s) for s in range(1, STEPS + 1)], run
        for key, steps in metrics.items():
            where = f"{run} {key}: got {got[run][key]}, recorded {steps} (recorded on {recorded.get('cpu')}, " \
                    f"run on {result['cpu']})"
            if exact:  # a refactor must not move a single bit (JSON keeps a float's repr, which round-trips)
                assert got[run][key] == steps, where
            else:
                assert got[run][key] == pytest.approx(steps, rel=OTHER_MACHINE_RTOL, abs=0), where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, required=True, help="JSON file to write the per-step metrics to")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="stage_losses_") as tmp:
        runs = run_stages(Path(tmp))
    record = {"torch": torch.__version__, "cpu": cpu_fingerprint(), "steps": STEPS, "runs": runs}
    args.record.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
