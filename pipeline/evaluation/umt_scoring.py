"""Zero-shot scoring of a BERT-tower video-text model (`models.umt.UMTVideoText`) as the release evaluates it.

The released evaluation (UMT / VideoMamba `tasks/retrieval_utils.py::evaluation`), step by step:
1. texts: tokenised to `max_txt_l` tokens (padded to that length), the text layers give token features and
   the attention mask; the text embedding is `text_proj` of the [CLS] feature;
2. videos: the backbone's final-norm tokens; per frame, `pool_norm(CLS + mean patch token)` -> `vision_proj`.
   The T*P patch tokens (CLS dropped, every frame concatenated) are the fusion memory;
3. similarity: both sides L2-normalised in fp32, the per-frame cosines averaged over the frames (no
   temperature): `models.umt.frame_mean_similarity`;
4. re-rank: each video's top-k texts and each text's top-k videos (`scoring.rerank_top_k`, 128 released) are
   scored by the matching head's positive logit `itm_head(fusion [CLS])[:, 1]`; other entries are -100.

How it is batched here: a pair's logit does not depend on the direction it was proposed from, so each pair in
the union of both candidate sets is scored once. The vision tokens stay on the rank that computed them in
step 2 (host memory, `scoring.cache_vision_tokens`), or are computed again once per video; each video's
candidate texts go through the fusion layers `scoring.rerank_batch_size` at a time, and the video's keys and
values are projected once for all of them. The backbone never runs per pair.

Legend: T texts, V videos, F frames, E joint width, L text tokens, W text width, N patch tokens, D vision width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.umt import frame_mean_similarity
from pipeline.evaluation.cache import cached_on_all_ranks
from pipeline.evaluation.features import gather_rows, map_clips, map_texts, precision_autocast, rank_slice
from pipeline.evaluation.scoring import TEXT_BATCH_SIZE, EvalContext, Scores, add_rerank, first_stage

DEFAULT_MAX_TEXT_TOKENS = 32  # UMT's max_txt_l for MSR-VTT


def encode_text_tokens(ctx: EvalContext) -> tuple[Tensor, Tensor, Tensor]:
    """(unit text embeddings (T, E), text-layer token features (T, L, W), attention masks (T, L)), all ranks."""
    model = ctx.model()
    return map_texts(lambda chunk: model.encode_text_features(chunk, ctx.max_text_tokens), ctx.anno.texts,
                     ctx.device, TEXT_BATCH_SIZE, ctx.cfg.model.precision, ctx.timer)


class VideoTokens:
    """This rank's fusion memory: video index -> patch tokens (N, D) in host memory, kept from extraction."""

    def __init__(self) -> None:
        self.by_video: dict[int, Tensor] = {}

    def keep(self, index_B: Tensor, patches_BND: Tensor) -> None:
        for j, patches_ND in zip(index_B.tolist(), patches_BND.cpu(), strict=True):
            self.by_video[j] = patches_ND

    def covers(self, indices: range) -> bool:
        return len(indices) > 0 and all(j in self.by_video for j in indices)


def _itm_rows(ctx: EvalContext, index_B: Tensor, patches_BND: Tensor, pairs_VT: Tensor, text_TLW: Tensor,
              mask_TL: Tensor) -> Tensor:
    """(B, T) matching logits of each video with its candidate texts, 0 where not a candidate."""
    model, batch = ctx.model(), ctx.cfg.scoring.rerank_batch_size
    out_BT = torch.zeros(len(index_B), len(mask_TL), device=ctx.device)
    for b, j in enumerate(index_B.tolist()):
        text_ids = pairs_VT[j].nonzero().flatten().to(ctx.device)
        if len(text_ids):
            out_BT[b, text_ids] = model.itm_scores_for_video(
                patches_BND[b], text_TLW[text_ids], mask_TL[text_ids], batch)
    return out_BT


def _itm_matrix(ctx: EvalContext, pairs_VT: Tensor, tokens: VideoTokens, texts: dict[str, Tensor]) -> Tensor:
    """(T, V) matching logits of every candidate pair (0 elsewhere), each rank scoring its own videos."""
    cfg, anno, timer = ctx.cfg, ctx.anno, ctx.timer
    if not texts:
        _, texts["text_TLW"], texts["mask_TL"] = encode_text_tokens(ctx)
    text_TLW, mask_TL = texts["text_TLW"].to(ctx.device), texts["mask_TL"].to(ctx.device)
    mine = rank_slice(len(anno.videos))
    if tokens.covers(mine):
        indices, rows = [], []
        for j in mine:  # the tokens from extraction: no decoding, no backbone
            with timer.phase("vtm_rerank_forward", ctx.device), precision_autocast(ctx.device, cfg.model.precision):
                index_1 = torch.tensor([j], device=ctx.device)
                patches_1ND = tokens.by_video[j].to(ctx.device, non_blocking=True)[None]
                rows.append(_itm_rows(ctx, index_1, patches_1ND, pairs_VT, text_TLW, mask_TL))
            indices.append(index_1)
        vtm_VT = gather_rows(indices, rows, len(anno.videos), mine)
    else:
        def rows_for_clips(index_B: Tensor, clip_BCTHW: Tensor) -> Tensor:
            _, patches_BND = ctx.model().encode_video_frames(clip_BCTHW)
            return _itm_rows(ctx, index_B, patches_BND, pairs_VT, text_TLW, mask_TL)

        vtm_VT = map_clips(rows_for_clips, anno.videos, ctx.source, ctx.spec, ctx.device, cfg.data.batch_size,
                           cfg.data.num_workers, cfg.model.precision, desc="vtm_rerank", timer=timer)
    return vtm_VT.T.contiguous()


def umt_scores(ctx: EvalContext) -> Scores:
    """The released protocol (module docstring): frame-mean cosine, then the matching-head re-rank."""
    cfg, anno, timer = ctx.cfg, ctx.anno, ctx.timer
    tokens = VideoTokens()
    texts: dict[str, Tensor] = {}
    keep_tokens = bool(cfg.scoring.rerank_top_k) and cfg.scoring.cache_vision_tokens

    def video_rows(index_B: Tensor, clip_BCTHW: Tensor) -> Tensor:
        frames_BFE, patches_BND = ctx.model().encode_video_frames(clip_BCTHW)
        if keep_tokens:
            tokens.keep(index_B, patches_BND)
        return frames_BFE

    def extract() -> dict[str, Tensor]:
        video_VFE = map_clips(video_rows, anno.videos, ctx.source, ctx.spec, ctx.device, cfg.data.batch_size,
                              cfg.data.num_workers, cfg.model.precision, desc="video", timer=timer)
        text_TE, texts["text_TLW"], texts["mask_TL"] = encode_text_tokens(ctx)
        return {"video_VFE": video_VFE, "text_TE": text_TE}

    features = cached_on_all_ranks(ctx.cache, "features", ctx.feature_key, extract)
    scores = first_stage(ctx, features, frame_mean_similarity, "video_VFE")
    if not cfg.scoring.rerank_top_k:
        return scores
    return add_rerank(ctx, scores, lambda pairs_VT: _itm_matrix(ctx, pairs_VT, tokens, texts))
