"""The fine-tuning recipe's pieces on tiny inputs, against hand-computed values: multi-view merging and the
classification metrics, label smoothing and Mixup / CutMix, the test-view sampler, layer-decay scopes, the EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import create_model
from pipeline.data.decode import middle_frame_indices, sample_frame_indices, sparse_clip_indices
from pipeline.evaluation.cls_metrics import aggregate_views, classification_summary, confusion_matrix, topk_accuracy
from pipeline.losses import soft_target_cross_entropy
from pipeline.optim import param_groups
from pipeline.tasks.ema import ParameterEMA
from pipeline.tasks.mixup import MixDraw, MixupCutmix, cutmix_box, mix_batch, smoothed_targets


def test_views_merge_as_mean_of_softmax_hand_computed():
    # One video, two views, two classes. View 0 logits (0, ln 3) -> softmax (1/4, 3/4);
    # view 1 logits (ln 4, 0) -> (4/5, 1/5). Mean: (21/40, 19/40), so class 0 wins although the logits' mean
    # (ln 4 / 2, ln 3 / 2) = (0.69, 0.55) and a vote would tie: merging really is over probabilities.
    logits_NVK = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])
    probs = aggregate_views(logits_NVK)
    torch.testing.assert_close(probs, torch.tensor([[21 / 40, 19 / 40]]))
    assert topk_accuracy(probs, torch.tensor([0]), 1) == 100.0
    assert topk_accuracy(probs, torch.tensor([1]), 1) == 0.0


def test_topk_per_class_and_confusion_hand_computed():
    names = ["a", "b", "c"]
    # 5 videos; predicted ranking per row (highest first): 0>1>2, 1>0>2, 2>1>0, 0>2>1, 1>2>0.
    probs = torch.tensor([[.6, .3, .1], [.3, .6, .1], [.1, .3, .6], [.6, .1, .3], [.1, .6, .3]])
    labels = torch.tensor([0, 0, 1, 2, 1])
    # top-1 hits: video 0 (a), video 4 (b) -> 2/5; top-2 adds video 1 (a in 2nd), video 2 (b 2nd), video 3 (c 2nd).
    assert topk_accuracy(probs, labels, 1) == pytest.approx(40.0)
    assert topk_accuracy(probs, labels, 2) == pytest.approx(100.0)
    assert topk_accuracy(probs, labels, 5) == pytest.approx(100.0)  # k capped at K = 3
    confusion = confusion_matrix(probs.argmax(1), labels, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 0]]
    summary = classification_summary(probs, labels, names, top_confused=2)
    assert [row["top1"] for row in summary["per_class"]] == [50.0, 50.0, 0.0]
    assert summary["metrics"]["mean_class_top1"] == pytest.approx(100 / 3)
    pairs = summary["confusion"]["most_confused"]
    assert len(pairs) == 2 and {(p["true"], p["predicted"]) for p in pairs} <= {("a", "b"), ("b", "c"), ("c", "a")}
    assert all(p["videos"] == 1 for p in pairs)
    assert {p["true"]: p["share_of_true"] for p in pairs}.get("c", 100.0) == 100.0


def test_label_smoothing_targets_and_loss_match_torch():
    targets = smoothed_targets(torch.tensor([2, 0]), num_classes=4, smoothing=0.1)
    torch.testing.assert_close(targets, torch.tensor([[.025, .025, .925, .025], [.925, .025, .025, .025]]))
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets),
                               F.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1))


def test_mixup_blends_clips_and_targets_with_the_reversed_batch():
    video = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1, 1).expand(3, 1, 2, 2, 2).clone()
    label = torch.tensor([0, 1, 2])
    mixed, target = mix_batch(video, label, MixDraw(0.7), num_classes=3, smoothing=0.0)
    # sample i mixes with sample 2 - i: values 0.7 * i + 0.3 * (2 - i)
    assert mixed[:, 0, 0, 0, 0].tolist() == pytest.approx([0.6, 1.0, 1.4])
    torch.testing.assert_close(target, torch.tensor([[.7, 0, .3], [0, 1, 0], [.3, 0, .7]]))
    unmixed, smoothed = mix_batch(video, label, MixDraw(1.0), num_classes=3, smoothing=0.3)
    assert unmixed is video and smoothed[0].tolist() == pytest.approx([0.8, 0.1, 0.1])


def test_cutmix_pastes_one_box_in_every_frame_and_corrects_lam():
    video = torch.stack([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)])  # (B=2, C, T=3, H, W)
    mixed, target = mix_batch(video, torch.tensor([0, 1]), MixDraw(0.75, (1, 3, 0, 2)), num_classes=2,
                              smoothing=0.0)
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[1:3, 0:2] = True
    for t in range(3):  # the same 2x2 box in each frame, taken from the other clip
        assert torch.equal(mixed[0, 0, t], box.float()) and torch.equal(mixed[1, 0, t], (~box).float())
    torch.testing.assert_close(target, torch.tensor([[.75, .25], [.25, .75]]))
    # the box of lam = 0.75 on an 8x8 frame is 4x4 = a quarter of the area, unless clipped at a border
    (top, bottom, left, right), lam = cutmix_box(8, 8, 0.75, np.random.default_rng(0))
    assert 1 - lam == pytest.approx((bottom - top) * (right - left) / 64)
    assert bottom - top <= 4 and right - left <= 4


def test_mixup_draws_are_reproducible_and_resumable():
    a = MixupCutmix(5, seed=3, rank=1)
    b = MixupCutmix(5, seed=3, rank=1)
    first = [a.draw(16, 16) for _ in range(4)]
    assert first == [b.draw(16, 16) for _ in range(4)]
    state = a.state_dict()
    ahead = [a.draw(16, 16) for _ in range(3)]
    c = MixupCutmix(5, seed=3, rank=1)
    c.load_state_dict(state)
    assert [c.draw(16, 16) for _ in range(3)] == ahead
    assert MixupCutmix(5, seed=3, rank=2).draw(16, 16) != first[0]
    mixer = MixupCutmix(5, seed=0)
    kinds = {mixer.draw(16, 16).box is None for _ in range(20)}
    assert kinds == {True, False}  # switch_prob 0.5: both mixup and CutMix occur
    assert MixupCutmix(5, prob=0.0).draw(8, 8) == MixDraw(1.0)


def test_test_clip_offsets_follow_the_released_sampler():
    # 81 frames, 8 per clip: segment (81 - 1) / 8 = 10 frames; with 4 clips the offsets are
    # int(10 / 5 * (c + 1)) = 2, 4, 6, 8 inside every segment.
    for clip, offset in enumerate((2, 4, 6, 8)):
        assert sparse_clip_indices(81, 8, 4, clip) == [10 * i + offset for i in range(8)]
    assert sparse_clip_indices(81, 8, 1, 0) == [10 * i + 5 for i in range(8)]  # one clip: near the segment middles
    # 3 frames: segment 0.25, offset int(0.25 / 3 * 2) = 0; round() halves to even, as numpy's does in the released code
    assert sparse_clip_indices(3, 8, 2, 1) == [0, 0, 0, 1, 1, 1, 2, 2]


def _released_classification_sampler(video_size: int, num_frames: int, num_segment: int, clip_idx: int) -> list[int]:
    """The released test sampler's arithmetic (VideoMamba `Kinetics_sparse._get_seq_frames`, test mode), in numpy."""
    seg_size = max(0.0, float(video_size - 1) / num_frames)
    duration = seg_size / (num_segment + 1)
    return [min(int(np.round(seg_size * i)) + int(duration * (clip_idx + 1)), video_size - 1)
            for i in range(num_frames)]


