"""Classification metrics of a multi-view test: view aggregation, top-k, per-class accuracy, confusion summary.

Views are merged as the released code merges them: each view's logits go through a softmax, the probabilities are
averaged over the views of a video, and the video's prediction is the argmax of the average. Top-k counts a video
as correct when its label is among the k most probable classes. Percentages throughout.

Legend: N videos, V views per video, K classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def aggregate_views(logits_NVK: Tensor) -> Tensor:
    """(N, K) class probabilities: the mean over the V views of each view's softmax."""
    return logits_NVK.float().softmax(dim=-1).mean(dim=1)


def topk_accuracy(scores_NK: Tensor, label_N: Tensor, k: int) -> float:
    """Percentage of videos whose label is among their k highest scores (k is capped at K)."""
    top_Nk = scores_NK.topk(min(k, scores_NK.shape[1]), dim=1).indices
    return 100.0 * float((top_Nk == label_N[:, None]).any(dim=1).float().mean())


def confusion_matrix(pred_N: Tensor, label_N: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    flat = label_N.long() * num_classes + pred_N.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion_KK: Tensor, names: list[str]) -> list[dict[str, Any]]:
    """Per class: index, name, test videos and top-1 (%; None for a class without test videos)."""
    videos_K = confusion_KK.sum(dim=1)
    rows = []
    for k, name in enumerate(names):
        count = int(videos_K[k])
        rows.append({"class": k, "name": name, "videos": count,
                     "top1": 100.0 * int(confusion_KK[k, k]) / count if count else None})
    return rows


def most_confused(confusion_KK: Tensor, names: list[str], top: int) -> list[dict[str, Any]]:
    """The `top` largest off-diagonal cells: true class, predicted class, videos, share of the true class (%)."""
    off_KK = confusion_KK.clone()
    off_KK.fill_diagonal_(0)
    videos_K = confusion_KK.sum(dim=1)
    count = min(top, int((off_KK > 0).sum()))
    values, flat = off_KK.flatten().topk(count) if count else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    pairs = []
    for value, index in zip(values.tolist(), flat.tolist(), strict=True):
        true, predicted = divmod(index, confusion_KK.shape[1])
        pairs.append({"true": names[true], "predicted": names[predicted], "videos": int(value),
                      "share_of_true": 100.0 * value / int(videos_K[true])})
    return pairs


def classification_summary(probs_NK: Tensor, label_N: Tensor, names: list[str], top_confused: int) -> dict[str, Any]:
    """{"metrics": {top1, top5, mean_class_top1}, "per_class": [...], "confusion": {"most_confused", "matrix"}}."""
    confusion_KK = confusion_matrix(probs_NK.argmax(dim=1), label_N, len(names))
    per_class = per_class_accuracy(confusion_KK, names)
    present = [row["top1"] for row in per_class if row["top1"] is not None]
    metrics = {"top1": topk_accuracy(probs_NK, label_N, 1), "top5": topk_accuracy(probs_NK, label_N, 5),
               "mean_class_top1": sum(present) / len(present)}
    return {"metrics": metrics, "per_class": per_class,
            "confusion": {"most_confused": most_confused(confusion_KK, names, top_confused),
                          "matrix": confusion_KK.tolist()}}
