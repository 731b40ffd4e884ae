"""Training FLOPs per sample (pipeline/flops.py): hand counts on tiny models, torch's FLOP counter, stage tasks, MFU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models import create_model
from pipeline.config import load_config
from pipeline.flops import (
    bert_fusion_flops,
    bert_text_flops,
    clip_vision_flops,
    head_flops,
    matching_head_flops,
    mlm_head_flops,
    text_tower_flops,
    videomamba_flops,
)
from pipeline.tasks import build_task

REPO = Path(__file__).resolve().parents[2]
TINY_CLIP = "{layers: 2, width: 64, head_width: 32}"


def _cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def counted(fn) -> int:
    """FLOPs torch's counter sees in `fn()`: matmuls, convolutions and attention, nothing elementwise. Two blind
    spots of the counter are closed: nn.MultiheadAttention's fused fast path (off here) and CPU flash attention
    (no formula of its own: given the generic attention one)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops()


def tiny_backbone(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("videomamba_test", num_classes=0, scan_backend="ref", **overrides)


def test_videomamba_matches_a_hand_count():
    model = tiny_backbone()  # 4 frames of 32 px, patch 16: 16 patches; D 32, E 64, dt rank 2, N 16, conv 4
    L = 17  # CLS + every patch
    patch_embed = 2 * 16 * (3 * 1 * 16 * 16) * 32
    direction = (2 * (L + 3) * 64 * 4  # depthwise conv1d over the padded length
                 + 2 * L * 64 * (2 + 2 * 16) + 2 * L * 2 * 64  # x_proj, dt_proj
                 + 9 * L * 64 * 16 + 2 * L * 64)  # selective scan, D skip, z gate
    block = 2 * L * 32 * 128 + 2 * direction + 2 * L * 64 * 32  # in_proj, both directions, out_proj
    forward = patch_embed + 2 * block
    assert forward == 2_193_920
    assert videomamba_flops(model, L) == 3 * forward  # trained: forward + backward
    assert videomamba_flops(model.requires_grad_(False), L) == forward  # frozen (a teacher): forward only


def test_videomamba_matmuls_match_torch_flop_counter_on_masked_tokens():
    model = tiny_backbone().requires_grad_(False)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, ::2] = True  # 8 of 16 patches: 9 tokens through the blocks
    video = torch.randn(2, 3, 4, 32, 32)
    scan = 2 * 2 * (9 * 9 * 64 * 16 + 2 * 9 * 64)  # blocks x directions: elementwise, invisible to the counter
    assert counted(lambda: model.forward_features(video, keep_BL=keep)) == 2 * (videomamba_flops(model, 9) - scan)


def test_frozen_last_block_counts_its_forward_only():
    model = tiny_backbone()
    trained = videomamba_flops(model, 17)
    model.layers[-1].requires_grad_(False)  # stage 1's released quirk freezes it: no backward through it
    block_forward = 703_744  # one block over 17 tokens, from the hand count above
    assert videomamba_flops(model, 17) == trained - (3 - 1) * block_forward


def test_clip_teacher_matches_a_hand_count_and_torch_flop_counter():
    from pipeline.tasks.clip_teacher import CLIPTeacherConfig, clip_teacher_for

    teacher = clip_teacher_for(CLIPTeacherConfig(pretrained=None, vision_overrides={"layers": 2, "width": 64,
                                                                                    "head_width": 32}),
                               tiny_backbone(), num_layers=1)
    tokens = 1 + 4  # CLS + a 2x2 grid of 16 px patches at 32 px
    block = 2 * tokens * 64 * 192 + 4 * tokens * tokens * 64 + 2 * tokens * 64 * 64 + 2 * 2 * tokens * 64 * 256
    per_frame = 2 * 4 * (3 * 16 * 16) * 64 + 2 * block + 2 * tokens * 64 * 512  # patch embed, blocks, proj to 512
    assert clip_vision_flops(teacher, frames=4) == 4 * per_frame == 6_866_944
    assert counted(lambda: teacher(torch.randn(1, 3, 4, 32, 32))) == clip_vision_flops(teacher, frames=4)