def test_classification_sampler_matches_the_released_arithmetic_and_is_not_the_zero_shot_middle():
    for n in range(1, 400):
        for T, C in ((8, 1), (8, 4), (16, 2), (32, 4), (64, 10)):
            for c in range(C):
                assert sparse_clip_indices(n, T, C, c) == _released_classification_sampler(n, T, C, c), (n, T, C, c)
        # the validation view is the one-clip case, as a data sampling mode
        assert sample_frame_indices(n, 8, "sparse_middle") == sparse_clip_indices(n, 8)
    # The zero-shot retrieval rule picks other frames (docs/finetune.md's example): both are released, per task.
    assert sample_frame_indices(81, 8, "middle") == middle_frame_indices(81, 8) == [4, 14, 24, 34, 44, 54, 64, 75]
    assert sample_frame_indices(81, 8, "sparse_middle") == [5, 15, 25, 35, 45, 55, 65, 75]


def test_layer_decay_scopes():
    model = create_model("videomamba_test", num_classes=3)
    released = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.5, "released") for n in g["names"]}
    beit = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.5, "all_layers") for n in g["names"]}
    depth = model.depth  # 2: layer 0 gets 0.5 ** 3
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert released[name] == beit[name] == pytest.approx(0.5 ** (depth + 1))
    # the released lookup knows no temporal_pos_embedding and skips the blocks: full LR there
    assert released["temporal_pos_embedding"] == 1.0 and beit["temporal_pos_embedding"] == pytest.approx(0.125)
    assert released["layers.0.mixer.in_proj.weight"] == 1.0 and beit["layers.0.mixer.in_proj.weight"] == 0.25
    assert released["head.weight"] == beit["head.weight"] == released["norm_f.weight"] == 1.0
    # the released fine-tuning also weight-decays the 2-D A_log / A_b_log (optim.decay_ssm_a, set in its configs)
    groups = param_groups(model, 0.05, 0.5, "released", decay_ssm_a=True)
    decay = {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["names"]}
    assert decay["layers.0.mixer.A_log"] == decay["layers.0.mixer.A_b_log"] == (0.05, 1.0)
    assert decay["layers.0.mixer.D"] == (0.0, 1.0) and decay["pos_embed"] == (0.0, 0.5 ** (depth + 1))


def test_ema_averages_weights_and_runs_the_model_with_them():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ParameterEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3
    torch.testing.assert_close(ema.averages()["weight"], torch.full((1, 2), 1.2))
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(ema.run(model, x), torch.tensor([[3.6]]))
    assert model.weight.flatten().tolist() == [3.0, 3.0]  # the model keeps its own weights
    assert set(ema.state_dict()) == {"weight"} and ema.state_dict()["weight"].dtype == torch.float32
