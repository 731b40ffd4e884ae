"""Score matrices for retrieval: cosine similarity, dual-softmax reweighting, top-k re-rank bookkeeping.

Every matrix is (num_texts, num_videos). Re-ranking needs one matrix per direction (a text's top-k videos
and a video's top-k texts are different pairs), so the functions here return per-direction matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_similarity(text_TE: Tensor, video_VE: Tensor) -> Tensor:
    """(num_texts, num_videos) cosine similarity; inputs are re-normalised in fp32 so callers can't get it wrong."""
    text_TE = torch.nn.functional.normalize(text_TE.float(), dim=-1)
    video_VE = torch.nn.functional.normalize(video_VE.float(), dim=-1)
    return text_TE @ video_VE.T


def dual_softmax(sim_TV: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Dual-softmax reweighting (CAMoE, arXiv:2109.04290): (t2v scores, v2t scores).

    For text->video ranking each score is multiplied by the softmax over *texts* of its column: a video
    that is close to every query (a "hub") gets a small prior for each of them, a video that prefers
    this text over the others keeps its score. Video->text is the transpose of the same idea. It uses the
    whole query set at once (transductive), so it is off by default and labelled in the report.
    """
    logits_TV = sim_TV.float() / temperature
    return sim_TV * logits_TV.softmax(dim=0), sim_TV * logits_TV.softmax(dim=1)


def top_k_pairs(sim_t2v_TV: Tensor, sim_v2t_TV: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Candidate masks for re-ranking: (each text's top-k videos, each video's top-k texts), both bool (T, V)."""
    num_texts, num_videos = sim_t2v_TV.shape
    t2v_TV = torch.zeros_like(sim_t2v_TV, dtype=torch.bool)
    t2v_TV.scatter_(1, sim_t2v_TV.topk(min(k, num_videos), dim=1).indices, True)
    v2t_TV = torch.zeros_like(sim_v2t_TV, dtype=torch.bool)
    v2t_TV.scatter_(0, sim_v2t_TV.topk(min(k, num_texts), dim=0).indices, True)
    return t2v_TV, v2t_TV


def apply_rerank(sim_TV: Tensor, candidates_TV: Tensor, vtm_TV: Tensor) -> Tensor:
    """Candidates take their VTM score and move above every non-candidate; the rest keep their order.

    UMT sets non-candidates to -100; keeping their first-stage order below the candidates gives the same
    R@k for k <= top-k and a meaningful MdR/MnR when the answer falls outside the top-k.
    """
    vtm_TV = vtm_TV.float()
    sim_TV = sim_TV.float()
    floor = vtm_TV[candidates_TV].min() if candidates_TV.any() else sim_TV.new_tensor(0.0)
    # Shift the non-candidates so their maximum sits 1 below the lowest candidate score.
    rest_TV = sim_TV - sim_TV.max() + floor - 1.0
    return torch.where(candidates_TV, vtm_TV, rest_TV)


RELEASED_FILL = -100.0


def released_rerank(candidates_TV: Tensor, vtm_TV: Tensor) -> Tensor:
    """The re-ranked matrix as the released evaluation fills it: the matching logit on candidates, -100 elsewhere."""
    return torch.where(candidates_TV, vtm_TV.float(), torch.full_like(vtm_TV, RELEASED_FILL, dtype=torch.float32))


@torch.no_grad()
def vtm_rows(model, index_B: Tensor, clip_BCTHW: Tensor, texts: list[str], pairs_VT: Tensor, pair_batch: int,
             max_tokens: int | None = None) -> Tensor:
    """VTM scores of each clip with its candidate texts: (B, num_texts), zero where not a candidate.

    `pairs_VT[j]` marks the texts to score against video `index_B[b] == j`. Uses the model's
    `vtm_scores_for_clip(video_1CTHW, texts, batch_size)` contract: each clip goes through the backbone once,
    whatever its number of candidates; its texts are scored `pair_batch` at a time.
    """
    out_BT = torch.zeros(len(index_B), len(texts), device=clip_BCTHW.device)
    for b, j in enumerate(index_B.tolist()):
        text_ids = pairs_VT[j].nonzero().flatten().tolist()
        if text_ids:
            out_BT[b, text_ids] = model.vtm_scores_for_clip(clip_BCTHW[b : b + 1], [texts[i] for i in text_ids],
                                                            pair_batch, max_tokens).float()
    return out_BT
