"""Stage 1 (pipeline/tasks/masked_alignment.py): attention masks, student features, loss, a few CPU training steps."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

import itertools

import numpy as np
import pytest
import torch

from models.videomamba import visible_index
from pipeline.config import ConfigError, load_config
from pipeline.losses import cosine_alignment_loss
from pipeline.tasks import build_task
from pipeline.tasks.attention_mask import AttentionMasker, attention_keep_mask, num_visible
from pipeline.tasks.clip_alignment import sinusoid_table, visible_tokens
from pipeline.tasks.masked_alignment import MaskedAlignmentTask

TINY_TEACHER = "task.teacher.vision_overrides={layers: 2, width: 64, head_width: 32}"


def tiny_cfg(*overrides: str):
    return load_config(None, [
        "task.name=masked_alignment", "task.teacher.pretrained=null", TINY_TEACHER, "model.name=videomamba_test",
        "model.scan_backend=ref", "data.num_frames=4", "data.img_size=32", "data.mask.type=attention", *overrides,
    ])


def tiny_task(*overrides: str, seed: int = 0) -> MaskedAlignmentTask:
    torch.manual_seed(seed)
    return build_task(tiny_cfg(*overrides))


def clip(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- attention masks


@pytest.mark.parametrize("P,ratio", [(4, 0.5), (196, 0.8), (196, 0.9), (16, 0.0)])
def test_attention_mask_keeps_exactly_n_visible_per_frame(P, ratio):
    attn = torch.rand(3, 5, P).softmax(-1)
    keep = attention_keep_mask(attn, ratio, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (3, 5 * P) and keep.dtype == torch.bool
    expected = {(196, 0.8): 40, (196, 0.9): 20, (4, 0.5): 2, (16, 0.0): 16}[(P, ratio)]  # released rounding
    assert num_visible(P, ratio) == expected
    assert bool((keep.view(3, 5, P).sum(-1) == expected).all())


def test_attention_mask_is_seeded_and_survives_zero_weights():
    attn = torch.rand(2, 3, 16)
    attn[..., :12] = 0  # bf16 underflow can zero most weights; still 8 tokens must be drawn
    a = attention_keep_mask(attn, 0.5, generator=torch.Generator().manual_seed(7))
    b = attention_keep_mask(attn, 0.5, generator=torch.Generator().manual_seed(7))
    c = attention_keep_mask(attn, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(a.view(2, 3, 16)[..., 12:].all())  # the positive-weight tokens are always among the kept


def test_attention_masker_state_continues_the_draws():
    attn = torch.rand(2, 3, 16)
    straight = AttentionMasker(0.5, seed=3)
    expected = [straight(attn) for _ in range(4)]
    stopped = AttentionMasker(0.5, seed=3)
    assert stopped.state_dict() == {}  # nothing drawn yet: a restore would seed afresh
    first = [stopped(attn) for _ in range(2)]
    resumed = AttentionMasker(0.5, seed=3)
    resumed.load_state_dict(stopped.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(first + [resumed(attn), resumed(attn)], expected, strict=True))
    assert not torch.equal(expected[0], expected[2])  # the draws move on
    cuda_state = AttentionMasker(0.5, seed=3)
    cuda_state.load_state_dict({**stopped.state_dict(), "device": "cuda"})
    with pytest.raises(ValueError, match="resume on the device type the run was started on"):
        cuda_state(attn)


def test_attention_mask_samples_in_proportion_to_attention():
    # Keeping 2 of 4 without replacement: P(i kept) = w_i + sum_{j != i} w_j * w_i / (1 - w_j).
    w = torch.tensor([0.5, 0.3, 0.15, 0.05])
    exact = [w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(4) if j != i) for i in range(4)]
    draws = 4000
    keep = attention_keep_mask(w.expand(1, draws, 4), 0.5, generator=torch.Generator().manual_seed(0))
    freq = keep.view(draws, 4).float().mean(0)
    torch.testing.assert_close(freq, torch.stack(exact).float(), atol=0.03, rtol=0)
    assert freq[0] > freq[1] > freq[2] > freq[3]


# ----------------------------------------------------------------------------- pieces


def test_loss_is_zero_for_identical_and_four_for_opposite():
    x = torch.randn(2, 5, 8)
    assert cosine_alignment_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_alignment_loss(x, -3 * x).item() == pytest.approx(4.0, abs=1e-6)
    y = torch.randn(2, 5, 8)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert cosine_alignment_loss(x, y).item() == pytest.approx((2 - 2 * cos).mean().item(), abs=1e-6)


def test_visible_tokens_keep_cls_and_order():
    x = torch.arange(2 * 2 * 5 * 1.0).reshape(2, 2, 5, 1)  # K=2, B=2, L=1+4
    keep = torch.tensor([[True, False, False, True], [False, True, True, False]])
    got = visible_tokens(x, visible_index(keep))
    want = torch.stack([torch.stack([x[k, b, [0] + [1 + i for i in range(4) if keep[b, i]]] for b in range(2)])
                        for k in range(2)])
    assert torch.equal(got, want)


def test_sinusoid_table_matches_the_formula():
    L, D = 7, 6
    table = np.array([[p / np.power(10000, 2 * (j // 2) / D) for j in range(D)] for p in range(L)])
    table[:, 0::2], table[:, 1::2] = np.sin(table[:, 0::2]), np.cos(table[:, 1::2])
    np.testing.assert_allclose(sinusoid_table(L, D).numpy(), table, atol=1e-6)


# ----------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def task() -> MaskedAlignmentTask:
    return tiny_task()


def test_all_visible_forward_equals_full_forward(task):
    student = task.student.eval()
    video = clip(1)
    full = student.forward_features(video, return_residuals=[1])
    visible = student.forward_features(video, keep_BL=torch.ones(2, 16, dtype=torch.bool), return_residuals=[1])
    torch.testing.assert_close(visible.tokens_BLD, full.tokens_BLD, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(visible.residuals[1], full.residuals[1], atol=1e-6, rtol=1e-6)


def test_task_outputs_and_frozen_teacher(task):
    task.train()
    out = task({"video": clip(2), "text": ["a", "b"], "index": torch.arange(2)})
    assert set(out) == {"loss", "loss_align_L1"}
    assert 0.0 <= out["loss"].item() <= 4.0 and out["loss"].item() == out["loss_align_L1"].item()
    out["loss"].backward()
    assert not task.teacher.training
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in task.clip_decoder.parameters())
    assert task.trainable_module() is task.student
    assert task.export_metadata()["model_name"] == "videomamba_test"
    task.zero_grad(set_to_none=True)


def test_seeded_task_is_reproducible():
    video = clip(3)
    losses = [tiny_task(seed=5)({"video": video})["loss"].item() for _ in range(2)]
    assert losses[0] == losses[1]


def test_released_quirk_aligns_the_residual_and_freezes_the_last_block():
    task = tiny_task("task.student_feature=residual_before_last_block", "data.mask.type=none")
    last = task.student.layers[-1]
    assert not any(p.requires_grad for p in [*last.parameters(), *task.student.norm_f.parameters()])
    video = clip(4)
    feats = task.student.forward_features(video, return_residuals=[1])
    # Reference: the released head input is the raw residual entering block 1 (= depth - 1), plus the table.
    pred = task.clip_decoder[0](feats.residuals[1] + task.head_pos_LD)
    target = task.teacher(video).targets_KBLC[0]
    task.eval()
    assert task({"video": video})["loss"].item() == pytest.approx(cosine_alignment_loss(pred, target).item(), abs=1e-6)


def test_two_aligned_layers_use_the_normed_block_outputs():
    task = tiny_task("task.num_align_layers=2", "data.mask.type=none", "task.head_pos_embed=false").eval()
    video = clip(5)
    feats = task.student.forward_features(video, return_residuals=[1])
    targets = task.teacher(video).targets_KBLC
    assert task.teacher.return_layers == [0, 1]
    rms = task.student.norm_f
    block0 = feats.residuals[1] * torch.rsqrt(feats.residuals[1].pow(2).mean(-1, keepdim=True) + rms.eps) * rms.weight
    want = {"loss_align_L0": cosine_alignment_loss(task.clip_decoder[0](block0), targets[0]),
            "loss_align_L1": cosine_alignment_loss(task.clip_decoder[1](feats.tokens_BLD), targets[1])}
    out = task({"video": video})
    for name, value in want.items():
        assert out[name].item() == pytest.approx(value.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((want["loss_align_L0"] + want["loss_align_L1"]).item() / 2, abs=1e-5)


def test_a_few_cpu_steps_reduce_the_loss_with_a_data_side_mask():
    task = tiny_task("data.mask.type=tube", "data.mask.ratio=0.5").train()
    keep = torch.tensor([True, False, True, False] * 4).expand(2, 16)  # the loader's `keep`, fixed here
    batch = {"video": clip(6), "keep": keep}
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        loss = task(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="no 'keep' entry"):
        tiny_task("data.mask.type=tube")({"video": clip(0)})
    with pytest.raises(ConfigError, match="task.teacher.layers"):
        tiny_cfg("task.teacher.layers=[0, 1]")
    with pytest.raises(ValueError, match="task.teacher.image_size"):
        tiny_task("task.teacher.image_size=64")
    with pytest.raises(ConfigError, match="data.num_frames/img_size"):
        tiny_task("data.num_frames=8")
    with pytest.raises(ConfigError, match="task.num_align_layers"):
        tiny_task("task.num_align_layers=3")
    with pytest.raises(ConfigError, match="task.student_feature"):
        tiny_cfg("task.student_feature=last")


def test_every_combination_of_mask_and_feature_runs():
    for mask, feature in itertools.product(["attention", "none"], ["final_norm", "residual_before_last_block"]):
        out = tiny_task(f"data.mask.type={mask}", f"task.student_feature={feature}")({"video": clip(7, batch=1)})
        assert torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------- job and engine


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_job_dry_run_prints_the_plan(tmp_path, monkeypatch, capsys, offline_clip_cache):  # the CLIP weights cached
    import runpy
    import sys

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [
        "pretrain_mask.py", "--config", "configs/stages/pretrain_mask_m.yaml", "--dry-run", f"output_dir={tmp_path}",
        "task.student_feature=residual_before_last_block",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        runpy.run_path("jobs/pretrain_mask.py", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    # Trainable: M backbone without head (73,645,056) + one head 576 -> 512 with LayerNorm (296,448), less the
    # frozen last block (2,283,840 per layer, docs/model.md) and norm_f (576); ViT-B/16's visual is frozen.
    assert 73_645_056 + 296_448 - 2_283_840 - 576 == 71_657_088
    assert "videomamba_middle: 160,134,144 parameters (71,657,088 trainable)" in out
    assert "global batch 2048; 93750 steps" in out
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_local_run_exports_a_loadable_backbone(tmp_path):
    from models import create_model, load_pretrained
    from pipeline.data.synthetic import make_synthetic
    from pipeline.engine import train

    shards = make_synthetic(str(tmp_path / "data"), num_videos=5, num_frames=8, size=32, shard_size=2)
    cfg = load_config(os.path.join(REPO, "configs/stages/pretrain_mask_test.yaml"), [
        "scaling.use_ray=false", f"output_dir={tmp_path}/out", f"checkpoint.path={tmp_path}/ckpt",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"data.train_shards={shards['train_shards']}",
        "optim.max_steps=3", "optim.warmup_steps=1", "tracking.log_interval=3", "checkpoint.interval_steps=3",
        "data.batch_size=2",
    ])  # fmt: skip
    result = train(cfg)
    assert result.step == 3
    assert 0.0 < result.metrics["train/loss_align_L1"] < 4.0
    assert result.metrics["data/epoch"] == 1.5  # 4 training clips in the manifest, 2 per step: 3 steps
    exported = torch.load(result.export_path)
    meta = exported["meta"]
    assert meta["model_name"] == "videomamba_test" and meta["model_kwargs"]["num_classes"] == 0
    student = create_model(meta["model_name"], **meta["model_kwargs"])
    assert sorted(exported["state_dict"]) == sorted(student.state_dict())  # backbone only, official keys
    report = load_pretrained(student, result.export_path)
    assert report.missing == [] and report.unexpected == []
