"""Stage 3 (models/video_text.py, models/text.py, pipeline/tasks/video_text.py): temperature clamp, learning on a
fixed batch, UTA with attention masks, images as static clips, CLIP text weights from a file, export round trip."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

import pytest
import torch

from models import create_model, load_pretrained
from models.text import create_text_encoder
from models.video_text import TEMP_MAX, TEMP_MIN, VideoTextModel
from pipeline.config import ConfigError, load_config
from pipeline.tasks import build_task

CONFIG = "configs/stages/pretrain_vtc_test.yaml"
TINY_TEACHER = "task.teacher.vision_overrides={layers: 1, width: 64, head_width: 32}"
CAPTIONS = ["a red circle moves left", "two blue squares move up", "a green triangle moves right",
            "a white square moves down"]


def tiny_task(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_task(load_config(CONFIG, ["model.scan_backend=ref", *overrides]))


def fixed_batch(batch: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(batch, 3, 4, 32, 32, generator=gen), "text": CAPTIONS[:batch],
            "index": torch.arange(batch)}


def retrieval_r1(model: VideoTextModel, batch: dict) -> tuple[float, float]:
    with torch.no_grad():
        sim = model.encode_video(batch["video"]) @ model.encode_text(batch["text"]).t()
    target = torch.arange(len(sim))
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


@pytest.mark.parametrize("push", [+1.0, -1.0])
def test_temperature_is_clamped_after_steps_that_push_it_out(push):
    task = tiny_task()
    task.train()
    batch = fixed_batch()
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
    out = task(batch)
    assert out["temp"].item() == pytest.approx(0.07)
    # A huge gradient on the temperature drives the raw parameter far outside the allowed range.
    (out["loss"] - push * 1e4 * task.model.temp).backward()
    optimizer.step()
    assert not TEMP_MIN <= task.model.temp.item() <= TEMP_MAX  # the optimizer left it outside ...
    out = task(batch)  # ... and the next forward clamps it back in place before using it
    assert task.model.temp.item() == pytest.approx(TEMP_MAX if push > 0 else TEMP_MIN)
    assert torch.isfinite(out["loss"])


def test_training_steps_raise_in_batch_retrieval():
    task = tiny_task("task.vtm_weight=0")  # contrastive only: the matching head is exercised elsewhere
    batch = fixed_batch()
    task.eval()
    before = retrieval_r1(task.model, batch)
    task.train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        out = task(batch)
        assert set(out) == {"loss", "vtc", "temp", "vtc_acc"}
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["vtc"].item())
    task.eval()
    after = retrieval_r1(task.model, batch)
    assert min(before) < 1.0 and after == (1.0, 1.0), (before, after)
    assert losses[-1] < 0.5 * losses[0]


def test_uta_with_attention_masks_aligns_visible_tokens_only():
    task = tiny_task("task.uta_weight=1.0", "task.teacher.pretrained=null", TINY_TEACHER,
                     "data.mask.type=attention", "data.mask.ratio=0.5")
    task.train()
    seen = {}
    hook = task.model.vision_encoder.layers[0].register_forward_hook(
        lambda module, args, out: seen.update(tokens=args[0].shape[1]))
    try:
        out = task(fixed_batch())
    finally:
        hook.remove()
    assert seen["tokens"] == 1 + 4 * 2  # CLS + half of the 4 patches of each of the 4 frames
    assert {"vtc", "vtm", "uta"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert task.uta.head.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.teacher.parameters())


def test_attention_mask_config_requires_no_uta_but_builds_the_teacher():
    task = tiny_task("task.teacher.pretrained=null", TINY_TEACHER, "data.mask.type=attention")
    assert task.teacher is not None and task.uta is None
    with pytest.raises(ConfigError, match="task.vtm_layers"):
        load_config(CONFIG, ["task.vtm_layers=0"])


def test_images_are_encoded_as_static_clips():
    model = tiny_task().model.eval()
    image = torch.randn(2, 3, 1, 32, 32)
    torch.testing.assert_close(model.encode_video(image), model.encode_video(image.repeat(1, 1, 4, 1, 1)))


def test_text_tower_loads_clip_text_weights_from_a_file(tmp_path):
    import open_clip

    # A tiny CLIP registered with open_clip exactly as its shipped configs are (77-token context, BPE vocab).
    name = "test-tiny-clip"
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    path = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(name).state_dict(), path)  # flat CLIP keys, as OpenAI's files
    encoder = create_text_encoder(name, pretrained=str(path), context_length=16)
    reference = open_clip.create_model(name, pretrained=str(path), force_custom_text=True).text
    reference.text_projection, reference.output_tokens = None, True
    texts = ["a red circle moves left", "two blue squares move up and then down again"]
    full_BL = open_clip.get_tokenizer(name)(texts)  # 77 tokens
    with torch.no_grad():
        pooled, tokens, valid = encoder(encoder.tokenize(texts))
        ref_pooled, ref_tokens = reference(full_BL)
    # Causal attention: truncating the context to 16 changes nothing for texts that fit.
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, ref_tokens[:, :16], rtol=1e-5, atol=1e-5)
    assert valid.sum(1).tolist() == [int(n) + 1 for n in full_BL.argmax(1)]
    with pytest.raises(ValueError, match="cannot be combined with pretrained"):
        create_text_encoder(name, pretrained=str(path), width=128)


def test_vtm_scores_for_clip_runs_the_backbone_once():
    """Re-ranking one clip's candidates: the same logits as scoring each (clip, text) pair, one backbone pass."""
    model = tiny_task().model.eval()
    clip = fixed_batch(batch=1)["video"]
    texts = CAPTIONS[:5]
    pairs = model.vtm_scores(clip.expand(len(texts), -1, -1, -1, -1), texts)
    calls = []
    forward_features = model.vision_encoder.forward_features
    model.vision_encoder.forward_features = lambda *a, **k: calls.append(a[0].shape[0]) or forward_features(*a, **k)
    shared = model.vtm_scores_for_clip(clip, texts, batch_size=2)  # three text batches
    assert calls == [1], calls
    torch.testing.assert_close(shared, pairs, rtol=1e-5, atol=1e-6)
    assert model.vtm_scores_for_clip(clip, []).shape == (0,)
    with pytest.raises(ValueError, match="one clip"):
        model.vtm_scores_for_clip(clip.expand(2, -1, -1, -1, -1), texts)


