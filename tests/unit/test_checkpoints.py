"""Checkpoint loading: the official file layouts (written here by hand from the released key table),
position-embedding interpolation, 2-D inflation, renames, head handling, and our own export."""

import logging
import math

import pytest
import torch

from models import create_model, load_pretrained, save_pretrained
from models.checkpoints import interpolate_pos_embed, interpolate_temporal_embed

D, DEPTH, CLASSES, FRAMES, PATCHES = 32, 2, 5, 4, 4  # videomamba_test
E, R, N = 2 * D, math.ceil(D / 16), 16


def official_state(seed=0, image=False, classes=CLASSES, frames=FRAMES, head=True):
    """A state dict in the released key names and shapes (docs/model.md, "Checkpoints"), random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, PATCHES + 1, D)}
    if not image:
        shapes["temporal_pos_embedding"] = (1, frames, D)
    shapes["patch_embed.proj.weight"] = (D, 3, 16, 16) if image else (D, 3, 1, 16, 16)
    shapes["patch_embed.proj.bias"] = (D,)
    if head:
        shapes.update({"head.weight": (classes, D), "head.bias": (classes,)})
    for i in range(DEPTH):
        p = f"layers.{i}."
        shapes.update({p + "mixer.A_log": (E, N), p + "mixer.D": (E,), p + "mixer.A_b_log": (E, N),
                       p + "mixer.D_b": (E,), p + "mixer.in_proj.weight": (2 * E, D)})
        for s in ("", "_b"):
            shapes.update({p + f"mixer.conv1d{s}.weight": (E, 1, 4), p + f"mixer.conv1d{s}.bias": (E,),
                           p + f"mixer.x_proj{s}.weight": (R + 2 * N, E), p + f"mixer.dt_proj{s}.weight": (E, R),
                           p + f"mixer.dt_proj{s}.bias": (E,)})
        shapes.update({p + "mixer.out_proj.weight": (D, E), p + "norm.weight": (D,)})
    shapes["norm_f.weight"] = (D,)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    for k in state:
        if k.endswith("A_log") or k.endswith("A_b_log"):
            state[k] = state[k].abs()  # keep A = -exp(A_log) a sane decay
    return state


@pytest.fixture
def video():
    return torch.randn(2, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_loaded(model, state, skip=()):
    own = model.state_dict()
    for k, v in state.items():
        if k not in skip:
            assert torch.equal(own[k], v), k


def test_raw_official_file_loads_completely(tmp_path, video):
    state = official_state()
    torch.save(state, tmp_path / "videomamba_t16_k400_f4.pth")
    model = create_model("videomamba_test").eval()
    report = load_pretrained(model, tmp_path / "videomamba_t16_k400_f4.pth")
    assert (report.missing, report.unexpected, report.interpolated, report.dropped) == ([], [], {}, {})
    assert_loaded(model, state)
    # Any wrapper of the same tensors gives the same model, bit for bit.
    with torch.no_grad():
        expected = model(video)
        for wrapped in ({"model": state, "epoch": 3}, {"module": state},
                        {"module." + k: v for k, v in state.items()}):
            other = create_model("videomamba_test").eval()
            report = load_pretrained(other, wrapped)
            assert report.missing == [] and report.unexpected == []
            assert torch.equal(other(video), expected)


def test_image_checkpoint_is_inflated(caplog):
    """IN-1K files: {"model": ...}, Conv2d patch kernel, no temporal embedding, 1000-class head."""
    state = official_state(image=True, classes=1000)
    model = create_model("videomamba_test", tubelet_size=2, num_frames=4)
    with caplog.at_level(logging.WARNING, logger="models.checkpoints"):
        report = load_pretrained(model, {"model": state})
    assert report.missing == ["temporal_pos_embedding", "head.weight", "head.bias"]  # head: new, random
    assert report.unexpected == []
    assert set(report.dropped) == {"head.weight", "head.bias"} and "head.weight" in caplog.text
    assert "2-D kernel inflated" in report.interpolated["patch_embed.proj.weight"]
    kernel = model.patch_embed.proj.weight.detach()
    assert kernel.shape == (D, 3, 2, 16, 16)
    assert torch.equal(kernel[:, :, 1], state["patch_embed.proj.weight"]) and not kernel[:, :, 0].any()
    assert not model.temporal_pos_embedding.any()  # stays at its zero init, as released
    assert_loaded(model, state, skip=("patch_embed.proj.weight", "head.weight", "head.bias"))
    with pytest.raises(ValueError, match="num_classes"):
        load_pretrained(create_model("videomamba_test"), {"model": state}, strict_head=True)


def test_masked_pretrain_file_maps_norm_to_norm_f():
    state = official_state(head=False)
    state["norm.weight"] = state.pop("norm_f.weight")
    state.update({"clip_decoder.0.head.weight": torch.zeros(512, D), "clip_decoder.0.head.bias": torch.zeros(512)})
    model = create_model("videomamba_test", num_classes=0)
    report = load_pretrained(model, state)
    assert report.renamed == {"norm.weight": "norm_f.weight"} and report.missing == []
    assert report.unexpected == ["clip_decoder.0.head.weight", "clip_decoder.0.head.bias"]
    assert torch.equal(model.norm_f.weight, state["norm.weight"])


def test_multimodal_file_keeps_the_vision_encoder():
    backbone = official_state(head=False)
    backbone["norm.weight"] = backbone.pop("norm_f.weight")
    state = {"vision_encoder." + k: v for k, v in backbone.items()}
    state.update({"vision_encoder.pool_norm.weight": torch.ones(D), "text_encoder.bert.x": torch.zeros(3),
                  "text_encoder.cls.y": torch.zeros(3), "clip_teacher.z": torch.zeros(2), "temp": torch.ones(())})
    model = create_model("videomamba_test", num_classes=0)
    report = load_pretrained(model, {"model": state})
    assert report.missing == [] and report.unexpected == ["pool_norm.weight"]
    assert report.dropped == {"text_encoder*": "not part of the video backbone (2 tensors)",
                              "clip_teacher*": "not part of the video backbone (1 tensors)",
                              "temp*": "not part of the video backbone (1 tensors)"}
    assert_loaded(model, {k: v for k, v in backbone.items() if k != "norm.weight"})


def test_frames_and_resolution_are_interpolated():
    state = official_state(frames=2)
    model = create_model("videomamba_test", img_size=64, num_frames=4)
    report = load_pretrained(model, state)
    assert report.missing == [] and report.unexpected == []
    assert report.interpolated == {"pos_embed": "(1, 5, 32) -> (1, 17, 32) (bicubic, CLS row kept)",
                                   "temporal_pos_embedding": "(1, 2, 32) -> (1, 4, 32) (linear)"}
    # Linear, align_corners=False: output j samples input position (j + 0.5) * 2/4 - 0.5, clamped to [0, 1].
    t0, t1 = state["temporal_pos_embedding"][0]
    expected = torch.stack([t0, 0.75 * t0 + 0.25 * t1, 0.25 * t0 + 0.75 * t1, t1])
    torch.testing.assert_close(model.temporal_pos_embedding[0].detach(), expected)
    assert torch.equal(model.pos_embed[0, 0], state["pos_embed"][0, 0])


def test_interpolation_keeps_identity_constants_and_orientation():
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 1 + 16, 8, generator=g)
    assert torch.equal(interpolate_pos_embed(pos, 16), pos)
    temporal = torch.randn(1, 4, 8, generator=g)
    torch.testing.assert_close(interpolate_temporal_embed(temporal, 4), temporal)
    # A grid that varies along rows only must still vary along rows only (no transpose), constants stay.
    rows = torch.arange(4.0).repeat_interleave(4)[None, :, None].expand(1, 16, 8)
    up = interpolate_pos_embed(torch.cat([torch.full((1, 1, 8), 7.0), rows], dim=1), 64)
    grid = up[0, 1:, 0].reshape(8, 8)
    assert up[0, 0, 0] == 7.0 and torch.allclose(grid, grid[:, :1].expand(8, 8))
    assert (grid[1:, 0] >= grid[:-1, 0]).all() and grid[-1, 0] > grid[0, 0]
    const = interpolate_temporal_embed(torch.full((1, 3, 8), 2.5), 7)
    torch.testing.assert_close(const, torch.full((1, 7, 8), 2.5))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pos[:, :9], 16)  # 8 patches: no square grid


def test_wrong_size_checkpoint_is_refused():
    state = official_state()
    state["layers.0.mixer.in_proj.weight"] = torch.zeros(2 * E, D + 1)
    with pytest.raises(ValueError, match=r"layers.0.mixer.in_proj.weight.*\(128, 33\).*\(128, 32\)"):
        load_pretrained(create_model("videomamba_test"), state)


def test_export_round_trip(tmp_path, video):
    model = create_model("videomamba_test").eval()
    path = tmp_path / "export.pth"
    save_pretrained(model, path)
    state = torch.load(path, weights_only=True)
    assert list(state) == list(official_state())  # same keys, same order as a released file
    fresh = create_model("videomamba_test").eval()
    report = load_pretrained(fresh, path)
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        assert torch.equal(fresh(video), model(video))
