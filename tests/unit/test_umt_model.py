"""The BERT-tower video-text model: the released 798-key layout, loading a released-layout file, the text layers
against transformers' BERT, bert-base-style weights from a local folder, and the training pieces (VTC, VTM with
hard negatives, MLM, UTA) on a tiny CPU model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.bert import BertSpec, BertTextEncoder, load_bert_tokenizer, load_pretrained_bert
from models.umt import build_umt_model, frame_mean_similarity
from models.umt_checkpoint import infer_umt_config, load_umt_model, released_layout, released_state_dict
from tests._umt import TINY_BERT, VOCAB_SIZE, tiny_umt_model, write_released_checkpoint, write_tokenizer_dir

RELEASED_KEYS = Path(__file__).resolve().parents[1] / "data" / "umt_videomamba_m16_released_keys.json"


def _released() -> list[tuple[str, list[int], str]]:
    data = json.loads(RELEASED_KEYS.read_text())
    assert data["num_keys"] == len(data["keys"]) == 798
    return [tuple(entry) for entry in data["keys"]]


def _layout(state) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), "int64" if v.dtype == torch.int64 else "bf16") for k, v in state.items()]


def test_full_size_model_has_exactly_the_released_798_keys_in_order():
    # VideoMamba-M (576 x 32, 8 x 224) + bert-base with fusion from layer 9, on the meta device (no memory).
    with torch.device("meta"):
        model = build_umt_model("videomamba_middle", {"num_frames": 8, "img_size": 224}, BertSpec())
    assert _layout(released_layout(model.state_dict())) == _released()
    groups = {}
    for key, *_ in _released():
        prefix = key.split(".")[0] if not key.startswith("text_encoder.") else ".".join(key.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    assert groups == {"temp": 1, "vision_encoder": 556, "text_encoder.bert": 228, "text_encoder.cls": 7,
                      "vision_proj": 2, "text_proj": 2, "itm_head": 2}


def test_tiny_model_has_the_released_key_patterns():
    def patterns(keys):
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}

    tiny = released_state_dict(tiny_umt_model())
    assert patterns(tiny) == patterns(k for k, *_ in _released())
    assert tiny["temp"].shape == () and tiny["text_encoder.bert.embeddings.position_ids"].dtype == torch.int64


def test_released_layout_file_loads_every_tensor(tmp_path):
    path = write_released_checkpoint(tmp_path / "released.pth")
    state = torch.load(path, weights_only=True)["model"]
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if not k.endswith("position_ids"))
    config = infer_umt_config(state)
    assert config["model_kwargs"] == {"img_size": 32, "patch_size": 16, "in_chans": 3, "num_frames": 4,
                                      "tubelet_size": 1, "embed_dim": 32, "depth": 2, "num_classes": 0}
    assert {k: config["bert"][k] for k in ("num_hidden_layers", "fusion_layer", "encoder_width", "vocab_size")} == \
        {"num_hidden_layers": 4, "fusion_layer": 2, "encoder_width": 32, "vocab_size": VOCAB_SIZE}

    model, report = load_umt_model(path, text_model=write_tokenizer_dir(tmp_path / "tok"))
    assert report.missing == [] and report.unexpected == []
    assert report.renamed == {"vision_encoder.norm.weight": "vision_encoder.norm_f.weight"}
    assert model.text_encoder.spec.num_attention_heads == 2  # from the folder's config.json
    own = released_layout(model.state_dict())
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key].to(value.dtype), value), key
    # The tied LM decoder is one tensor with the word embeddings after loading, as in the released model.
    text = model.text_encoder
    assert text.cls.predictions.decoder.weight is text.bert.embeddings.word_embeddings.weight


def test_bad_files_are_refused_with_the_reason(tmp_path):
    state = released_state_dict(tiny_umt_model())
    untied = dict(state)
    untied["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="decoder.weight differs from .*word_embeddings"):
        load_umt_model({"model": untied}, num_attention_heads=2)
    missing = {k: v for k, v in state.items() if k != "itm_head.bias"}
    with pytest.raises(ValueError, match=r"missing \['itm_head.bias'\]"):
        load_umt_model({"model": missing}, num_attention_heads=2)
    backbone_only = {k: v for k, v in state.items() if k.startswith("vision_encoder.")}
    with pytest.raises(ValueError, match="no text_encoder.bert"):
        load_umt_model(backbone_only)
    # A tokenizer whose vocabulary is not the tower's (e.g. a hub name missing from the offline cache).
    small = tmp_path / "small"
    small.mkdir()
    (small / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match=f"has 5 tokens but the text tower has {VOCAB_SIZE}"):
        load_bert_tokenizer(small, VOCAB_SIZE)


def _hf_bert(spec: BertSpec, layers: int):
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(**{**spec.hf_config().to_dict(), "num_hidden_layers": layers})).eval()


def test_text_layers_equal_transformers_bert_loaded_from_a_folder(tmp_path):
    torch.manual_seed(0)
    reference = _hf_bert(TINY_BERT, TINY_BERT.num_hidden_layers)
    reference.save_pretrained(tmp_path / "bert")
    encoder = BertTextEncoder(TINY_BERT).eval()
    left_at_init = load_pretrained_bert(encoder, tmp_path / "bert")
    assert left_at_init and all(".crossattention." in k for k in left_at_init)  # only the fusion cross-attention
    ids = torch.randint(5, VOCAB_SIZE, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        hidden = reference.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = encoder.encode_text(ids, mask)
    # The text layers are the first `fusion_layer` BERT layers; pad positions differ only where masked out.
    torch.testing.assert_close(ours[mask.bool()], hidden[TINY_BERT.fusion_layer][mask.bool()], atol=1e-5, rtol=1e-5)


def test_one_video_shared_by_many_texts_equals_per_pair_fusion():
    model = tiny_umt_model().eval()
    video = torch.randn(1, 3, 4, 32, 32)
    ids, mask = torch.randint(5, VOCAB_SIZE, (5, 7)), torch.ones(5, 7, dtype=torch.long)
    mask[2, 4:] = 0
    with torch.no_grad():
        patches_1ND, _ = model.encode_vision(video)
        text_BLW, _ = model.encode_text(ids, mask)
        shared = model.itm_scores_for_video(patches_1ND[0], text_BLW, mask, batch_size=2)
        per_pair = model.itm_logits(patches_1ND.expand(5, -1, -1).contiguous(), text_BLW, mask)[:, 1]
    torch.testing.assert_close(shared, per_pair, atol=1e-6, rtol=1e-5)


def test_training_pieces_vtc_vtm_mlm_uta_run_and_train():
    from pipeline.losses import contrastive_loss, matching_loss, sample_hard_negatives

    model = tiny_umt_model().train()
    video = torch.randn(4, 3, 4, 32, 32)
    ids, mask = torch.randint(5, VOCAB_SIZE, (4, 8)), torch.ones(4, 8, dtype=torch.long)
    index = torch.arange(4)
    model.clamp_temperature_()
    patches_BND, pooled_BFD = model.encode_vision(video)  # no mask: per-frame pooling
    assert patches_BND.shape == (4, 16, 32) and pooled_BFD.shape == (4, 4, 32)
    keep = torch.zeros(4, 16, dtype=torch.bool)
    keep[:, ::2] = True
    masked_patches, masked_pooled = model.encode_vision(video, keep_BL=keep)  # masked: one pooled slot per clip
    assert masked_patches.shape == (4, 8, 32) and masked_pooled.shape == (4, 1, 32)

    text_BLW, text_BE = model.encode_text(ids, mask)
    video_BE = model.vision_proj(masked_pooled[:, 0])
    vtc = contrastive_loss(video_BE, text_BE, index, model.temp)
    sim = frame_mean_similarity(text_BE, model.vision_proj(pooled_BFD)).T  # (videos, texts)
    text_neg, video_neg = sample_hard_negatives(sim.detach() / model.temp.detach(), index)
    logits = model.itm_logits(torch.cat([patches_BND, patches_BND, patches_BND[video_neg]]),
                              torch.cat([text_BLW, text_BLW[text_neg], text_BLW]),
                              torch.cat([mask, mask[text_neg], mask]))
    vtm = matching_loss(logits[:4], logits[4:])
    masked_ids = ids.clone()
    masked_ids[:, 3] = 4  # [MASK]
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    mlm_logits = model.mlm_logits(masked_ids, mask, patches_BND)
    assert mlm_logits.shape == (4, 8, VOCAB_SIZE)
    mlm = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten())
    # UTA: the released student feature is the residual entering the last block, through clip_decoder[0].
    residual = model.vision_encoder.forward_features(video, keep_BL=keep, return_residuals=(1,)).residuals[1]
    student = F.normalize(model.vision_encoder.clip_decoder[0](residual.float()), dim=-1)
    uta = (2 - 2 * (student * F.normalize(torch.randn_like(student), dim=-1)).sum(-1)).mean()
    (vtc + vtm + mlm + uta).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("temp", "vision_proj.weight", "text_proj.weight", "itm_head.weight",
                 "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
                 "text_encoder.cls.predictions.transform.dense.weight", "vision_encoder.clip_decoder.0.head.weight",
                 "vision_encoder.pool_norm.weight", "vision_encoder.layers.0.mixer.in_proj.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
