"""Stage 3 with the BERT tower (pipeline/tasks/video_text_bert.py): each loss part against a hand computation on a
tiny batch (VTC frame-mean InfoNCE, VTM pairs and the released negative distribution, MLM masking and loss, UTA
on the residual entering the last block), frozen heads, the released export layout at full size, and the tiny
task through the real Trainer: export, load it three ways, continue from it, evaluate it with the retrieval job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never try the network

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import create_model, load_pretrained
from models.umt import frame_mean_similarity
from models.umt_checkpoint import load_umt_model, released_layout, released_state_dict
from pipeline.config import ConfigError, load_config
from pipeline.losses import sample_hard_negatives
from pipeline.tasks import build_task
from pipeline.tasks.clip_alignment import sinusoid_table, visible_tokens
from pipeline.tasks.mlm import IGNORE, SpecialTokens, mask_caption_tokens, masked_lm_loss

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/stages/pretrain_vtc_bert_test.yaml"
TOKENIZER = REPO / "configs/text/tiny_bert"
RELEASED_KEYS = REPO / "tests/data/umt_videomamba_m16_released_keys.json"
TINY_TEACHER = ["task.teacher.pretrained=null", "task.teacher.vision_overrides={layers: 1, width: 64, head_width: 32}"]
CAPTIONS = ["A red circle moves left.", "two blue squares move up", "a green triangle moves right",
            "a yellow square moves down"]


def tiny_task(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_task(load_config(CONFIG, ["model.scan_backend=ref", f"task.text.model={TOKENIZER}", *overrides]))


def fixed_batch(batch: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(batch, 3, 4, 32, 32, generator=gen), "text": CAPTIONS[:batch],
            "index": torch.arange(batch)}


def perturbed(task):
    """Every weight moved off its init, so no LayerNorm is the identity and no bias is 0."""
    with torch.no_grad():
        for name, param in task.model.named_parameters():
            if name != "temp":
                param.add_((0.2 if param.dim() == 1 else 0.05) * torch.randn_like(param))
    return task


# ---------------------------------------------------------------------------------------------- MLM


def test_mlm_masking_follows_the_released_rule():
    special = SpecialTokens(pad=0, cls=2, mask=4, vocab_size=80)
    ids = torch.randint(5, 80, (400, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = special.cls
    ids[:, 20:] = special.pad
    masked, labels = mask_caption_tokens(ids, special, prob=0.5, generator=torch.Generator().manual_seed(1))
    picked = labels != IGNORE
    assert not picked[:, 0].any() and not picked[:, 20:].any()  # never [CLS] or padding
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    assert picked[:, 1:20].float().mean().item() == pytest.approx(0.5, abs=0.02)
    as_mask = (masked == special.mask) & picked
    unchanged = (masked == ids) & picked
    shares = [as_mask.sum() / picked.sum(), unchanged.sum() / picked.sum()]
    assert [s.item() for s in shares] == pytest.approx([0.8, 0.1 + 0.1 / 80], abs=0.015)  # random ids may repeat


def test_mlm_loss_of_the_task_equals_a_hand_computation():
    task = perturbed(tiny_task("task.vtm_weight=0")).eval()  # eval: no dropout; MLM is then the one random draw
    batch = fixed_batch()
    torch.manual_seed(7)
    out = task(batch)
    ids, mask = task.captions(batch["text"])
    assert task.model.tokenizer.convert_ids_to_tokens(ids[0, :7].tolist()) == [
        "[CLS]", "a", "red", "circle", "moves", "left", "[SEP]"]  # cleaned: no capital, no full stop
    torch.manual_seed(7)
    masked, labels = mask_caption_tokens(ids, task.special, 0.5)
    with torch.no_grad():
        patches = task.model.encode_vision(batch["video"], per_frame=True)[0]
        logits = task.model.mlm_logits(masked, mask, patches)
    terms = [-(logits[b, i, labels[b, i]] - torch.logsumexp(logits[b, i], 0))
             for b in range(4) for i in range(ids.shape[1]) if labels[b, i] != IGNORE]
    assert len(terms) > 4
    assert out["mlm"].item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-5)
    # No position to predict: 0 with a zero gradient, where a mean over none would be NaN.
    empty = masked_lm_loss(logits.requires_grad_(True), torch.full_like(labels, IGNORE))
    empty.backward()
    assert empty.item() == 0 and logits.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------- VTC, VTM


def test_vtc_is_infonce_over_the_frame_mean_similarity():
    task = perturbed(tiny_task("task.vtm_weight=0", "task.mlm_weight=0")).eval()
    batch = fixed_batch()
    with torch.no_grad():
        out = task(batch)
        _, pooled = task.model.encode_vision(batch["video"], per_frame=True)  # no mask: one slot per frame
        _, text = task.model.encode_text(*task.captions(batch["text"]))
        sim_tv = frame_mean_similarity(text, task.model.vision_proj(pooled)) / 0.07
    target = torch.arange(4)
    expected = (F.cross_entropy(sim_tv, target) + F.cross_entropy(sim_tv.T, target)) / 2
    assert pooled.shape == (4, 4, 32)
    assert out["vtc"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_hard_negatives_follow_the_released_distribution():
    sim = torch.tensor([[5.0, 1.0, 2.0], [0.0, 5.0, 0.0], [3.0, -1.0, 4.0]])
    index = torch.tensor([0, 1, 2])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, index, gen, floor=0.0)[0] for _ in range(4000)])
    # Row 0 draws text 1 or 2 with probabilities softmax([1, 2]) (the released weights, renormalised).
    expected = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    observed = torch.stack([(draws[:, 0] == j).float().mean() for j in (1, 2)])
    torch.testing.assert_close(observed, expected, atol=0.025, rtol=0)
    assert (draws[:, 0] != 0).all() and (draws[:, 1] != 1).all()
    # Similarities so peaked that every negative's softmax probability underflows still give a draw.
    peaked = torch.tensor([[0.0, -1e4], [-1e4, 0.0]])
    assert sample_hard_negatives(peaked, torch.arange(2), floor=0.0)[0].tolist() == [1, 0]


def test_vtm_scores_the_positive_and_both_hard_negatives_through_the_fusion_layers():
    task = perturbed(tiny_task("task.mlm_weight=0")).eval()
    batch = fixed_batch()
    torch.manual_seed(3)
    out = task(batch)
    with torch.no_grad():
        patches, pooled = task.model.encode_vision(batch["video"], per_frame=True)
        ids, mask = task.captions(batch["text"])
        text_tokens, text = task.model.encode_text(ids, mask)
        sim_vt = frame_mean_similarity(text, task.model.vision_proj(pooled)).T / task.model.temp
        torch.manual_seed(3)
        text_neg, video_neg = sample_hard_negatives(sim_vt, batch["index"], floor=0.0)
        rows = []
        for i in range(4):  # one pair at a time: (v, t), (v_neg(t), t), (v, t_neg(v))
            for v, t in ((i, i), (int(video_neg[i]), i), (i, int(text_neg[i]))):
                logits = task.model.itm_logits(patches[v:v + 1], text_tokens[t:t + 1], mask[t:t + 1])
                rows.append((logits[0], 1 if (v, t) == (i, i) else 0))
    logits = torch.stack([r[0] for r in rows])
    labels = torch.tensor([r[1] for r in rows])
    assert out["vtm"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- UTA, masks


def test_uta_aligns_the_residual_entering_the_last_block_at_visible_tokens():
    task = perturbed(tiny_task("task.uta_weight=1.0", "data.mask.type=tube", "data.mask.ratio=0.5",
                               "task.vtm_weight=0", "task.mlm_weight=0", *TINY_TEACHER)).eval()
    keep = torch.tensor([[True, False, True, False] * 4] * 4)  # a tube: the same 2 of 4 patches in every frame
    batch = {**fixed_batch(), "keep": keep}
    with torch.no_grad():
        out = task(batch)
        vision = task.model.vision_encoder
        features = vision.forward_features(batch["video"], keep_BL=keep, return_residuals=(vision.depth - 1,))
        residual = features.residuals[vision.depth - 1]  # embeddings + blocks 0..depth-2, no final norm
        index = task.masks.visible_index(keep, vision)  # the kept patches' positions: [0, 2, 4, 6, ...] per clip
        assert index.tolist() == [[0, 2, 4, 6, 8, 10, 12, 14]] * 4
        pos = visible_tokens(sinusoid_table(17, 32).expand(4, -1, -1), index)
        student = F.normalize(vision.clip_decoder[0](residual + pos), dim=-1)
        target = F.normalize(visible_tokens(task.teacher(batch["video"]).targets_KBLC[0], index), dim=-1)
        pooled = task.model.pool(features.tokens_BLD, per_frame=True)  # tube masks keep per-frame pooling
    assert residual.shape == (4, 1 + 8, 32) and pooled.shape == (4, 4, 32)
    assert out["uta"].item() == pytest.approx((2 - 2 * (student * target).sum(-1)).mean().item(), rel=1e-5)


def test_attention_masks_pool_per_clip_and_every_part_trains():
    task = tiny_task("task.uta_weight=1.0", "data.mask.type=attention", "data.mask.ratio=0.5", *TINY_TEACHER)
    task.train()
    out = task(fixed_batch())
    assert set(out) == {"loss", "vtc", "vtm", "mlm", "uta", "temp", "vtc_acc"}
    assert not task.per_frame
    out["loss"].backward()
    grads = {name: p.grad for name, p in task.model.named_parameters()}
    for name in ("temp", "vision_proj.weight", "text_proj.weight", "itm_head.weight", "vision_encoder.pool_norm.weight",
                 "vision_encoder.clip_decoder.0.head.weight", "vision_encoder.layers.1.mixer.in_proj.weight",
                 "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
                 "text_encoder.cls.predictions.transform.dense.weight",
                 "text_encoder.bert.embeddings.word_embeddings.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_heads_without_a_loss_are_frozen_as_the_release_leaves_them():
    task = tiny_task("task.vtm_weight=0", "task.mlm_weight=0")  # uta_weight is 0 in the config
    frozen = {name for name, p in task.model.named_parameters() if not p.requires_grad}
    assert "itm_head.weight" in frozen and "vision_encoder.clip_decoder.0.head.weight" in frozen
    assert {"text_encoder.cls.predictions.bias", "text_encoder.cls.predictions.transform.dense.weight"} <= frozen
    assert "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight" in frozen  # no VTM, no MLM: no fusion
    assert "text_encoder.bert.embeddings.word_embeddings.weight" not in frozen  # the LM decoder's tied weight trains
    assert "text_encoder.bert.encoder.layer.1.attention.self.query.weight" not in frozen


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"task.text.overrides: unknown BERT field\(s\) \['width'\]"):
        load_config(CONFIG, ["task.text.overrides={width: 3}"])
    with pytest.raises(ConfigError, match="task.text.max_tokens: must be in \\[2, max_position_embeddings=32\\]"):
        load_config(CONFIG, ["task.text.max_tokens=40"])
    with pytest.raises(ConfigError, match="task.mlm_prob"):
        load_config(CONFIG, ["task.mlm_prob=0"])
    with pytest.raises(ConfigError, match="task.text: fusion_layer=7 must be in"):
        load_config(CONFIG, ["task.text.fusion_layer=7"])


def test_bert_folder_that_does_not_fit_the_tower_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32)).save_pretrained(folder)
    (folder / "vocab.txt").write_text((TOKENIZER / "vocab.txt").read_text())
    with pytest.raises(ConfigError, match=r"num_attention_heads': \(4, 2\)"):
        tiny_task(f"task.text.model={folder}", "task.text.load_weights=true")
    # With a matching config.json its weights load (all but the fusion layers' cross-attention).
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2}))
    task = tiny_task(f"task.text.model={folder}", "task.text.load_weights=true")
    reference = BertForMaskedLM.from_pretrained(folder).state_dict()["bert.encoder.layer.0.output.dense.weight"]
    torch.testing.assert_close(task.model.text_encoder.bert.encoder.layer[0].output.dense.weight, reference)


def test_preflight_checks_the_bert_files(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.preflight import preflight

    cfg = load_config(CONFIG, [f"task.text.model={TOKENIZER}", "task.teacher.pretrained=null",
                               f"data.train_shards={REPO}/tests/data/stage_losses_shards"])
    assert f"task.text.model: {TOKENIZER} (folder)" in preflight(cfg)  # the job's checks run the task's own
    with pytest.raises(ConfigError, match=r"tiny_bert lacks \['model.safetensors or pytorch_model.bin'\]"):
        load_config(CONFIG, [f"task.text.model={TOKENIZER}", "task.text.load_weights=true"]).task.preflight()
    # A hub name offline: found only in the local Hugging Face cache, laid out as huggingface-cli leaves it.
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    hub = load_config(REPO / "configs/stages/pretrain_vtc_bert_m_5m.yaml")
    with pytest.raises(ConfigError, match="'bert-base-uncased' is neither a folder nor in the local Hugging Face"):
        hub.task.preflight()
    snapshot = root / "models--bert-base-uncased" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (root / "models--bert-base-uncased" / "refs").mkdir()
    (root / "models--bert-base-uncased" / "refs" / "main").write_text("0123abcd")
    for name in ("vocab.txt", "config.json"):
        (snapshot / name).write_text("{}")
    with pytest.raises(ConfigError, match="neither a folder nor"):  # no weights file yet
        hub.task.preflight()
    (snapshot / "model.safetensors").write_bytes(b"placeholder")
    assert hub.task.preflight() == ["task.text.model: bert-base-uncased (Hugging Face cache)"]


# ---------------------------------------------------------------------------------------------- export layout


def test_paper_config_exports_exactly_the_released_798_tensors():
    cfg = load_config(REPO / "configs/stages/pretrain_vtc_bert_m_5m.yaml")
    with torch.device("meta"):
        task = build_task(cfg)
    released = [tuple(entry[:2]) for entry in json.loads(RELEASED_KEYS.read_text())["keys"]]
    ours = [(k, list(v.shape)) for k, v in released_layout(task.trainable_module().state_dict()).items()]
    assert ours == [(k, list(s)) for k, s in released]
    assert task.export_weights_key == "model" and task.export_dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- real Trainer


def _released_layout_of_same_size(task) -> dict[str, torch.Tensor]:
    """A released-layout state dict of a freshly built model of the task's size (models.umt_checkpoint)."""
    from models.umt import build_umt_model

    config = task.model.config
    fresh = build_umt_model(config["model_name"], config["model_kwargs"], config["bert"], embed_dim=config["embed_dim"])
    return released_state_dict(fresh)


