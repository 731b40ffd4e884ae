"""Stage 3 as the release trains it: VideoMamba + a BERT tower with fusion layers (UMT-style; docs/stages.md).

The model is `models.umt.UMTVideoText`, the layout of the released multimodal checkpoints. Losses, in the released
order and each weighted in the config (released weights: all 1.0 in the masked phase, `uta` 0 when unmasked):
- `vtc`: symmetric InfoNCE over the batch of every rank; the video side is `vision_proj` of the pooled tokens,
  per frame (no mask, or a tube mask: the release's `keep_temporal`) or per clip (other masks), and a video's
  similarity is the mean of its per-slot cosines; the gather's backward follows `task.vtc_gather_gradient`;
- `vtm`: matching on the local batch, one hard negative text per video and one hard negative video per text drawn
  from softmax(similarity / temp) over the non-positives; 3B pairs through BERT's fusion layers, `itm_head` of the
  fusion [CLS] -> cross-entropy (labels 1, 0, 0);
- `mlm`: captions masked as released (pipeline/tasks/mlm.py), re-encoded by the text layers, fused with the video
  tokens, BERT's LM head -> cross-entropy at the masked positions;
- `uta`: the residual stream entering the last block (the release's student feature, as in Stage 1) at the
  visible tokens + the sinusoid position table -> `vision_encoder.clip_decoder[0]` -> mean(2 - 2 cos) against the
  frozen CLIP teacher's last-layer tokens.
The fusion memory of VTM and MLM is the video's patch tokens after the final norm (the visible ones when masked).
Plus `temp` and `vtc_acc` (local in-batch video->text top-1) as diagnostics.

Captions are cleaned as released (`pipeline.data.captions.clean_caption`) and tokenised to `task.text.max_tokens`.
Exports are the released file: `{"model": <released keys>, "meta": ...}`, 16-bit by default (docs/stages.md).

Legend: B batch, N patch tokens (visible ones when masked), V = 1 + N, D vision width, F pooled slots, E joint
width, L text tokens, W text width.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import load_pretrained
from models.bert import BertSpec, bert_spec_from_pretrained, load_bert_tokenizer, load_pretrained_bert
from models.teachers import CLIPTeacher
from models.umt import UMTVideoText, build_umt_model, frame_mean_similarity
from models.umt_checkpoint import load_umt_weights, to_released_file_layout
from pipeline.config import ConfigError, TaskConfig
from pipeline.cuda_graph import GraphedBackbone
from pipeline.data.captions import clean_caption
from pipeline.flops import (
    bert_fusion_flops,
    bert_text_flops,
    clip_vision_flops,
    head_flops,
    mlm_head_flops,
    videomamba_flops,
)
from pipeline.losses import contrastive_loss, matching_loss, sample_hard_negatives, unit_video_embedding
from pipeline.tasks.backbone import shapes_only
from pipeline.tasks.base import Task
from pipeline.tasks.clip_alignment import alignment_loss, sinusoid_table
from pipeline.tasks.clip_teacher import CLIPTeacherConfig, check_teacher_grid, clip_teacher_for
from pipeline.tasks.mlm import SpecialTokens, mask_caption_tokens, masked_lm_loss
from pipeline.tasks.spec import TaskSpec, register_task
from pipeline.tasks.token_masks import TokenMasks
from pipeline.tasks.video_text import paired_retrieval_metrics

# Mask types under which the release pools per frame (`keep_temporal`): every frame keeps the same tokens' count.
_PER_FRAME_MASKS = ("none", "tube")
_NOT_OVERRIDABLE = ("fusion_layer", "encoder_width")


@dataclass
class BertTextConfig:
    model: str = "bert-base-uncased"
    """The BERT the text tower comes from, as released: a folder in the `bert-base-uncased` layout (vocab.txt, and
    config.json + weights when `load_weights`) or that hub name in the local Hugging Face cache (set HF_HUB_OFFLINE=1
    offline; `huggingface-cli download bert-base-uncased` once). Its tokenizer is always used."""
    load_weights: bool = True
    """Start the tower from `model`'s BertForMaskedLM weights, as released (the fusion layers' cross-attention
    starts at BERT's init); false: BERT's random init (tests)."""
    fusion_layer: int = 9
    """First layer with cross-attention to the video tokens (released: 9 of 12, layers 9-11 are the fusion encoder)."""
    max_tokens: int = 32
    """Tokens per caption, [CLS] and [SEP] included (the release's max_txt_l): truncated and padded to it."""
    clean_captions: bool = True
    """Clean captions as the release does before tokenising (lower case, punctuation removed)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """`models.bert.BertSpec` fields replacing BERT-base's shape (the release's config_bert.json), e.g. a tiny random
    tower for tests: {vocab_size: 96, hidden_size: 32, num_hidden_layers: 4, ...}; empty for the release."""

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(BertSpec)} - set(_NOT_OVERRIDABLE)
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ConfigError(f"task.text.overrides: unknown BERT field(s) {unknown}; allowed: {sorted(known)} "
                              "(fusion_layer is task.text.fusion_layer; encoder_width is the video width)")
        try:
            spec = BertSpec(**self.spec_fields())
        except (TypeError, ValueError) as err:
            raise ConfigError(f"task.text: {err}") from None
        if not 2 <= self.max_tokens <= spec.max_position_embeddings:
            raise ConfigError(f"task.text.max_tokens: must be in [2, max_position_embeddings="
                              f"{spec.max_position_embeddings}], got {self.max_tokens}")

    def spec_fields(self) -> dict[str, Any]:
        """The `BertSpec` fields that differ from BERT-base (= the release's config_bert.json); the builder sets
        `encoder_width` to the video width."""
        return {**self.overrides, "fusion_layer": self.fusion_layer}


@dataclass
class BertVideoTextConfig(TaskConfig):
    embed_dim: int = 512
    """Joint embedding width of vision_proj / text_proj (released 512)."""
    text: BertTextConfig = field(default_factory=BertTextConfig)
    """The BERT text tower (text layers + fusion layers + LM head)."""
    temp_init: float = 0.07
    """Initial InfoNCE temperature (learnable, clamped to [0.001, 0.5] at every step)."""
    vtc_weight: float = 1.0
    """Weight of the contrastive loss."""
    vtm_weight: float = 1.0
    """Weight of the matching loss (hard negatives); 0 freezes `itm_head`."""
    mlm_weight: float = 1.0
    """Weight of the masked-language-modelling loss; 0 freezes the LM head's transform."""
    mlm_prob: float = 0.5
    """Probability that a caption token is picked for MLM (released `mlm_masking_prob`: 0.5)."""
    uta_weight: float = 1.0
    """Weight of unmasked-token alignment to the CLIP teacher (released: 1.0 masked phase, 0 unmasked); 0 freezes
    `clip_decoder`."""
    vtc_gather_gradient: Literal["local", "sum"] = "local"
    """The all-gather's backward in VTC. `local` (released): each rank's features get only that rank's loss's
    gradient, so after data-parallel averaging the contrastive gradient of the features is 1/world of the
    whole-batch one. `sum`: the exact whole-batch gradient (the open_clip task's rule); on one rank they agree."""
    teacher: CLIPTeacherConfig = field(default_factory=CLIPTeacherConfig)
    """The frozen CLIP teacher, built when uta_weight > 0 or data.mask.type is `attention`."""
    init_checkpoint: str | None = None
    """A released-layout file to start the whole model from: this task's export or a released multimodal checkpoint
    (the unmasked phase starts from the masked phase's); it must match this config's model and text tower."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Float type of the exported weights: bfloat16 as the released files (their training keeps the model in
    bf16); float32 keeps this run's fp32 master weights."""

    def __post_init__(self) -> None:
        if self.vtc_weight <= 0:
            raise ConfigError(f"task.vtc_weight: the contrastive loss is the stage's objective, must be > 0; "
                              f"got {self.vtc_weight}")
        for name in ("vtm_weight", "mlm_weight", "uta_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"task.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.mlm_prob <= 1.0:
            raise ConfigError(f"task.mlm_prob: must be in (0, 1], got {self.mlm_prob}")

    def preflight(self) -> list[str]:
        """The driver's check before any worker starts (`pipeline.preflight`): the BERT files the build reads."""
        return [check_bert_source(self.text)]


_BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def check_bert_source(text_cfg: BertTextConfig) -> str:
    """ConfigError unless `task.text.model` holds what the build reads: vocab.txt, and config.json + weights when
    `load_weights`. A folder is looked into; a hub name must be in the local Hugging Face cache when
    HF_HUB_OFFLINE is set (looked up without downloading), and is left to transformers online."""
    needed = ["vocab.txt", "config.json"] if text_cfg.load_weights else ["vocab.txt"]
    source, key = text_cfg.model, "task.text.model"
    if os.path.isdir(source):
        missing = [name for name in needed if not os.path.isfile(os.path.join(source, name))]
        if text_cfg.load_weights and not any(os.path.isfile(os.path.join(source, w)) for w in _BERT_WEIGHTS):
            missing.append(" or ".join(_BERT_WEIGHTS))
        if missing:
            raise ConfigError(f"{key}: the folder {source} lacks {missing} (a BERT in the bert-base-uncased layout)")
        return f"{key}: {source} (folder)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("", "0", "false", "no"):
        return f"{key}: {source} (from the Hugging Face hub or its cache)"
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(source, name), str)  # None or a "known missing" marker otherwise

    weights = any(cached(w) for w in _BERT_WEIGHTS) if text_cfg.load_weights else True
    if not (all(cached(name) for name in needed) and weights):
        raise ConfigError(f"{key}: {source!r} is neither a folder nor in the local Hugging Face cache, and "
                          f"HF_HUB_OFFLINE is set; download it where there is internet (`huggingface-cli download "
                          f"{source}`) and copy ~/.cache/huggingface to every node, or give a local folder")
    return f"{key}: {source} (Hugging Face cache)"


class BertVideoTextTask(Task):
    """Trains a `UMTVideoText`; `forward(batch)` -> {"loss", "vtc", ["vtm"], ["mlm"], ["uta"], "temp", "vtc_acc"}."""

    export_weights_key = "model"  # the released files' key: the released code loads this task's exports

    def __init__(self, model: UMTVideoText, weights: dict[str, float], mlm_prob: float = 0.5,
                 teacher: CLIPTeacher | None = None, mask_type: str = "none", mask_ratio: float = 0.8, seed: int = 0,
                 sum_gradients: bool = False, max_tokens: int = 32, clean_captions: bool = True,
                 export_dtype: torch.dtype = torch.bfloat16, export_meta: dict[str, Any] | None = None,
                 cuda_graph: bool = False, cuda_graph_required: bool = False) -> None:
        super().__init__()
        self.weights = {name: float(weights.get(name, 0.0)) for name in ("vtc", "vtm", "mlm", "uta")}
        if (self.weights["uta"] > 0 or mask_type == "attention") and teacher is None:
            raise ValueError("uta_weight > 0 and attention masks need the CLIP teacher")
        self.model, self.teacher = model, teacher
        self.mlm_prob, self.max_tokens, self.clean_captions = mlm_prob, max_tokens, clean_captions
        self.sum_gradients, self.export_dtype = sum_gradients, export_dtype
        self.masks = TokenMasks(mask_type, mask_ratio, seed)
        self.per_frame = mask_type in _PER_FRAME_MASKS
        vision = model.vision_encoder
        self.uta_layer = vision.depth - 1  # the residual stream entering the last block
        if self.weights["uta"] > 0:
            check_teacher_grid(teacher, vision)
            head_width = vision.clip_decoder[0].head.out_features
            if teacher.output_dim != head_width:
                raise ValueError(f"the CLIP teacher's tokens are {teacher.output_dim} wide, clip_decoder gives "
                                 f"{head_width}; build the model with clip_output_dim={teacher.output_dim}")
            # Not persistent: a fixed function of the shape (the release's `clip_pos_embed`, not in its files).
            self.register_buffer("uta_pos_LD", sinusoid_table(1 + vision.num_frames * vision.num_patches,
                                                              vision.embed_dim), persistent=False)
        for param in unused_parameters(model, self.weights):
            param.requires_grad_(False)  # as released: a head without a loss gets no gradient and no update
        self.special = SpecialTokens.of(model.tokenizer) if model.tokenizer is not None else None
        self._export_meta = dict(export_meta or {})
        residuals = [self.uta_layer] if self.weights["uta"] > 0 else []
        self._vision_runner = GraphedBackbone(vision, residuals, "the video encoder", enabled=cuda_graph,
                                              required=cuda_graph_required)

    def captions(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) (B, max_tokens) of the batch's captions, cleaned as released."""
        texts = [clean_caption(t) for t in texts] if self.clean_captions else list(texts)
        return self.model.tokenize(texts, self.max_tokens)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.model
        model.clamp_temperature_()
        device = model.temp.device
        video_BCTHW = model.as_clip(batch["video"])
        index_B = batch["index"].to(device)
        teacher_out = self.teacher(video_BCTHW) if self.teacher is not None else None
        keep_BL = self.masks(batch, teacher_out.cls_attn_BTP if teacher_out is not None else None, device)
        index_BK = self.masks.visible_index(keep_BL, model.vision_encoder)
        features = self._vision_runner(video_BCTHW, index_BK, self.training)
        tokens_BVD = features.tokens_BLD
        patches_BND = tokens_BVD[:, 1:]
        vision_BFE = model.vision_proj(model.pool(tokens_BVD, self.per_frame))
        ids_BL, mask_BL = self.captions(batch["text"])
        text_BLW, text_BE = model.encode_text(ids_BL, mask_BL)

        parts = {"vtc": contrastive_loss(vision_BFE, text_BE, index_B, model.temp, self.sum_gradients)}
        with torch.no_grad():
            sim_v2t_BB = unit_video_embedding(vision_BFE) @ F.normalize(text_BE.float(), dim=-1).t()
        if self.weights["vtm"] > 0:
            parts["vtm"] = self.matching_loss(patches_BND, text_BLW, mask_BL, sim_v2t_BB / model.temp.float(), index_B)
        if self.weights["mlm"] > 0:
            masked_BL, labels_BL = mask_caption_tokens(ids_BL, self.special, self.mlm_prob)
            parts["mlm"] = masked_lm_loss(model.mlm_logits(masked_BL, mask_BL, patches_BND), labels_BL)
        if self.weights["uta"] > 0:
            parts["uta"] = alignment_loss(model.vision_encoder.clip_decoder[0], features.residuals[self.uta_layer],
                                          self.uta_pos_LD, teacher_out.targets_KBLC[0], index_BK)
        loss = sum(self.weights[name] * value for name, value in parts.items())
        out = {"loss": loss, **{name: value.detach() for name, value in parts.items()}}
        out["temp"] = model.temp.detach().clone().squeeze()
        out["vtc_acc"] = (index_B[sim_v2t_BB.argmax(dim=1)] == index_B).float().mean()
        return out

    def matching_loss(self, patches_BND: Tensor, text_BLW: Tensor, mask_BL: Tensor, sim_v2t_BB: Tensor,
                      index_B: Tensor) -> Tensor:
        """The released VTM: pairs (v, t), (v_neg(t), t), (v, t_neg(v)) through the fusion layers in one call."""
        text_for_video_B, video_for_text_B = sample_hard_negatives(sim_v2t_BB, index_B, floor=0.0)
        vision_3BND = torch.cat([patches_BND, patches_BND[video_for_text_B], patches_BND])
        text_3BLW = torch.cat([text_BLW, text_BLW, text_BLW[text_for_video_B]])
        mask_3BL = torch.cat([mask_BL, mask_BL, mask_BL[text_for_video_B]])
        logits_3B2 = self.model.itm_logits(vision_3BND, text_3BLW, mask_3BL)
        B = len(index_B)
        return matching_loss(logits_3B2[:B], logits_3B2[B:])

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Retrieval R@1/R@5 (%) both ways among this rank's eval clips by the released similarity (frame-mean
        cosine, no re-rank); pad rows (`valid` False) left out."""
        model, video, text = self.model, [], []
        for batch in batches:
            valid_B = batch.get("valid", torch.ones(len(batch["text"]), dtype=torch.bool)).cpu()
            video_BTE, _ = model.encode_video_frames(model.as_clip(batch["video"]))
            _, text_BE = model.encode_text(*self.captions(batch["text"]))
            video.append(video_BTE.cpu()[valid_B])
            text.append(text_BE.float().cpu()[valid_B])
        if not video:
            return {}
        return paired_retrieval_metrics(frame_mean_similarity(torch.cat(text), torch.cat(video)))

    def trainable_module(self) -> nn.Module:
        return self.model

    def export_state_dict(self, state: dict[str, Tensor],
                          task_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The released file's tensors: its names, order and shapes (`vision_encoder.norm`, a 0-d `temp`, the LM
        decoder tied), floats as `task.export_dtype`."""
        return to_released_file_layout(state, self.export_dtype)

    def flops_per_sample(self) -> float:
        """Video encoder over CLS + the visible tokens; the text layers twice (the caption, then its MLM-masked
        copy); the fusion layers on the 3 VTM pairs and the MLM pair; the LM head over every position; the
        projections, itm_head and the UTA head; the teacher's forward (pipeline/flops.py)."""
        model, vision, text = self.model, self.model.vision_encoder, self.model.text_encoder
        patches = self.masks.visible_patches(*vision.grid)
        slots = vision.grid[0] if self.per_frame else 1
        passes = {"text": 1 + (self.weights["mlm"] > 0), "fusion": 3 * (self.weights["vtm"] > 0)
                  + (self.weights["mlm"] > 0)}
        flops = videomamba_flops(vision, 1 + patches) + passes["text"] * bert_text_flops(text, self.max_tokens)
        flops += passes["fusion"] * bert_fusion_flops(text, self.max_tokens, patches)
        flops += head_flops(model.vision_proj, slots) + head_flops(model.text_proj, 1)
        if self.weights["vtm"] > 0:
            flops += 3 * head_flops(model.itm_head, 1)
        if self.weights["mlm"] > 0:
            flops += mlm_head_flops(text, self.max_tokens)
        if self.weights["uta"] > 0:
            flops += head_flops(vision.clip_decoder[0].head, 1 + patches)
        if self.teacher is not None:
            flops += clip_vision_flops(self.teacher, vision.num_frames)
        return flops

    def export_metadata(self) -> dict[str, Any]:
        return {**self.model.config, **self._export_meta}

    def rng_state_dict(self) -> dict[str, Any]:
        return {"attention_masks": self.masks.state_dict()}

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["attention_masks"])