def test_text_tower_and_matching_head_match_torch_flop_counter():
    from models.video_text import build_video_text_model

    model = build_video_text_model("videomamba_test", {"num_frames": 4, "img_size": 32, "scan_backend": "ref"},
                                   {"name": "ViT-B-16", "context_length": 16, "width": 64, "layers": 2, "heads": 2},
                                   text_pretrained=None, embed_dim=32, vtm_layers=1).requires_grad_(False)
    tokens_BL = model.tokenize(["a red circle moves left"])
    assert counted(lambda: model.text_encoder(tokens_BL)) == text_tower_flops(model.text_encoder.tower, 16)
    video_1VD, text_1LW = torch.randn(1, 17, 32), torch.randn(1, 16, 64)
    valid_1L = torch.ones(1, 16, dtype=torch.bool)
    assert (counted(lambda: model.vtm_head(video_1VD, text_1LW, valid_1L, torch.tensor([3])))
            == matching_head_flops(model.vtm_head, text_tokens=16, video_tokens=17))


def stage_task(config: str, *overrides: str):
    torch.manual_seed(0)
    return build_task(load_config(REPO / config, ["model.scan_backend=ref", *overrides]))


def test_stage_tasks_add_their_parts():
    mask = stage_task("configs/stages/pretrain_mask_test.yaml")  # attention masks at 0.5: 2 of 4 patches a frame
    tokens = 1 + 4 * 2
    assert mask.flops_per_sample() == (videomamba_flops(mask.student, tokens) + head_flops(mask.clip_decoder[0].head,
                                       tokens) + clip_vision_flops(mask.teacher, 4))  # fmt: skip

    vtc = stage_task("configs/stages/pretrain_vtc_test.yaml", "data.mask.type=attention", "data.mask.ratio=0.5",
                     "task.uta_weight=1.0", "task.teacher.pretrained=null",
                     f"task.teacher.vision_overrides={TINY_CLIP}")
    model = vtc.model
    assert vtc.flops_per_sample() == (
        videomamba_flops(model.vision_encoder, tokens) + text_tower_flops(model.text_encoder.tower, 16)
        + head_flops(model.vision_proj, 1) + head_flops(model.text_proj, 1)
        + 3 * matching_head_flops(model.vtm_head, 16, tokens)  # the positive pair and two hard negatives
        + head_flops(vtc.uta.head.head, tokens) + clip_vision_flops(vtc.teacher, 4))


