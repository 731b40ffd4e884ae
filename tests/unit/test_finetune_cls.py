"""Fine-tuning end to end on CPU through the real engine (DeepSpeed, MLflow in sqlite, real labelled shards):
released-layout checkpoints (video and IN-1K image) as the start, the multi-view test of the result (also as a
released-layout file, without key surgery), and an exact resume with Mixup and the weight EMA on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

import json
from pathlib import Path

import pytest
import torch

from models import create_model, save_pretrained
from models.checkpoints import interpolate_temporal_embed
from pipeline.checkpointing import LocalCheckpointStore, run_storage
from pipeline.config import load_config
from pipeline.engine import Trainer
from pipeline.evaluation.cls_config import load_cls_eval_config
from pipeline.evaluation.cls_run import evaluate_classification
from pipeline.tasks import build_task

REPO = Path(__file__).resolve().parents[2]
DIRECTIONS = ["left", "right", "up", "down"]


def finetune_cfg(tmp_path: Path, data: dict, *overrides: str):
    root = Path(data["train_shards"]).parents[1]
    return load_config(str(REPO / "configs/stages/finetune_test.yaml"), [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"data.train_shards={data['train_shards']}",
        f"data.eval_shards={data['eval_shards']}", f"task.class_index={root}/classes.txt", "data.num_workers=0",
        "data.batch_size=4", "deepspeed.precision=fp32", "tracking.log_interval=1", *overrides,
    ])  # fmt: skip


def released_video_file(path: Path) -> dict[str, torch.Tensor]:
    """A released K400-style fine-tuned file: a raw state dict, official keys, its own head and frame count."""
    torch.manual_seed(7)
    save_pretrained(create_model("videomamba_test", num_frames=2, num_classes=7), path)
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_released_checkpoint_fine_tunes_and_the_result_tests(tmp_path, tiny_synthetic):
    released = released_video_file(tmp_path / "videomamba_t_k400_f2.pth")
    cfg = finetune_cfg(tmp_path, tiny_synthetic, f"model.pretrained={tmp_path}/videomamba_t_k400_f2.pth",
                       "optim.max_steps=2", "optim.warmup_steps=0", "eval.interval_steps=2")
    trainer = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
    model = trainer.task.model
    # Loaded without key surgery: the backbone as released, the 2-frame temporal embedding interpolated to 4,
    # the 7-class head left out for a fresh 4-class one.
    torch.testing.assert_close(model.layers[1].mixer.in_proj.weight, released["layers.1.mixer.in_proj.weight"])
    torch.testing.assert_close(model.temporal_pos_embedding,
                               interpolate_temporal_embed(released["temporal_pos_embedding"], 4))
    assert model.head.weight.shape == (4, model.embed_dim)
    result = trainer.fit()
    assert result.step == 2 and {"eval/top1", "eval/top5", "eval/loss"} <= set(result.metrics)
    assert result.metrics["eval/top5"] == 100.0  # 4 classes: every label is in the top 5
    export = torch.load(result.export_path)
    assert export["meta"]["class_names"] == DIRECTIONS and export["meta"]["num_classes"] == 4

    # The multi-view test of the export: 2 clips x 3 crops of the 4 held-out clips, labels from the writer's list.
    root = Path(tiny_synthetic["train_shards"]).parents[1]
    eval_overrides = [f"model.checkpoint={result.export_path}", f"data.annotation={root}/videos/eval/list.jsonl",
                      "data.class_index=null", "views.num_clips=2", f"output_dir={tmp_path}/eval",
                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "data.name=tiny"]
    cfg_eval = load_cls_eval_config(REPO / "configs/eval/synthetic_cls.yaml", eval_overrides)
    metrics = evaluate_classification(cfg_eval)
    report = json.loads(Path(metrics["report"]).read_text())
    assert (metrics["videos"], metrics["classes"], metrics["views"]) == (4, 4, 6)
    assert sum(map(sum, report["confusion"]["matrix"])) == 4 and [r["name"] for r in report["per_class"]] == DIRECTIONS
    assert report["metrics"]["top1"] in {0.0, 25.0, 50.0, 75.0, 100.0}
    assert report["model"]["num_frames"] == 4 and report["protocol"]["views"]["temporal_clips"] == 2
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(metrics["run_id"])
    assert run.data.metrics["top1"] == report["metrics"]["top1"] and run.data.tags["stage"] == "eval_classification"

    # The same weights as a released-layout file (raw state dict, no meta): only the model size is named.
    torch.save(export["state_dict"], tmp_path / "released_ft.pth")
    raw = evaluate_classification(load_cls_eval_config(REPO / "configs/eval/synthetic_cls.yaml", [
        *eval_overrides, f"model.checkpoint={tmp_path}/released_ft.pth", "model.name=videomamba_test",
        f"data.class_index={root}/classes.txt", f"output_dir={tmp_path}/eval_raw"]))
    assert {k: raw[k] for k in ("top1", "top5", "mean_class_top1")} == \
        {k: metrics[k] for k in ("top1", "top5", "mean_class_top1")}
    # Labels and videos straight from the labelled shards (no list): the same test.
    sharded = evaluate_classification(load_cls_eval_config(REPO / "configs/eval/synthetic_cls.yaml", [
        *eval_overrides, "data.annotation=null", f"data.shards={tiny_synthetic['eval_shards']}",
        f"output_dir={tmp_path}/eval_shards"]))
    assert {k: sharded[k] for k in ("top1", "top5", "videos")} == {k: metrics[k] for k in ("top1", "top5", "videos")}


def test_image_checkpoint_is_inflated_to_video(tmp_path, tiny_synthetic):
    """An IN-1K-layout file ({"model": ...}, 2-D patch kernel, no temporal embedding, 1000-way head) as the start."""
    torch.manual_seed(3)
    video = create_model("videomamba_test", num_frames=1, num_classes=9).state_dict()
    image = {k: v for k, v in video.items() if k != "temporal_pos_embedding"}
    image["patch_embed.proj.weight"] = image["patch_embed.proj.weight"][:, :, 0]  # Conv2d (D, 3, 16, 16)
    torch.save({"model": image}, tmp_path / "videomamba_t16_in1k_res224.pth")
    cfg = finetune_cfg(tmp_path, tiny_synthetic, f"model.pretrained={tmp_path}/videomamba_t16_in1k_res224.pth")
    model = build_task(cfg).model
    torch.testing.assert_close(model.patch_embed.proj.weight[:, :, 0], image["patch_embed.proj.weight"])
    assert model.temporal_pos_embedding.abs().sum() == 0  # zero-initialised, as the released code leaves it
    torch.testing.assert_close(model.norm_f.weight, image["norm_f.weight"])
    torch.save({"model": {"pos_embed": image["pos_embed"]}}, tmp_path / "not_a_backbone.pth")
    with pytest.raises(ValueError, match="lacks .* tensors of the model"):
        build_task(finetune_cfg(tmp_path, tiny_synthetic, f"model.pretrained={tmp_path}/not_a_backbone.pth"))


def fixed_batches(start: int, steps: int) -> list[dict]:
    """The labelled clips of steps start+1 .. steps (the same for every run)."""
    out = []
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(step)
        out.append({"video": torch.randn(4, 3, 4, 32, 32, generator=gen), "label": torch.randint(0, 4, (4,),
                                                                                                  generator=gen)})
    return out


def run(cfg, steps: int) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg, LocalCheckpointStore(run_storage(cfg), cfg.checkpoint.keep))
    trainer.batches = iter(fixed_batches(trainer.step, steps))
    result = trainer.fit()
    return trainer, torch.load(result.export_path)["state_dict"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_is_exact_with_mixup_and_ema(tmp_path, tiny_synthetic):
    steps = 4
    common = ["task.ema_decay=0.5", "checkpoint.interval_steps=2", "checkpoint.keep=3", "tracking.enabled=false",
              "data.eval_shards=null", "optim.lr=1.0e-3", "optim.min_lr=1.0e-3", "optim.warmup_steps=0",
              "model.drop_path_rate=0.0"]  # a constant LR: a 2-step run extends to 4 without a schedule change
    straight, straight_export = run(finetune_cfg(tmp_path, tiny_synthetic, *common, "tracking.run_name=straight",
                                                 f"optim.max_steps={steps}"), steps)  # fmt: skip
    first, _ = run(finetune_cfg(tmp_path, tiny_synthetic, *common, "tracking.run_name=split", "optim.max_steps=2"),
                   steps)
    second, resumed_export = run(finetune_cfg(tmp_path, tiny_synthetic, *common, "tracking.run_name=split",
                                              f"optim.max_steps={steps}"), steps)  # fmt: skip
    assert (first.resumed_from_step, second.resumed_from_step, second.step) == (None, 2, steps)
    for name, value in straight_export.items():
        torch.testing.assert_close(resumed_export[name], value, rtol=0, atol=0, msg=name)
    # the export holds the EMA, not the last weights, and the EMA was restored, not restarted from the resume point
    trained = straight.task.model.state_dict()
    assert not torch.equal(straight_export["head.weight"], trained["head.weight"])
    torch.testing.assert_close(straight_export["head.weight"], straight.task.ema.averages()["head.weight"])
    assert straight.task.mixup.state_dict() == second.task.mixup.state_dict()
    # the offline export of the last checkpoint (jobs/export_checkpoint.py) holds the same EMA weights
    from pipeline.checkpointing.export import export_checkpoint

    export_checkpoint(run_storage(straight.cfg), str(tmp_path / "offline.pt"))
    offline = torch.load(tmp_path / "offline.pt")["state_dict"]
    assert offline.keys() == straight_export.keys()
    for name, value in straight_export.items():
        torch.testing.assert_close(offline[name], value, rtol=0, atol=0, msg=name)


def test_class_index_is_checked_before_any_worker_starts(tmp_path, tiny_synthetic):
    """A missing or wrong task.class_index failed in every worker when it built the task; the dry run says so now."""
    from pipeline.config import ConfigError
    from pipeline.jobs_common import run_training_job
    from pipeline.preflight import preflight

    root = Path(tiny_synthetic["train_shards"]).parents[1]
    cfg = finetune_cfg(tmp_path, tiny_synthetic)
    assert preflight(cfg)[-1] == "task.class_index: 4 classes"
    assert finetune_cfg(tmp_path, tiny_synthetic, "task.class_index=null").task.preflight() == [
        "task.class_index: - (exports carry no class names)"]
    with pytest.raises(ConfigError, match=r"task\.class_index: .*classes\.txt names 4 classes but task\.num_classes "
                                          r"is 5"):
        preflight(finetune_cfg(tmp_path, tiny_synthetic, "task.num_classes=5"))
    argv = ["--config", "configs/stages/finetune_test.yaml", f"output_dir={tmp_path}/dry",
            f"data.train_shards={tiny_synthetic['train_shards']}", f"data.eval_shards={tiny_synthetic['eval_shards']}",
            f"task.class_index={root}/nope.txt", "--dry-run"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"task\.class_index: class-index file '.*/nope\.txt' does not exist; it is "
                                          r"the classes\.txt that jobs/make_shards\.py writes"):
        run_training_job("finetune", argv)
    assert not (tmp_path / "dry" / "config.yaml").exists()


@pytest.mark.parametrize("override, message", [
    ("task.num_classes=1", r"task\.num_classes: must be >= 2 \(400 for K400, 174 for SSv2\); it is required, got 1"),
    ("task.label_smoothing=1.0", r"task\.label_smoothing: must be in \[0, 1\), got 1\.0"),
    ("task.cutmix_alpha=-1", r"task\.cutmix_alpha: must be >= 0 \(0 = off\), got -1\.0"),
    ("task.mixup_switch_prob=2", r"task\.mixup_switch_prob: must be a probability in \[0, 1\], got 2\.0"),
    ("task.ema_decay=1.0", r"task\.ema_decay: must be in \(0, 1\) or null, got 1\.0"),
])  # fmt: skip
def test_classification_values_are_range_checked(override, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "configs/stages/finetune_test.yaml"), [override])
