"""Released multimodal checkpoints (`videomamba_m16_{5M,17M,25M}_f8_res224.pth`) <-> `UMTVideoText`.

The released file is `{"model": state_dict}`: 798 bf16 tensors (plus the int64 `position_ids` buffer) in the
layout of `tests/data/umt_videomamba_m16_released_keys.json`. `load_umt_model` reads the architecture off the
tensor shapes (vision width, depth, patch, frames, resolution; BERT width, depth, vocabulary, fusion layer),
builds the model and loads every tensor: nothing may be missing or left over. Two names differ from ours:
the vision encoder's final norm (`norm` there, `norm_f` here) and the temperature's shape (0-d there, (1,)
here). `released_state_dict` writes the released layout back (the inverse), which is how tests and
`scripts/check_released_eval.py` make random released-layout files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from models.bert import BertSpec, bert_spec_from_pretrained, load_bert_tokenizer
from models.checkpoints import LoadReport, unwrap_state_dict
from models.umt import UMTVideoText, build_umt_model

_NORM_RELEASED, _NORM_OURS = "vision_encoder.norm.weight", "vision_encoder.norm_f.weight"
_DECODER_TIES = {"text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",
                 "text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias"}


def is_umt_state_dict(state: Mapping[str, Any]) -> bool:
    """True for the BERT-tower video-text layout (released files and our UMT exports)."""
    return any(k.startswith("text_encoder.bert.") for k in state)


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def infer_umt_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The architecture of a released-layout state dict, from its tensor shapes: the keyword arguments of
    `models.umt.build_umt_model` except the BERT fields shapes cannot tell (heads, eps, activation)."""
    try:
        proj = state["vision_encoder.patch_embed.proj.weight"]  # (D, C, tubelet, patch, patch)
        pos = state["vision_encoder.pos_embed"]  # (1, 1 + patches, D)
        temporal = state["vision_encoder.temporal_pos_embedding"]  # (1, T / tubelet, D)
        a_log = state["vision_encoder.layers.0.mixer.A_log"]  # (E, N)
        words = state["text_encoder.bert.embeddings.word_embeddings.weight"]  # (vocab, W)
        layer0 = "text_encoder.bert.encoder.layer.0."
        intermediate = state[layer0 + "intermediate.dense.weight"]  # (I, W)
        vision_proj = state["vision_proj.weight"]  # (E_joint, D)
    except KeyError as err:
        raise ValueError(f"not a released-layout video-text checkpoint: no tensor {err}") from err
    embed_dim, tubelet, patch = proj.shape[0], proj.shape[2], proj.shape[3]
    if a_log.shape != (2 * embed_dim, 16):
        raise ValueError(f"mixer A_log has shape {tuple(a_log.shape)}; this model supports expand 2 and d_state 16, "
                         f"i.e. ({2 * embed_dim}, 16)")
    fusion = [int(m.group(1)) for k in state if (m := re.fullmatch(r"text_encoder\.bert\.encoder\.layer\.(\d+)\."
                                                                 r"crossattention\.self\.key\.weight", k))]
    if not fusion:
        raise ValueError("the text encoder has no cross-attention (fusion) layers")
    cross_key = state[f"text_encoder.bert.encoder.layer.{min(fusion)}.crossattention.self.key.weight"]
    decoders = _count(state, r"vision_encoder\.clip_decoder\.(\d+)\.head\.weight")
    return {
        "model_name": None,
        "model_kwargs": {
            "img_size": math.isqrt(pos.shape[1] - 1) * patch, "patch_size": patch, "in_chans": proj.shape[1],
            "num_frames": temporal.shape[1] * tubelet, "tubelet_size": tubelet, "embed_dim": embed_dim,
            "depth": _count(state, r"vision_encoder\.layers\.(\d+)\.norm\.weight"), "num_classes": 0,
        },
        "bert": {
            "vocab_size": words.shape[0], "hidden_size": words.shape[1],
            "num_hidden_layers": _count(state, r"text_encoder\.bert\.encoder\.layer\.(\d+)\..*"),
            "intermediate_size": intermediate.shape[0],
            "max_position_embeddings": state["text_encoder.bert.embeddings.position_embeddings.weight"].shape[0],
            "type_vocab_size": state["text_encoder.bert.embeddings.token_type_embeddings.weight"].shape[0],
            "fusion_layer": min(fusion), "encoder_width": cross_key.shape[1],
        },
        "embed_dim": vision_proj.shape[0],
        "clip_output_dim": state["vision_encoder.clip_decoder.0.head.weight"].shape[0] if decoders else 512,
        "num_clip_decoders": decoders,
    }


def to_model_layout(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], LoadReport]:
    """Released names and shapes -> ours (norm -> norm_f, 0-d temp -> (1,)); checks the tied LM decoder."""
    report = LoadReport()
    for tied, source in _DECODER_TIES.items():
        if tied in state and source in state and not torch.equal(state[tied], state[source]):
            raise ValueError(f"{tied} differs from {source}; the release ties them (one tensor), so this file "
                             "is not a released-layout checkpoint or was edited")
    out = dict(state)
    if _NORM_RELEASED in out:
        out[_NORM_OURS] = out.pop(_NORM_RELEASED)
        report.renamed[_NORM_RELEASED] = _NORM_OURS
    if "temp" in out and out["temp"].dim() == 0:
        out["temp"] = out["temp"].reshape(1)
    return out, report