def test_bert_text_fusion_and_lm_head_match_torch_flop_counter():
    from models.bert import BertSpec, BertTextEncoder

    encoder = BertTextEncoder(BertSpec(vocab_size=80, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32, fusion_layer=2,
                                       encoder_width=48)).eval().requires_grad_(False)
    ids_1L, mask_1L = torch.randint(5, 80, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    vision_1SK = torch.randn(1, 9, 48)
    text_1LW = encoder.encode_text(ids_1L, mask_1L)
    assert counted(lambda: encoder.encode_text(ids_1L, mask_1L)) == bert_text_flops(encoder, 16)
    assert counted(lambda: encoder.fuse(text_1LW, mask_1L, vision_1SK)) == bert_fusion_flops(encoder, 16, 9)
    assert counted(lambda: encoder.mlm_logits(text_1LW)) == mlm_head_flops(encoder, 16)
    # Self-attention + MLP over 16 tokens per text layer, by hand: qkv, QK^T and AV, output, two MLP matmuls.
    layer = 2 * 16 * 32 * 96 + 4 * 16 * 16 * 32 + 2 * 16 * 32 * 32 + 2 * 2 * 16 * 32 * 64
    assert bert_text_flops(encoder, 16) == 2 * layer
    assert bert_text_flops(encoder.requires_grad_(True), 16) == 3 * 2 * layer  # trained: forward + backward


def test_bert_video_text_task_adds_its_parts():
    task = stage_task("configs/stages/pretrain_vtc_bert_test.yaml", "data.mask.type=attention", "data.mask.ratio=0.5",
                      "task.uta_weight=1.0", "task.teacher.pretrained=null",
                      f"task.teacher.vision_overrides={TINY_CLIP}")
    model, text, patches = task.model, task.model.text_encoder, 4 * 2  # 2 of 4 patches a frame
    assert task.flops_per_sample() == (
        videomamba_flops(model.vision_encoder, 1 + patches)
        + 2 * bert_text_flops(text, 16)  # the caption, then its MLM-masked copy
        + 4 * bert_fusion_flops(text, 16, patches)  # 3 VTM pairs and the MLM pair over the visible patch tokens
        + head_flops(model.vision_proj, 1) + head_flops(model.text_proj, 1) + 3 * head_flops(model.itm_head, 1)
        + mlm_head_flops(text, 16) + head_flops(model.vision_encoder.clip_decoder[0].head, 1 + patches)
        + clip_vision_flops(task.teacher, 4))


def test_classification_counts_the_whole_clip_through_the_classifier():
    task = stage_task("configs/stages/finetune_test.yaml", "task.class_index=null")
    tokens = 1 + 4 * 4  # 4 frames of 2x2 patches, nothing masked
    assert task.flops_per_sample() == videomamba_flops(task.model, tokens)
    assert task.flops_per_sample() > videomamba_flops(task.model, tokens - 1) > 0  # the head and every block count


def test_self_distillation_counts_both_teachers(tmp_path):
    teacher = tiny_backbone(num_frames=4, img_size=32)
    torch.save({"state_dict": teacher.state_dict(), "meta": {"model_name": "videomamba_test",
                                                             "model_kwargs": {"num_frames": 4, "img_size": 32}}},
               tmp_path / "teacher.pt")  # fmt: skip
    task = stage_task("configs/stages/self_distill_test.yaml", f"task.teacher_checkpoint={tmp_path}/teacher.pt",
                      "data.mask.type=tube", "data.mask.ratio=0.5", "task.clip_weight=0.5",
                      "task.clip_teacher.pretrained=null", f"task.clip_teacher.vision_overrides={TINY_CLIP}")
    tokens = 1 + 4 * 2  # a tube mask at 0.5 keeps 2 of 4 patches in every frame
    assert task.flops_per_sample() == (
        videomamba_flops(task.student, tokens) + head_flops(task.distill_head[1], tokens)  # width 48 -> 32
        + videomamba_flops(task.teacher.model, 17)  # frozen: forward only, every token
        + clip_vision_flops(task.clip_teacher, 4) + head_flops(task.clip_alignment.head.head, tokens))
    assert videomamba_flops(task.teacher.model, 17) == 2_193_920  # the hand count above


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_logs_mfu_for_a_real_stage(tmp_path):
    from pipeline.engine import train

    cfg = load_config(REPO / "configs/stages/pretrain_mask_test.yaml", [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"data.train_shards={REPO}/tests/data/stage_losses_shards",
        "optim.max_steps=2", "optim.warmup_steps=1", "tracking.log_interval=2", "data.batch_size=2",
        "scaling.peak_tflops=0.001", "tracking.system_metrics_interval_s=0",
    ])  # fmt: skip
    metrics = train(cfg).metrics
    flops = stage_task("configs/stages/pretrain_mask_test.yaml").flops_per_sample()
    assert metrics["train/tflops_per_worker"] == pytest.approx(flops * metrics["train/clips_per_s"] / 1e12)
    assert metrics["train/mfu"] == pytest.approx(metrics["train/tflops_per_worker"] / 0.001)
