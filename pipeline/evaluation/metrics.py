"""Retrieval metrics from a text-video similarity matrix: R@1/5/10, median and mean rank, both directions.

Conventions (shared by every number this project reports):
- `sim_TV` is (num_texts, num_videos), higher = more similar.
- Ranks are 1-based. A tie between the correct item and a wrong one is broken pessimistically: the
  correct item ranks after every wrong item with an equal score, so constant scores never look good.
- Text->video: each text has exactly one correct video. Video->text: a video may have several correct
  texts (multi-caption sets); its rank is that of its best-ranked correct text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RECALL_AT = (1, 5, 10)


def _as_numpy(sim: Any) -> np.ndarray:
    if hasattr(sim, "detach"):  # torch.Tensor (any device / dtype) without importing torch here
        sim = sim.detach().float().cpu().numpy()
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be a 2-D (num_texts, num_videos) matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("sim contains NaN or infinite values; check the features the scores were computed from")
    return sim


def _check_txt2vid(txt2vid: Sequence[int], num_texts: int, num_videos: int) -> np.ndarray:
    out = np.asarray(list(txt2vid), dtype=np.int64)
    if out.shape != (num_texts,):
        raise ValueError(f"txt2vid has {out.size} entries but sim has {num_texts} text rows")
    if num_texts and (out.min() < 0 or out.max() >= num_videos):
        raise ValueError(f"txt2vid holds video indices outside [0, {num_videos}) (sim has {num_videos} columns)")
    return out


def _correct_mask_TV(vid2txt: Sequence[Sequence[int]], num_texts: int, num_videos: int) -> np.ndarray:
    if len(vid2txt) != num_videos:
        raise ValueError(f"vid2txt has {len(vid2txt)} entries but sim has {num_videos} video columns")
    mask_TV = np.zeros((num_texts, num_videos), dtype=bool)
    for j, texts in enumerate(vid2txt):
        texts = list(texts)
        if not texts:
            raise ValueError(f"vid2txt[{j}] is empty: every video needs at least one correct text")
        if min(texts) < 0 or max(texts) >= num_texts:
            raise ValueError(f"vid2txt[{j}] holds text indices outside [0, {num_texts})")
        mask_TV[texts, j] = True
    return mask_TV


def t2v_ranks(sim: Any, txt2vid: Sequence[int]) -> np.ndarray:
    """1-based rank of each text's correct video (pessimistic ties): (num_texts,) int."""
    sim_TV = _as_numpy(sim)
    gt_T = _check_txt2vid(txt2vid, *sim_TV.shape)
    correct_T = sim_TV[np.arange(sim_TV.shape[0]), gt_T]
    # Counting every column >= the correct score includes the correct column itself: that is the +1.
    return (sim_TV >= correct_T[:, None]).sum(axis=1)


def v2t_ranks(sim: Any, vid2txt: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank of each video's best-ranked correct text (pessimistic ties): (num_videos,) int."""
    sim_TV = _as_numpy(sim)
    mask_TV = _correct_mask_TV(vid2txt, *sim_TV.shape)
    best_V = np.where(mask_TV, sim_TV, -np.inf).max(axis=0)
    wrong_at_or_above_V = ((sim_TV >= best_V[None, :]) & ~mask_TV).sum(axis=0)
    return wrong_at_or_above_V + 1


def rank_summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    """`{prefix}_r1/_r5/_r10` in percent, `{prefix}_medr`, `{prefix}_meanr` from 1-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError(f"{prefix}: no queries to score")
    out = {f"{prefix}_r{k}": float(100.0 * (ranks <= k).mean()) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float(np.median(ranks))
    out[f"{prefix}_meanr"] = float(ranks.mean())
    return out


def retrieval_metrics(sim: Any, txt2vid: Sequence[int], vid2txt: Sequence[Sequence[int]]) -> dict[str, float]:
    """Text->video and video->text R@1/5/10 (percent), MdR and MnR (1-based ranks).

    sim: (num_texts, num_videos) numpy array or torch tensor; txt2vid[i]: the video of text i;
    vid2txt[j]: the texts of video j (must agree with txt2vid).
    """
    sim_TV = _as_numpy(sim)
    gt_T = _check_txt2vid(txt2vid, *sim_TV.shape)
    mask_TV = _correct_mask_TV(vid2txt, *sim_TV.shape)
    if not np.array_equal(mask_TV, np.eye(sim_TV.shape[1], dtype=bool)[gt_T]):
        raise ValueError("txt2vid and vid2txt disagree: text i must be listed in vid2txt[txt2vid[i]] and nowhere else")
    return {**rank_summary("t2v", t2v_ranks(sim_TV, gt_T)), **rank_summary("v2t", v2t_ranks(sim_TV, vid2txt))}