@pytest.mark.timeout(600)
def test_trainer_export_loads_three_ways_and_evaluates_with_the_job(tiny_synthetic, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.checkpointing import run_storage
    from pipeline.checkpointing.export import export_checkpoint
    from pipeline.engine import train

    out = tmp_path / "run"
    cfg = load_config(CONFIG, [
        "scaling.use_ray=false", f"output_dir={out}", f"checkpoint.path={out}/ckpt", f"tracking.uri=sqlite:///{out}/m.db",
        f"data.train_shards={tiny_synthetic['train_shards']}", f"task.text.model={TOKENIZER}", "model.scan_backend=ref",
        "optim.max_steps=3", "optim.warmup_steps=1", "data.batch_size=4", "tracking.log_interval=1",
        "checkpoint.interval_steps=3", "tracking.system_metrics_interval_s=0", "scaling.peak_tflops=0.001",
        "data.mask.type=attention", "data.mask.ratio=0.5", "task.uta_weight=1.0", *TINY_TEACHER])
    result = train(cfg)
    metrics = MlflowClient(cfg.tracking.uri).get_run(result.mlflow_run_id).data.metrics
    for part in ("vtc", "vtm", "mlm", "uta"):
        assert torch.isfinite(torch.tensor(metrics[f"train/{part}"])), part
    assert metrics["train/mfu"] > 0

    # The released file: {"model": the released names and order, bf16 (position ids int64), tied decoder} + meta.
    export = torch.load(result.export_path, weights_only=True)
    assert sorted(export) == ["meta", "model"]
    state, reference = export["model"], _released_layout_of_same_size(build_task(cfg))
    assert list(state) == list(reference)
    assert all(state[k].shape == reference[k].shape and state[k].dtype == reference[k].dtype for k in state)
    assert state["temp"].shape == () and state["vision_encoder.norm.weight"].dtype == torch.bfloat16
    decoder, words = state["text_encoder.cls.predictions.decoder.weight"], state[
        "text_encoder.bert.embeddings.word_embeddings.weight"]
    assert decoder.data_ptr() == words.data_ptr()
    assert export["meta"]["task"] == "video_text_bert" and export["meta"]["bert"]["num_attention_heads"] == 2

    # 1. models.umt_checkpoint: every tensor in its place.
    model, report = load_umt_model(result.export_path, text_model=TOKENIZER)
    own = released_layout(model.state_dict())
    assert report.missing == [] and all(torch.equal(own[k].to(v.dtype), v) for k, v in state.items())
    # 2. A backbone through models.load_pretrained (the next stage's model.pretrained).
    backbone = create_model("videomamba_test", num_frames=4, img_size=32, num_classes=0)
    assert load_pretrained(backbone, result.export_path).missing == []
    # 3. The unmasked phase starts from it (task.init_checkpoint): the same weights.
    again = tiny_task(f"task.init_checkpoint={result.export_path}")
    assert torch.equal(again.model.itm_head.weight.to(torch.bfloat16), state["itm_head.weight"])
    # The offline export of the run's checkpoint is the same file.
    offline = tmp_path / "offline.pt"
    export_checkpoint(run_storage(cfg), str(offline))
    offline_state = torch.load(offline, weights_only=True)["model"]
    assert list(offline_state) == list(state) and all(torch.equal(offline_state[k], state[k]) for k in state)

    # The unmasked phase through the Trainer from that export: no mask, no teacher; the UTA decoder is frozen, so
    # its weights leave the phase as they came in, and the offline export (frozen_student.pt) agrees.
    unmasked_out = tmp_path / "unmasked"
    unmasked_cfg = load_config(CONFIG, [
        "scaling.use_ray=false", f"output_dir={unmasked_out}", f"checkpoint.path={unmasked_out}/ckpt",
        f"tracking.uri=sqlite:///{unmasked_out}/m.db", f"data.train_shards={tiny_synthetic['train_shards']}",
        f"task.text.model={TOKENIZER}", "model.scan_backend=ref", "optim.max_steps=2", "optim.warmup_steps=0",
        "data.batch_size=4", "checkpoint.interval_steps=2", "tracking.system_metrics_interval_s=0",
        f"task.init_checkpoint={result.export_path}"])
    tuned = torch.load(train(unmasked_cfg).export_path, weights_only=True)["model"]
    decoder = "vision_encoder.clip_decoder.0.head.weight"
    assert torch.equal(tuned[decoder], state[decoder]) and not torch.equal(tuned["itm_head.weight"],
                                                                             state["itm_head.weight"])
    export_checkpoint(run_storage(unmasked_cfg), str(tmp_path / "unmasked_offline.pt"))
    offline_tuned = torch.load(tmp_path / "unmasked_offline.pt", weights_only=True)["model"]
    assert all(torch.equal(offline_tuned[k], tuned[k]) for k in tuned)

    # Zero-shot retrieval of the export with the job, on the synthetic set's real mp4s.
    report_dir = tmp_path / "eval"
    cmd = [sys.executable, "jobs/eval_retrieval.py", "--config", "configs/eval/synthetic.yaml",
           f"model.checkpoint={result.export_path}", f"model.text_model={TOKENIZER}",
           f"data.annotation={tiny_synthetic['eval_annotations']}", f"data.root={tiny_synthetic['eval_video_root']}",
           f"output_dir={report_dir}", "tracking.enabled=false", "cache.dir=null"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    evaluated = json.loads((report_dir / "retrieval_synthetic.json").read_text())
    assert evaluated["protocol"]["text_family"] == "bert"
    assert 0 <= evaluated["metrics"]["t2v_r1"] <= 100 and evaluated["metrics"]["t2v_r10"] == 100  # 4 eval clips


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mask", ["attention", "none"])
def test_graphed_steps_match_eager(mask):
    """Three AdamW steps of the tiny task with the video encoder graphed and eager, from the same init (BERT's
    dropout and the negatives draw from the same generator states: the graphed encoder draws nothing)."""

    def run(graph: bool) -> list[float]:
        overrides = ["model.scan_backend=triton", f"model.cuda_graph={str(graph).lower()}", f"data.mask.type={mask}"]
        if mask == "attention":
            overrides += ["task.uta_weight=1.0", *TINY_TEACHER]
        task = tiny_task(*overrides, seed=0).cuda().train()
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for i in range(3):
            optimizer.zero_grad(set_to_none=True)
            batch = fixed_batch(seed=i)
            batch["video"] = batch["video"].cuda()
            loss = task(batch)["loss"]
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert task._vision_runner.enabled == graph
        return losses

    assert run(graph=True) == pytest.approx(run(graph=False), rel=1e-4)
