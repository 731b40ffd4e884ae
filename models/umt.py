"""The UMT-style video-text model of the released VideoMamba multimodal checkpoints (videomamba_m16_*_f8_res224).

`UMTVideoText` has the released module tree and parameter names (docs/model.md, "Video-text model"):

- `temp`: the learnable temperature (released as a 0-d scalar; shape (1,) here, see `__init__`);
- `vision_encoder`: a VideoMamba (`num_classes=0`) that also holds, as in the released `PretrainVideoMamba`,
  `pool_norm` (LayerNorm over CLS + mean patch token) and `clip_decoder` (the unmasked-token-alignment heads:
  Linear -> LayerNorm, one per aligned layer). Our backbone names its final norm `norm_f`, the release `norm`;
  `models.umt_checkpoint` translates between the two;
- `text_encoder`: BERT with cross-attention fusion layers (`models.bert.BertTextEncoder`: `bert.*`, `cls.*`);
- `vision_proj` (D -> E), `text_proj` (W -> E), `itm_head` (W -> 2).

Forward pieces for training (each a small method, losses live in pipeline/):
- VTC: `encode_vision` -> `vision_proj` of the pooled tokens (per frame or per clip), `encode_text` ->
  `text_proj` of the text CLS; `frame_mean_similarity` is the released similarity (mean over frames of the
  per-frame cosine);
- VTM (with hard negatives chosen by the caller): `itm_logits(vision_BND, text_BLW, attention_mask_BL)`;
- MLM: `mlm_logits(masked_ids_BL, attention_mask_BL, vision_BND)`;
- UTA: `vision_encoder.forward_features(..., return_residuals=...)` and `clip_decoder[k]`.
Evaluation: `encode_video_frames`, `encode_text_features`, `itm_scores_for_video` (one video's tokens serve
all its candidate texts; its cross-attention keys and values are computed once).

Legend: B batch, C channels, T frames, H/W pixels, P patches per frame, N patch tokens (T*P or kept ones),
F pooled slots (T per-frame, or 1), D vision width, L text tokens, W text width, E joint width, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bert import BertSpec, BertTextEncoder, tokenize
from models.videomamba import VideoMamba, as_static_clip

TEMP_MIN, TEMP_MAX = 0.001, 0.5


class LinearDecoder(nn.Module):
    """The released `Linear_Decoder`: `norm(head(x))`; maps student tokens to the CLIP teacher's width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.head(x))


