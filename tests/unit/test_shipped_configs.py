"""Every YAML under configs/ loads, validates and dry-runs, so no shipped config breaks unnoticed.

- configs/stages: load_config + the training job's plan, which builds the whole task on the meta device.
- configs/model: load_config + the model built on the meta device.
- configs/eval: load_eval_config, or load_cls_eval_config for `*_cls.yaml` (the checkpoint and videos they name
  come from a run or a download).
- configs/recipes: load_recipe + run_recipe(dry_run=True), which validates every step's resolved config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SECTIONS = ("stages", "model", "eval", "recipes")
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_every_yaml_is_in_a_known_section():
    assert ALL_YAML, "no configs found"
    unknown = [_id(p) for p in ALL_YAML if p.relative_to(CONFIGS).parts[0] not in SECTIONS]
    assert unknown == [], f"add a loader for these folders to this test: {unknown}"


@pytest.mark.parametrize("path", [p for p in ALL_YAML if p.parent.name == "stages"], ids=_id)
def test_stage_config_builds(path, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.jobs_common import describe_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(path, [f"output_dir={tmp_path}", f"checkpoint.path={tmp_path / 'ckpt'}",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert cfg.task.name, f"{path.name}: a stage config must name its task"
    plan = describe_plan(cfg)  # builds the task (model, teacher, heads) on the meta device
    assert f"task {cfg.task.name}" in plan and " parameters (" in plan


PAPER_STAGES = ("pretrain_mask_ti", "pretrain_mask_s", "pretrain_mask_m", "self_distill_s_to_m",
                "pretrain_vtc_bert_m_5m", "pretrain_vtc_bert_m_17m", "pretrain_vtc_bert_m_25m")


@pytest.mark.parametrize("name", PAPER_STAGES)
def test_paper_scale_stages_default_to_the_released_behaviour(name):
    """Deviations from the released code are opt-in overrides (docs/stages.md lists them)."""
    from pipeline.config import load_config

    cfg = load_config(CONFIGS / "stages" / f"{name}.yaml")
    assert cfg.optim.decay_ssm_a  # the released optimizers decay the 2-D A_log / A_b_log
    if name.startswith("pretrain_mask_"):
        assert cfg.task.student_feature == "residual_before_last_block"  # the released last-layer feature
        global_batch = cfg.scaling.num_workers * cfg.data.batch_size
        assert (global_batch, cfg.optim.warmup_steps) == (2048, 4688)
        scale = global_batch / cfg.optim.base_batch_size  # the released script scales lr and min_lr alike
        assert (cfg.optim.lr * scale, cfg.optim.min_lr * scale) == pytest.approx((1.2e-3, 8e-5))


@pytest.mark.parametrize(("name", "gpus", "steps"), [("5m", 16, 26200), ("17m", 32, 42600), ("25m", 32, 62700)])
def test_bert_video_text_stages_are_the_released_recipe(name, gpus, steps):
    """exp_pt/videomamba_middle_{5m,17m,25m}/config.py and run.sh of the release (docs/stages.md)."""
    from pipeline.config import load_config

    cfg = load_config(CONFIGS / "stages" / f"pretrain_vtc_bert_m_{name}.yaml")
    task, optim = cfg.task, cfg.optim
    assert task.name == "video_text_bert"
    assert (task.vtc_weight, task.vtm_weight, task.mlm_weight, task.uta_weight, task.mlm_prob) == (1, 1, 1, 1, 0.5)
    assert (task.vtc_gather_gradient, task.embed_dim, task.temp_init, task.export_dtype) == ("local", 512, 0.07,
                                                                                            "bfloat16")
    text = task.text
    assert (text.model, text.load_weights, text.fusion_layer, text.max_tokens, text.clean_captions, text.overrides) \
        == ("bert-base-uncased", True, 9, 32, True, {})
    assert (task.teacher.model_name, task.teacher.pretrained, task.teacher.apply_ln_post) == ("ViT-B-16", "openai",
                                                                                             False)
    assert (cfg.data.mask.type, cfg.data.mask.ratio, cfg.data.num_frames, cfg.data.img_size) == ("attention", 0.8, 8,
                                                                                                  224)
    assert (cfg.data.sampling, cfg.data.scale, cfg.data.flip, cfg.data.batch_size) == ("rand", [0.5, 1.0], True, 128)
    assert (cfg.model.name, cfg.model.drop_path_rate, cfg.scaling.num_workers) == ("videomamba_middle", 0.25, gpus)
    assert (optim.lr, optim.min_lr, optim.base_batch_size, optim.weight_decay, optim.betas) == (4e-4, 4e-6, None, 0.05,
                                                                                             [0.9, 0.999])
    assert (optim.no_decay, optim.schedule, optim.max_steps, optim.warmup_steps) == ("dims", "cosine_floor", steps,
                                                                                   steps // 10)
    assert cfg.deepspeed.grad_clip == 0.0


@pytest.mark.parametrize(("name", "gpus", "media"), [("5m", 16, 5.37e6), ("17m", 32, 17.44e6), ("25m", 32, 25.68e6)])
def test_video_text_recipes_train_the_released_model_in_both_phases(name, gpus, media, tmp_path):
    """The recipes' video-text steps are the BERT task; the unmasked tuning is exp_pt/*_unmasked/config.py: no
    mask, no teacher, 64 clips a GPU, lr 8e-5 floored at 0.01 of it, 1 epoch with a 0.2-epoch warmup."""
    from pipeline.recipe import load_recipe, resolve_step_config

    recipe = load_recipe(CONFIGS / "recipes" / f"m_{name}_vtc.yaml", [f"out_dir={tmp_path}"])
    steps = {step.name: step for step in recipe.stages}
    masked, unmasked = (resolve_step_config(recipe, steps[n], "sqlite:///x.db", "e") for n in ("vtc", "vtc_unmasked"))
    assert masked.task.name == unmasked.task.name == "video_text_bert"
    assert str(unmasked.task.init_checkpoint).endswith("vtc/export/model.pt") and unmasked.model.pretrained is None
    assert (unmasked.data.mask.type, unmasked.task.uta_weight, unmasked.data.batch_size) == ("none", 0.0, 64)
    assert (unmasked.optim.lr, unmasked.optim.min_lr, unmasked.optim.schedule) == (8e-5, 8e-7, "cosine_floor")
    epoch = round(media / (gpus * 64))
    assert unmasked.optim.max_steps == epoch and unmasked.optim.warmup_steps == pytest.approx(0.2 * epoch, abs=1)


FINETUNE_PAPER_STAGES = [p for p in ALL_YAML if p.parent.name == "stages" and p.stem.startswith("finetune_")
                         and p.stem != "finetune_test"]


@pytest.mark.parametrize("path", FINETUNE_PAPER_STAGES, ids=_id)
def test_paper_scale_finetuning_defaults_to_the_released_behaviour(path):
    """The released fine-tuning: its optimizer decays the 2-D A_log / A_b_log, its layer-decay scope, and its
    validation view (the classification test sampler's one clip, not the zero-shot `middle` rule)."""
    from pipeline.config import load_config

    cfg = load_config(path)
    assert cfg.optim.decay_ssm_a and cfg.optim.layer_decay_scope == "released"
    assert (cfg.data.sampling, cfg.data.eval_sampling, cfg.data.eval_crop) == ("rand", "sparse_middle", "center")


@pytest.mark.parametrize("path", [p for p in ALL_YAML if p.parent.name == "model"], ids=_id)
def test_model_config_builds(path):
    from models import create_model
    from pipeline.config import load_config

    cfg = load_config(path)
    with torch.device("meta"):
        model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", [p for p in ALL_YAML if p.parent.name == "eval"], ids=_id)
def test_eval_config_loads(path):
    if path.stem.endswith("_cls"):  # classification tests (jobs/eval_cls.py)
        from pipeline.evaluation.cls_config import load_cls_eval_config

        cfg = load_cls_eval_config(path, ["model.checkpoint=/checkpoints/finetune/export/model.pt"])
        assert cfg.data.annotation or cfg.data.shards, f"{path.name}: no labelled list or shards"
        return
    from pipeline.evaluation.config import load_eval_config

    cfg = load_eval_config(path, ["model.checkpoint=/checkpoints/vtc/export/model.pt"])
    assert cfg.data.annotation and (cfg.data.root or cfg.data.shards), f"{path.name}: no annotation or videos"


@pytest.mark.parametrize("path", [p for p in ALL_YAML if p.parent.name == "recipes"], ids=_id)
def test_recipe_dry_run(path, tmp_path, monkeypatch):
    from pipeline.recipe import load_recipe, run_recipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(path, [f"out_dir={tmp_path / 'out'}", f"data_root={tmp_path / 'data'}"])
    lines: list[str] = []
    result = run_recipe(recipe, dry_run=True, log=lines.append)
    assert result.steps == {}
    assert len([line for line in lines if line.lstrip()[:2].rstrip(".").isdigit()]) == len(recipe.steps)
    assert lines[-1].startswith(f"dry run: {len(recipe.steps)} step config(s) validated")
    assert not (tmp_path / "out").exists(), "a dry run must not write anything"