def unused_parameters(model: UMTVideoText, weights: dict[str, float]) -> list[nn.Parameter]:
    """Parameters no enabled loss reaches: the UTA decoder without UTA, itm_head without VTM, the LM head's own
    transform and bias without MLM (its decoder is the word embeddings), the fusion layers without VTM and MLM."""
    modules: list[nn.Module] = []
    if weights["uta"] == 0:
        modules.append(model.vision_encoder.clip_decoder)
    if weights["vtm"] == 0:
        modules.append(model.itm_head)
    params = []
    if weights["mlm"] == 0:
        modules.append(model.text_encoder.cls.predictions.transform)
        params.append(model.text_encoder.cls.predictions.bias)
    if weights["vtm"] == 0 and weights["mlm"] == 0:
        text = model.text_encoder
        modules += list(text.bert.encoder.layer)[text.spec.fusion_layer:]
    return params + [p for module in modules for p in module.parameters()]


def _check_bert_source(text_cfg: BertTextConfig, spec: BertSpec) -> None:
    """The BERT folder's config.json must describe the tower the config builds (its weights go into it)."""
    source = bert_spec_from_pretrained(text_cfg.model, fusion_layer=spec.fusion_layer,
                                       encoder_width=spec.encoder_width)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "hidden_act", "layer_norm_eps")
    differ = {f: (getattr(source, f), getattr(spec, f)) for f in fields if getattr(source, f) != getattr(spec, f)}
    if differ:
        raise ConfigError(f"task.text.model={text_cfg.model!r}: its config.json differs from the tower this config "
                          f"builds {{field: (config.json, config)}} = {differ}; set task.text.overrides to match it")


