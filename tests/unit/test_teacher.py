"""The frozen CLIP teacher (models/teachers.py) on a tiny random open_clip ViT, against open_clip's own forward."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

import pytest
import torch
import torch.nn.functional as F

from models.teachers import CLIPTeacher, build_clip_teacher

TINY = {"layers": 2, "width": 64, "head_width": 32}  # 2 heads; patch 16 as ViT-B-16


def tiny_teacher(seed: int = 0, **kwargs) -> CLIPTeacher:
    torch.manual_seed(seed)
    return build_clip_teacher("ViT-B-16", pretrained=None, image_size=32, vision_overrides=TINY, **kwargs)


@pytest.fixture(scope="module")
def teacher() -> CLIPTeacher:
    return tiny_teacher(return_layers=(0, -1))


def reference(visual, video_BCTHW, ln_post: bool = False):
    """Targets and attention from open_clip's plain forward, read out with hooks, computed the long way."""
    B, C, T, H, W = video_BCTHW.shape
    frames = video_BCTHW.transpose(1, 2).reshape(B * T, C, H, W)
    seen = {}
    blocks = visual.transformer.resblocks
    hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in (0, 1)]
    hooks.append(blocks[-1].ln_1.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)))
    try:
        visual(frames)
    finally:
        for h in hooks:
            h.remove()
    targets = []
    for i in (0, 1):
        x = visual.ln_post(seen[i]) if ln_post else seen[i]
        y = (x @ visual.proj).reshape(B, T, x.shape[1], -1)
        cls = y[:, :, 0].mean(dim=1, keepdim=True)
        patches = y[:, :, 1:].reshape(B, -1, y.shape[-1])
        targets.append(F.normalize(torch.cat([cls, patches], dim=1), dim=-1))
    h = seen["h"]
    weights = blocks[-1].attn(h, h, h, need_weights=True, average_attn_weights=True)[1]
    return torch.stack(targets), weights[:, 0].reshape(B, T, -1)


def test_targets_and_attention_match_open_clip_forward(teacher):
    torch.manual_seed(1)
    video = torch.randn(2, 3, 3, 32, 32)
    out = teacher(video)
    assert out.targets_KBLC.shape == (2, 2, 1 + 3 * 4, 512)
    assert out.cls_attn_BTP.shape == (2, 3, 4)
    ref_targets, ref_attn_BT1P = reference(teacher.visual, video)
    torch.testing.assert_close(out.targets_KBLC, ref_targets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_attn_BTP, ref_attn_BT1P[..., 1:], atol=1e-6, rtol=1e-5)
    # The softmax row covers CLS + P keys: the patches get 1 - (CLS's attention to itself), not 1.
    torch.testing.assert_close(out.cls_attn_BTP.sum(-1) + ref_attn_BT1P[..., 0], torch.ones(2, 3))
    assert bool((out.cls_attn_BTP.sum(-1) < 1).all()) and bool((out.cls_attn_BTP > 0).all())
    torch.testing.assert_close(out.targets_KBLC.norm(dim=-1), torch.ones(2, 2, 13))


def test_frames_are_independent_images(teacher):
    torch.manual_seed(2)
    video = torch.randn(1, 3, 2, 32, 32)
    both = teacher(video)
    for t in range(2):
        alone = teacher(video[:, :, t:t + 1])
        torch.testing.assert_close(both.targets_KBLC[:, :, 1 + 4 * t:5 + 4 * t], alone.targets_KBLC[:, :, 1:])
        torch.testing.assert_close(both.cls_attn_BTP[:, t], alone.cls_attn_BTP[:, 0])


def test_deterministic_and_frozen(teacher):
    video = torch.randn(2, 3, 2, 32, 32)
    first, second = teacher(video), tiny_teacher(return_layers=(0, -1))(video)
    assert torch.equal(first.targets_KBLC, second.targets_KBLC)
    assert torch.equal(first.cls_attn_BTP, second.cls_attn_BTP)
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = torch.nn.Sequential(teacher)
    parent.train()
    assert not teacher.training and not teacher.visual.training
    assert first.targets_KBLC.grad_fn is None and first.cls_attn_BTP.grad_fn is None


def test_ln_post_option_and_resize():
    teacher = tiny_teacher(apply_ln_post=True)
    video = torch.randn(1, 3, 2, 32, 32)
    ref_targets, _ = reference(teacher.visual, video, ln_post=True)
    torch.testing.assert_close(teacher(video).targets_KBLC[0], ref_targets[1], atol=1e-5, rtol=1e-5)
    # A clip at another resolution is resized (bicubic) to the teacher's input size first.
    big = torch.randn(1, 3, 2, 64, 64)
    small = F.interpolate(big.transpose(1, 2).flatten(0, 1), size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(teacher(big).targets_KBLC, teacher(small.reshape(1, 2, 3, 32, 32).transpose(1, 2))
                               .targets_KBLC)


def test_loads_a_vision_tower_file_and_interpolates_its_grid(tmp_path):
    source = tiny_teacher(seed=3)
    # UMT's extracted teacher layout: bare vision-tower keys, conv1 as a Conv3d with a temporal kernel of 1.
    state = {k: v.clone() for k, v in source.visual.state_dict().items()}
    state["conv1.weight"] = state["conv1.weight"].unsqueeze(2)
    path = tmp_path / "vit_tiny.pth"
    torch.save(state, path)
    same = build_clip_teacher("ViT-B-16", pretrained=str(path), image_size=32, vision_overrides=TINY)
    video = torch.randn(1, 3, 2, 32, 32)
    assert torch.equal(same(video).targets_KBLC, source(video).targets_KBLC)
    larger = build_clip_teacher("ViT-B-16", pretrained=str(path), image_size=64, vision_overrides=TINY)
    assert larger.grid_size == (4, 4) and larger.visual.positional_embedding.shape == (17, 64)
    torch.testing.assert_close(larger.visual.positional_embedding[0], source.visual.positional_embedding[0])
    assert larger(torch.randn(1, 3, 2, 64, 64)).cls_attn_BTP.shape == (1, 2, 16)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1.*task.teacher.pretrained"):
        build_clip_teacher("ViT-B-16", pretrained="openai", image_size=224)
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        build_clip_teacher("ViT-B-16", pretrained="no-such-tag", image_size=224)
    with pytest.raises(ValueError, match="not an open_clip ViT config"):
        build_clip_teacher("ViT-X-99", pretrained=None, image_size=224)
    with pytest.raises(ValueError, match="distinct block indices"):
        tiny_teacher(return_layers=(1, -1))


def test_meta_device_builds_the_architecture_without_weights():
    # Dry runs count parameters on the meta device: no weight file is read, but the name is still checked.
    with torch.device("meta"):
        teacher = build_clip_teacher("ViT-B-16", pretrained="openai", image_size=224)
        with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
            build_clip_teacher("ViT-B-16", pretrained="/no/such/file.pt", image_size=224)
    width, blocks, patches = 768, 12, 14 * 14
    per_block = (3 * width + 3) * width + (width + 1) * width + 4 * width + (2 * 4 * width + 4 + 1) * width
    expected = 3 * 16 * 16 * width + width + (patches + 1) * width + 2 * width + blocks * per_block + 2 * width
    assert sum(p.numel() for p in teacher.parameters()) == expected + width * 512 == 86_192_640
    assert teacher.grid_size == (14, 14) and teacher.output_dim == 512
