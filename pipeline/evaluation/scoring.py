"""Score matrices of one evaluation: first-stage similarity, optional top-k re-rank, for either model family.

`score(ctx)` runs the family's protocol on every rank (features cached on disk, see `pipeline.evaluation.cache`)
and returns `Scores`:
- open_clip family (`dual_encoder_scores`): cosine of one clip vector and one text vector; optional
  dual-softmax; optional re-rank by the model's small matching head, each clip re-decoded and encoded once;
- BERT family (`pipeline.evaluation.umt_scoring.umt_scores`): the released protocol.

Legend: T texts (queries), V videos, E joint width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.evaluation.annotations import RetrievalAnnotations
from pipeline.evaluation.cache import FeatureCache, cache_key, cached_on_all_ranks
from pipeline.evaluation.config import EvalRetrievalConfig
from pipeline.evaluation.features import ClipSpec, VideoSource, encode_texts, encode_videos, map_clips
from pipeline.evaluation.similarity import (
    apply_rerank,
    cosine_similarity,
    dual_softmax,
    released_rerank,
    top_k_pairs,
    vtm_rows,
)
from pipeline.evaluation.timing import PhaseTimer

TEXT_BATCH_SIZE = 64


@dataclass
class EvalContext:
    """What a scoring protocol needs: the config, the queries and videos, the (lazily loaded) model."""

    cfg: EvalRetrievalConfig
    anno: RetrievalAnnotations
    source: VideoSource
    spec: ClipSpec
    device: torch.device
    model: Callable[[], Any]
    """Returns the model, loading it on first use (a cache hit never loads it)."""
    cache: FeatureCache
    feature_key: str
    timer: PhaseTimer
    max_text_tokens: int | None
    """Tokens per query the model is given (the family's default when data.max_text_tokens is null)."""


@dataclass
class Scores:
    """Per-direction score matrices, all (T, V)."""

    sim_t2v_TV: Tensor
    """First-stage scores ranking each text's videos (the similarity, or its dual-softmax reweighting)."""
    sim_v2t_TV: Tensor
    """First-stage scores ranking each video's texts."""
    features_hit: bool
    vtm_TV: Tensor | None = None
    """Matching logits where a pair is a candidate of either direction, 0 elsewhere (re-rank only)."""
    t2v_candidates_TV: Tensor | None = None
    """Each text's top-k videos (bool)."""
    v2t_candidates_TV: Tensor | None = None
    """Each video's top-k texts (bool)."""
    vtm_hit: bool | None = None

    @property
    def reranked(self) -> bool:
        return self.vtm_TV is not None

    def ranking(self) -> tuple[Tensor, Tensor]:
        """(t2v, v2t) matrices the metrics rank: re-ranked candidates above the first-stage order of the rest."""
        if not self.reranked:
            return self.sim_t2v_TV, self.sim_v2t_TV
        return (apply_rerank(self.sim_t2v_TV, self.t2v_candidates_TV, self.vtm_TV),
                apply_rerank(self.sim_v2t_TV, self.v2t_candidates_TV, self.vtm_TV))

    def released_rerank(self) -> tuple[Tensor, Tensor]:
        """(t2v, v2t) re-ranked matrices as the released code fills them: the logit on candidates, -100 elsewhere."""
        return (released_rerank(self.t2v_candidates_TV, self.vtm_TV),
                released_rerank(self.v2t_candidates_TV, self.vtm_TV))


def tensor_digest(x: Tensor) -> str:
    return hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()


def candidates(sim_t2v_TV: Tensor, sim_v2t_TV: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(each text's top-k videos, each video's top-k texts, their union as (V, T)): the pairs to re-score."""
    t2v_TV, v2t_TV = top_k_pairs(sim_t2v_TV, sim_v2t_TV, k)
    return t2v_TV, v2t_TV, (t2v_TV | v2t_TV).T.contiguous()


def first_stage(ctx: EvalContext, features: dict[str, Any], similarity: Callable[[Tensor, Tensor], Tensor],
                video_key: str) -> Scores:
    """Scores from `similarity(text_TE, features[video_key])`, dual-softmax reweighted per direction when on."""
    with ctx.timer.phase("scoring"):
        sim_TV = similarity(features["text_TE"], features[video_key])
        if ctx.cfg.scoring.dual_softmax:
            sim_t2v_TV, sim_v2t_TV = dual_softmax(sim_TV, ctx.cfg.scoring.dual_softmax_temperature)
        else:
            sim_t2v_TV, sim_v2t_TV = sim_TV, sim_TV
    return Scores(sim_t2v_TV, sim_v2t_TV, features_hit=features["hit"])


def add_rerank(ctx: EvalContext, scores: Scores, vtm_for_pairs: Callable[[Tensor], Tensor]) -> Scores:
    """Re-score each direction's top-k (`scoring.rerank_top_k`) with `vtm_for_pairs(pairs_VT) -> vtm_TV`,
    cached on disk by the candidate pairs."""
    with ctx.timer.phase("scoring"):
        t2v_TV, v2t_TV, pairs_VT = candidates(scores.sim_t2v_TV, scores.sim_v2t_TV, ctx.cfg.scoring.rerank_top_k)
    vtm_key = cache_key({"features": ctx.feature_key, "pairs_sha": tensor_digest(pairs_VT)})
    vtm = cached_on_all_ranks(ctx.cache, "vtm", vtm_key, lambda: {"vtm_TV": vtm_for_pairs(pairs_VT)})
    scores.vtm_TV, scores.vtm_hit = vtm["vtm_TV"], vtm["hit"]
    scores.t2v_candidates_TV, scores.v2t_candidates_TV = t2v_TV, v2t_TV
    return scores


def dual_encoder_scores(ctx: EvalContext) -> Scores:
    """open_clip family: cosine (optionally dual-softmax), optional re-rank by `vtm_scores_for_clip`."""
    cfg, anno, timer = ctx.cfg, ctx.anno, ctx.timer

    def extract() -> dict[str, Tensor]:
        return {
            "video_VE": encode_videos(ctx.model(), anno.videos, ctx.source, ctx.spec, ctx.device, cfg.data.batch_size,
                                      cfg.data.num_workers, cfg.model.precision, timer),
            "text_TE": encode_texts(ctx.model(), anno.texts, ctx.device, TEXT_BATCH_SIZE, cfg.model.precision, timer,
                                    max_tokens=ctx.max_text_tokens),
        }

    features = cached_on_all_ranks(ctx.cache, "features", ctx.feature_key, extract)
    scores = first_stage(ctx, features, cosine_similarity, "video_VE")
    if not cfg.scoring.rerank_top_k:
        return scores

    def rerank(pairs_VT: Tensor) -> Tensor:
        if ctx.model().vtm_head is None:
            raise ValueError(f"scoring.rerank_top_k={cfg.scoring.rerank_top_k} needs a matching head, but "
                             f"{cfg.model.checkpoint} was trained without one (task.vtm_weight 0); set "
                             "scoring.rerank_top_k=0 to score by similarity alone")

        def rows(index_B: Tensor, clip_BCTHW: Tensor) -> Tensor:
            return vtm_rows(ctx.model(), index_B, clip_BCTHW, anno.texts, pairs_VT, cfg.scoring.rerank_batch_size,
                            ctx.max_text_tokens)

        vtm_VT = map_clips(rows, anno.videos, ctx.source, ctx.spec, ctx.device, batch_size=1,
                           num_workers=cfg.data.num_workers, precision=cfg.model.precision, desc="vtm_rerank",
                           timer=timer)
        return vtm_VT.T.contiguous()

    return add_rerank(ctx, scores, rerank)


def write_scores(output_dir: str | Path, name: str, scores: Scores, anno: RetrievalAnnotations) -> Path:
    """`<output_dir>/scores_<name>.npz`, every matrix (num_texts, num_videos) float32:
    `similarity_t2v_TV` / `similarity_v2t_TV` (the first stage per direction; equal without dual-softmax) and,
    with re-ranking, `rerank_t2v_TV` / `rerank_v2t_TV` as the released code fills them (its `t2i_scores_x` and the
    transpose of its `i2t_scores_x`: the matching logit on each direction's top-k, -100 elsewhere); plus
    `txt2vid` (each text's video), `videos` and `texts` (the queries as scored)."""
    path = Path(output_dir) / f"scores_{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"similarity_t2v_TV": scores.sim_t2v_TV, "similarity_v2t_TV": scores.sim_v2t_TV}
    if scores.reranked:
        arrays["rerank_t2v_TV"], arrays["rerank_v2t_TV"] = scores.released_rerank()
    arrays = {k: v.float().cpu().numpy() for k, v in arrays.items()}
    np.savez(path, **arrays, txt2vid=np.asarray(anno.txt2vid, dtype=np.int64), videos=np.asarray(anno.videos),
             texts=np.asarray(anno.texts))
    return path