def _load_vision(model: UMTVideoText, path: str) -> None:
    """`model.pretrained` into the vision encoder: a stage 1/2 export or a VideoMamba checkpoint (the released K400
    masked one also holds the UTA decoder, which then loads too, as released)."""
    report = load_pretrained(model.vision_encoder, path)
    missing = [k for k in report.missing if not k.startswith(("clip_decoder.", "pool_norm."))]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks backbone tensors {missing[:8]}; is it a checkpoint of this "
                         "model.name?")


def build(cfg) -> BertVideoTextTask:
    task_cfg: BertVideoTextConfig = cfg.task
    text_cfg, load = task_cfg.text, not shapes_only()
    model = build_umt_model(cfg.model.name, cfg.model.build_kwargs(), text_cfg.spec_fields(),
                            embed_dim=task_cfg.embed_dim, temp_init=task_cfg.temp_init)
    spec = model.text_encoder.spec
    if load:
        model.tokenizer = load_bert_tokenizer(text_cfg.model, spec.vocab_size)
        if text_cfg.load_weights:
            _check_bert_source(text_cfg, spec)
            load_pretrained_bert(model.text_encoder, text_cfg.model)
        if cfg.model.pretrained:
            _load_vision(model, cfg.model.pretrained)
        if task_cfg.init_checkpoint:
            load_umt_weights(model, task_cfg.init_checkpoint)
    teacher = None
    if task_cfg.uta_weight > 0 or cfg.data.mask.type == "attention":
        teacher = clip_teacher_for(task_cfg.teacher, model.vision_encoder, num_layers=1)
    # The evaluator normalises clips as training did and tokenises captions the same way.
    meta = {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "text_model": text_cfg.model,
            "max_text_tokens": text_cfg.max_tokens, "clean_captions": text_cfg.clean_captions}
    weights = {"vtc": task_cfg.vtc_weight, "vtm": task_cfg.vtm_weight, "mlm": task_cfg.mlm_weight,
               "uta": task_cfg.uta_weight}
    return BertVideoTextTask(model, weights, task_cfg.mlm_prob, teacher, mask_type=cfg.data.mask.type,
                             mask_ratio=cfg.data.mask.ratio, seed=cfg.seed,
                             sum_gradients=task_cfg.vtc_gather_gradient == "sum", max_tokens=text_cfg.max_tokens,
                             clean_captions=text_cfg.clean_captions,
                             export_dtype=getattr(torch, task_cfg.export_dtype), export_meta=meta,
                             cuda_graph=cfg.cuda_graph_wanted(), cuda_graph_required=cfg.model.cuda_graph is True)


# `from:` loads a backbone into the vision encoder (`task.init_checkpoint` takes a whole released-layout file).
# Graphed steps are opt-in (`model.cuda_graph=true`) until they have run on a GPU.
register_task(TaskSpec(name="video_text_bert", config=BertVideoTextConfig, build=build, init_key="model.pretrained",
                       cuda_graph=True, cuda_graph_auto=False, evaluates=True))