def released_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our names and shapes -> the released ones (views, same order): `norm_f` -> `norm`, temp (1,) -> 0-d."""
    return {(_NORM_RELEASED if key == _NORM_OURS else key): (value.reshape(()) if key == "temp" else value)
            for key, value in state.items()}


def to_released_file_layout(state: Mapping[str, Tensor], dtype: torch.dtype | None = torch.bfloat16
                            ) -> dict[str, Tensor]:
    """A model-layout state dict as the released file holds it: released names and shapes, same order, on CPU,
    floating tensors cast to `dtype` (None keeps them), the tied LM decoder one tensor with its source."""
    out = {}
    for key, value in released_layout(state).items():
        value = value.detach().cpu()
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value.clone()
    for tied, source in _DECODER_TIES.items():  # one tensor in the released file, as in a tied model
        if tied in out and source in out:
            out[tied] = out[source]
    return out


def released_state_dict(model: UMTVideoText, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Tensor]:
    """`model`'s weights in the released layout and order, on CPU (floating tensors cast to `dtype`; None
    keeps them)."""
    return to_released_file_layout(model.state_dict(), dtype)


def save_released_checkpoint(model: UMTVideoText, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `{"model": released_state_dict(model)}`, the released file's layout."""
    torch.save({"model": released_state_dict(model, dtype)}, path)


def _read(path_or_state_dict: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], dict[str, Any], LoadReport]:
    """(released-layout state dict, the stage export's meta or {}, report) of a file or mapping."""
    blob = path_or_state_dict
    if not isinstance(blob, Mapping):
        blob = torch.load(blob, map_location="cpu", weights_only=True)
    meta = blob.get("meta") if isinstance(blob, Mapping) else None
    state, report = unwrap_state_dict(blob)
    if not is_umt_state_dict(state):
        raise ValueError(f"{path_or_state_dict}: no text_encoder.bert.* tensors; not a BERT video-text checkpoint")
    return state, dict(meta) if isinstance(meta, Mapping) else {}, report


def load_umt_model(path_or_state_dict: str | os.PathLike | Mapping, text_model: str | os.PathLike | None = None,
                   map_location: str | torch.device = "cpu", **bert_overrides: Any) -> tuple[UMTVideoText, LoadReport]:
    """Build and load a released-layout checkpoint; every model tensor must be in the file and vice versa.

    `text_model`: a folder or cached hub name (`bert-base-uncased`) with the tokenizer. The BERT fields the shapes
    cannot tell (head count, LayerNorm eps, activation) come from the file's meta when it is a stage export of
    `video_text_bert` (`meta["bert"]`), else from `text_model`'s config.json; without either, BERT's defaults
    (64-wide heads) unless `bert_overrides` say otherwise (tests).
    """
    state, meta, report = _read(path_or_state_dict)
    config = infer_umt_config(state)
    shape_fields = config.pop("bert")
    if isinstance(meta.get("bert"), Mapping):
        spec = BertSpec(**{**meta["bert"], **shape_fields, **bert_overrides})
    elif text_model is not None:
        spec = bert_spec_from_pretrained(text_model, **shape_fields, **bert_overrides)
    else:
        heads = bert_overrides.pop("num_attention_heads", max(1, shape_fields["hidden_size"] // 64))
        spec = BertSpec(**shape_fields, num_attention_heads=heads, **bert_overrides)
    tokenizer = load_bert_tokenizer(text_model, spec.vocab_size) if text_model is not None else None
    model = build_umt_model(config["model_name"], config["model_kwargs"], spec, tokenizer, config["embed_dim"],
                            clip_output_dim=config["clip_output_dim"], num_clip_decoders=config["num_clip_decoders"])
    fitted, layout = to_model_layout(state)
    report.renamed.update(layout.renamed)
    result = model.load_state_dict(fitted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path_or_state_dict}: the checkpoint does not match the model built from its shapes: "
                         f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    return model.to(map_location), report


def load_umt_weights(model: UMTVideoText, path_or_state_dict: str | os.PathLike | Mapping) -> LoadReport:
    """Load every weight of a released-layout file (a released multimodal checkpoint or a `video_text_bert` stage
    export) into `model`, e.g. to continue training from the masked phase. The release's masked-phase files also
    hold its frozen CLIP teacher (`clip_teacher.*`): those are left out and reported as dropped; anything else
    missing, left over or of another shape raises, naming the keys."""
    state, _, report = _read(path_or_state_dict)
    fitted, layout = to_model_layout(state)
    report.renamed.update(layout.renamed)
    teacher = [k for k in fitted if k.startswith("clip_teacher.")]
    if teacher:
        report.dropped["clip_teacher.*"] = f"the release's frozen CLIP teacher ({len(teacher)} tensors)"
    fitted = {k: v for k, v in fitted.items() if not k.startswith("clip_teacher.")}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in fitted.items() if k in own
             and v.shape != own[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{path_or_state_dict}: tensors of another shape than this config's model: {wrong[:4]}; "
                         "make the model and task.text settings match the checkpoint")
    result = model.load_state_dict(fitted, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if report.missing or report.unexpected:
        raise ValueError(f"{path_or_state_dict}: the checkpoint does not match this config's model: missing "
                         f"{report.missing[:8]}, unexpected {report.unexpected[:8]}")
    return report
