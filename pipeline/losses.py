"""Losses of the stages: symmetric InfoNCE over all ranks, video-text matching, feature alignment, and the
classifier's cross-entropy against soft (label-smoothed, mixed) targets.

Legend: B local batch, N global batch (B * world size), F slots per video (frames), E joint embedding width,
K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import all_gather_with_grad
from pipeline.sampling import multinomial


def positive_targets(index_N: Tensor, index_M: Tensor) -> Tensor:
    """(N, M) soft targets: 1 where sample ids match, each row normalised (duplicated ids share the mass)."""
    pos_NM = (index_N[:, None] == index_M[None, :]).float()
    return pos_NM / pos_NM.sum(dim=1, keepdim=True)


def unit_video_embedding(video_BE: Tensor) -> Tensor:
    """(B, E) unit video embeddings in fp32, or for (B, F, E) per-slot (per-frame) ones the mean of the F unit slot
    vectors (not renormalised): its dot product with a unit text is the mean over slots of the per-slot cosine,
    the released similarity of a video with several slots."""
    unit = F.normalize(video_BE.float(), dim=-1)
    return unit.mean(dim=1) if unit.dim() == 3 else unit


def contrastive_loss(video_BE: Tensor, text_BE: Tensor, index_B: Tensor, temp: Tensor,
                     sum_gradients: bool = True) -> Tensor:
    """Symmetric InfoNCE over the batch of every rank (UMT's VTC loss).

    Features are L2-normalised here in fp32 and gathered with gradient, so every rank computes the loss of
    the whole global batch. `video_BE` may be (B, F, E): F slots per video (frames), the similarity then being
    the mean of the per-slot cosines (`unit_video_embedding`). Samples with equal `index` are all positives.
    `sum_gradients` (pipeline.distributed.all_gather_with_grad): True gives the parameter gradients of one process
    holding the whole batch after data-parallel averaging; False, the released gather's 1/world of them for the
    features (the temperature's gradient is the whole-batch one either way).
    """
    video_NE = all_gather_with_grad(unit_video_embedding(video_BE), sum_gradients)
    text_NE = all_gather_with_grad(F.normalize(text_BE.float(), dim=-1), sum_gradients)
    index_N = all_gather_with_grad(index_B)
    sim_v2t_NN = video_NE @ text_NE.t() / temp.float()
    targets_NN = positive_targets(index_N, index_N)  # symmetric: the same targets serve both directions
    loss_v2t = -(targets_NN * F.log_softmax(sim_v2t_NN, dim=1)).sum(dim=1).mean()
    loss_t2v = -(targets_NN * F.log_softmax(sim_v2t_NN.t(), dim=1)).sum(dim=1).mean()
    return (loss_v2t + loss_t2v) / 2


def sample_hard_negatives(sim_v2t_BB: Tensor, index_B: Tensor, generator: torch.Generator | None = None,
                          floor: float = 1e-4) -> tuple[Tensor, Tensor]:
    """One hard negative per sample, drawn ∝ softmax(similarity) among non-positives (UMT's `vtm_hard_neg`).

    `floor` is added to every softmax probability before the positives are excluded (every negative keeps a
    chance). 0 draws from the softmax over the negatives alone, which is the released distribution (its
    `softmax(sim + 1e-4)` shifts the logits, which changes nothing) without its failure when every negative's
    probability underflows to 0.

    Returns (text_for_video_B, video_for_text_B): the index of the negative text for each video and of the
    negative video for each text, within the local batch.
    """
    with torch.no_grad():
        positive_BB = index_B[:, None] == index_B[None, :]
        if bool(positive_BB.all(dim=1).any()):
            raise ValueError(
                "video-text matching needs a negative for every sample, but a sample's `index` equals every "
                "other index in the local batch; use a batch size >= 2 with distinct samples or set "
                "task.vtm_weight to 0"
            )
        sim = sim_v2t_BB.float()
        if floor > 0:
            weights_v2t = (F.softmax(sim, dim=1) + floor).masked_fill(positive_BB, 0)
            weights_t2v = (F.softmax(sim.t(), dim=1) + floor).masked_fill(positive_BB, 0)
        else:
            weights_v2t = F.softmax(sim.masked_fill(positive_BB, float("-inf")), dim=1)
            weights_t2v = F.softmax(sim.t().masked_fill(positive_BB, float("-inf")), dim=1)
        # torch.multinomial's draws without its host-side input checks (pipeline/sampling.py): either way the
        # weights are positive somewhere off the positives, which the check above guarantees every row has.
        text_for_video_B = multinomial(weights_v2t, 1, replacement=True, generator=generator).squeeze(1)
        video_for_text_B = multinomial(weights_t2v, 1, replacement=True, generator=generator).squeeze(1)
    return text_for_video_B, video_for_text_B


def matching_loss(logits_positive_B2: Tensor, logits_negative_M2: Tensor) -> Tensor:
    """Cross-entropy of the matching head: positives are class 1, negatives class 0, all pairs weighted equally."""
    logits = torch.cat([logits_positive_B2, logits_negative_M2]).float()
    labels = torch.cat([
        torch.ones(len(logits_positive_B2), dtype=torch.long, device=logits.device),
        torch.zeros(len(logits_negative_M2), dtype=torch.long, device=logits.device),
    ])
    return F.cross_entropy(logits, labels)


def cosine_alignment_loss(student_BLD: Tensor, teacher_BLD: Tensor) -> Tensor:
    """mean(2 - 2 cos) over batch and tokens, both sides L2-normalised in fp32 (= squared distance of unit vectors)."""
    student = F.normalize(student_BLD.float(), dim=-1)
    teacher = F.normalize(teacher_BLD.float(), dim=-1)
    return (2 - 2 * (student * teacher).sum(dim=-1)).mean()


def soft_target_cross_entropy(logits_BK: Tensor, target_BK: Tensor) -> Tensor:
    """mean over the batch of -sum_k target_k log softmax(logits)_k, in fp32 (timm's SoftTargetCrossEntropy; with
    label-smoothed one-hot targets it equals label-smoothing cross-entropy)."""
    return -(target_BK.float() * F.log_softmax(logits_BK.float(), dim=-1)).sum(dim=-1).mean()