class UMTVideoText(nn.Module):
    """VideoMamba + BERT video-text model in the released layout; see the module docstring for the pieces."""

    def __init__(self, vision_encoder: VideoMamba, text_encoder: BertTextEncoder, embed_dim: int = 512,
                 temp_init: float = 0.07, clip_output_dim: int = 512, num_clip_decoders: int = 1,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not TEMP_MIN <= temp_init <= TEMP_MAX:
            raise ValueError(f"temp_init={temp_init} must be in [{TEMP_MIN}, {TEMP_MAX}]")
        if text_encoder.spec.encoder_width != vision_encoder.embed_dim:
            raise ValueError(f"the text encoder's cross-attention expects width {text_encoder.spec.encoder_width} "
                             f"but the vision encoder's is {vision_encoder.embed_dim}")
        width = vision_encoder.embed_dim
        # Registration order is the released state-dict order. Shape (1,), not 0-d: DeepSpeed broadcasts
        # parameters as byte views, which 0-d tensors refuse.
        self.temp = nn.Parameter(torch.full((1,), float(temp_init)))
        self.vision_encoder = vision_encoder
        vision_encoder.clip_decoder = nn.ModuleList(LinearDecoder(width, clip_output_dim)
                                                    for _ in range(num_clip_decoders))
        vision_encoder.pool_norm = nn.LayerNorm(width)
        # The released PretrainVideoMamba's whole-model trunc-normal pass also covers the decoder heads.
        for decoder in vision_encoder.clip_decoder:
            nn.init.trunc_normal_(decoder.head.weight, std=0.02)
            nn.init.zeros_(decoder.head.bias)
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(text_encoder.width, embed_dim)
        self.itm_head = nn.Linear(text_encoder.width, 2)
        self.tokenizer = None  # set by the builder; not a module, not in the state dict
        self.config = dict(config or {})

    # ------------------------------------------------------------------ vision side

    def as_clip(self, video_BCTHW: Tensor) -> Tensor:
        """An image batch (T = 1) as static clips of the vision encoder's frame count (a view, no copy)."""
        return as_static_clip(video_BCTHW, self.vision_encoder.num_frames)

    def encode_vision(self, video_BCTHW: Tensor, keep_BL: Tensor | None = None,
                      per_frame: bool | None = None) -> tuple[Tensor, Tensor]:
        """(patch tokens after the final norm, CLS dropped (B, N, D); pooled tokens after pool_norm (B, F, D)).

        Pooling is CLS + the mean patch token, per frame (F = T) or over the whole clip (F = 1). `per_frame`
        None follows the release: per frame without a keep mask, per clip with one.
        """
        tokens_BLD = self.vision_encoder.forward_features(video_BCTHW, keep_BL=keep_BL).tokens_BLD
        per_frame = keep_BL is None if per_frame is None else per_frame
        return tokens_BLD[:, 1:], self.pool(tokens_BLD, per_frame)

    def pool(self, tokens_BLD: Tensor, per_frame: bool) -> Tensor:
        """pool_norm(CLS + mean patch token): (B, T, D) per frame (equal patches per frame), else (B, 1, D)."""
        cls_B1D, patches_BND = tokens_BLD[:, :1], tokens_BLD[:, 1:]
        if per_frame:
            B, N, D = patches_BND.shape
            frames = self.vision_encoder.grid[0]
            if N % frames:
                raise ValueError(f"per-frame pooling needs the same token count in each of the {frames} frames; "
                                 f"got {N} patch tokens")
            mean_BFD = patches_BND.reshape(B, frames, N // frames, D).mean(dim=2)
        else:
            mean_BFD = patches_BND.mean(dim=1, keepdim=True)
        return self.vision_encoder.pool_norm(cls_B1D + mean_BFD)

    @torch.no_grad()
    def encode_video_frames(self, video_BCTHW: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation: (L2-normalised per-frame embeddings (B, T, E) in fp32, patch tokens (B, T*P, D))."""
        patches_BND, pooled_BTD = self.encode_vision(video_BCTHW, per_frame=True)
        return F.normalize(self.vision_proj(pooled_BTD).float(), dim=-1), patches_BND

    # ------------------------------------------------------------------ text side

    def tokenize(self, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), both (B, max_tokens), on the model's device."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; build it with models.umt.build_umt_model or load it "
                               "with models.umt_checkpoint.load_umt_model")
        return tokenize(self.tokenizer, texts, max_tokens, self.temp.device)

    def encode_text(self, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> tuple[Tensor, Tensor]:
        """(text token features after the text layers (B, L, W), text_proj of the CLS feature (B, E))."""
        text_BLW = self.text_encoder.encode_text(input_ids_BL, attention_mask_BL)
        return text_BLW, self.text_proj(text_BLW[:, 0])

    @torch.no_grad()
    def encode_text_features(self, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluation: (L2-normalised text embeddings (B, E) fp32, token features (B, L, W), attention mask)."""
        input_ids_BL, attention_mask_BL = self.tokenize(texts, max_tokens)
        text_BLW, text_BE = self.encode_text(input_ids_BL, attention_mask_BL)
        return F.normalize(text_BE.float(), dim=-1), text_BLW, attention_mask_BL

    # ------------------------------------------------------------------ temperature, matching, MLM

    def clamp_temperature_(self) -> None:
        """Keep the temperature in [0.001, 0.5] (UMT clamps it in place at every forward)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def itm_logits(self, vision_BND: Tensor, text_BLW: Tensor, attention_mask_BL: Tensor) -> Tensor:
        """(B, 2) matching logits of aligned pairs: row i of the vision side with row i of the text side.
        A vision batch of 1 is shared by every text (its projections computed once)."""
        fused_BLW = self.text_encoder.fuse(text_BLW, attention_mask_BL, vision_BND)
        return self.itm_head(fused_BLW[:, 0])

    @torch.no_grad()
    def itm_scores_for_video(self, vision_ND: Tensor, text_BLW: Tensor, attention_mask_BL: Tensor,
                             batch_size: int = 32) -> Tensor:
        """Positive matching logit (the released re-rank score) of one video with each text, (B,) fp32."""
        vision_1ND = vision_ND[None]
        scores = [self.itm_logits(vision_1ND, text_BLW[i:i + batch_size], attention_mask_BL[i:i + batch_size])[:, 1]
                  for i in range(0, len(text_BLW), batch_size)]
        return torch.cat(scores).float() if scores else text_BLW.new_zeros(0, dtype=torch.float32)

    def mlm_logits(self, masked_ids_BL: Tensor, attention_mask_BL: Tensor, vision_BND: Tensor) -> Tensor:
        """(B, L, V) vocabulary logits of masked captions: text layers on the masked ids, fusion with the
        video, then the LM head (the released MLM loss takes cross-entropy at the masked positions)."""
        text_BLW = self.text_encoder.encode_text(masked_ids_BL, attention_mask_BL)
        return self.text_encoder.mlm_logits(self.text_encoder.fuse(text_BLW, attention_mask_BL, vision_BND))


def frame_mean_similarity(text_TE: Tensor, video_VFE: Tensor) -> Tensor:
    """(num_texts, num_videos) released similarity: the mean over a video's F slots of the cosine with each
    text. Computed as the text against the mean of the unit slot vectors (the same number: the mean of dot
    products is the dot product with the mean), one matrix product instead of a (T, F, V) tensor."""
    text_TE = F.normalize(text_TE.float(), dim=-1)
    video_VFE = F.normalize(video_VFE.float(), dim=-1)
    return text_TE @ video_VFE.mean(dim=1).T


def build_umt_model(model_name: str | None, model_kwargs: dict[str, Any], bert: BertSpec | dict[str, Any],
                    tokenizer: Any = None, embed_dim: int = 512, temp_init: float = 0.07,
                    clip_output_dim: int = 512, num_clip_decoders: int = 1) -> UMTVideoText:
    """`create_model(model_name, num_classes=0, **model_kwargs)` (or `VideoMamba(**model_kwargs)` when
    `model_name` is None: explicit dimensions, as read off a checkpoint) + a BERT tower of `bert`'s shape,
    random weights (`models.bert.load_pretrained_bert` loads bert-base-uncased into `model.text_encoder`). A
    `bert` dict without `encoder_width` gets the vision encoder's width (the release sets it so)."""
    from models.registry import create_model

    kwargs = {**model_kwargs, "num_classes": 0}
    vision = VideoMamba(**kwargs) if model_name is None else create_model(model_name, **kwargs)
    spec = bert if isinstance(bert, BertSpec) else BertSpec(**{"encoder_width": vision.embed_dim, **bert})
    config = {"model_name": model_name, "model_kwargs": {**model_kwargs, "num_classes": 0}, "bert": spec.to_dict(),
              "embed_dim": embed_dim, "clip_output_dim": clip_output_dim, "num_clip_decoders": num_clip_decoders}
    model = UMTVideoText(vision, BertTextEncoder(spec), embed_dim=embed_dim, temp_init=temp_init,
                         clip_output_dim=clip_output_dim, num_clip_decoders=num_clip_decoders, config=config)
    model.tokenizer = tokenizer
    return model