def test_export_round_trip_and_backbone_keys(tmp_path):
    task = tiny_task()
    task.eval()
    path = tmp_path / "model.pt"
    # The engine's export format (pipeline/engine.py Trainer.export).
    torch.save({"state_dict": task.trainable_module().state_dict(),
                "meta": {"task": "video_text", **task.export_metadata()}}, path)
    model = VideoTextModel.from_export(path).eval()
    batch = fixed_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(batch["video"]), task.model.encode_video(batch["video"]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(batch["text"]), task.model.encode_text(batch["text"]),
                                   rtol=0, atol=0)
    torch.testing.assert_close(model.vtm_scores(batch["video"], batch["text"]),
                               task.model.vtm_scores(batch["video"], batch["text"]), rtol=0, atol=0)
    norms = model.encode_video(batch["video"]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    # The next stage (or eval of the backbone) loads the vision encoder from the same file.
    backbone = create_model("videomamba_test", num_frames=4, img_size=32, num_classes=0)
    report = load_pretrained(backbone, path)
    assert report.missing == [] and report.unexpected == []


def test_periodic_evaluation_reports_the_evaluator_metrics_and_ignores_pad_rows():
    from pipeline.evaluation import retrieval_metrics

    task = tiny_task()
    task.eval()
    batch = fixed_batch()
    # Clips and captions unlike the first batch's: duplicates would tie in the ranking, and how a tie breaks
    # depends on floating-point noise between batched and concatenated encoding.
    padded = {**fixed_batch(seed=1), "text": [f"{c} slowly" for c in CAPTIONS],
              "valid": torch.tensor([True, True, True, False])}
    with torch.no_grad():
        got = task.evaluate([batch, padded])
        video = task.model.encode_video(torch.cat([batch["video"], padded["video"][:3]]))
        text = task.model.encode_text(batch["text"] + padded["text"][:3])
    clips = range(7)
    want = retrieval_metrics(text @ video.t(), list(clips), [[j] for j in clips])
    assert set(got) == {"t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5"}
    for name, value in got.items():
        assert value == pytest.approx(want[name])
