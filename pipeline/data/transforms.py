"""Clip transforms in plain torch: uint8 (T, H, W, 3) frames -> normalised float (3, T, S, S).

Train: one random resized crop for the whole clip (area fraction from `scale`, aspect 3/4..4/3),
optional horizontal flip, normalise. Eval: resize the full frame to S x S (bicubic without antialiasing,
no crop: the released zero-shot retrieval protocol, docs/evaluation.md), normalise.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

_ASPECT_RANGE = (3 / 4, 4 / 3)


def _to_uint8_TCHW(frames_THW3: np.ndarray | torch.Tensor) -> torch.Tensor:
    # A channels-last uint8 view: torch's antialiased uint8 resize on it is ~10x faster than on floats
    # and matches PIL's bilinear/bicubic to within one grey level. On CUDA (NVDEC frames) the antialiased
    # resize takes floats only.
    if isinstance(frames_THW3, np.ndarray):
        frames_THW3 = torch.from_numpy(np.ascontiguousarray(frames_THW3))
    x_TCHW = frames_THW3.permute(0, 3, 1, 2)
    return x_TCHW if x_TCHW.device.type == "cpu" else x_TCHW.float()


def _normalise_CTHW(x_TCHW: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    mean_C = torch.tensor(mean, device=x_TCHW.device).view(3, 1, 1, 1) * 255.0
    inv_std_C = 1.0 / (torch.tensor(std, device=x_TCHW.device).view(3, 1, 1, 1) * 255.0)
    return x_TCHW.permute(1, 0, 2, 3).contiguous().float().sub_(mean_C).mul_(inv_std_C)


def random_crop_box(height: int, width: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, ...]:
    """(top, left, h, w) of a crop with area fraction in `scale` and aspect in 3/4..4/3 (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(_ASPECT_RANGE[0]), math.log(_ASPECT_RANGE[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)  # fall back to the central square
    return (height - side) // 2, (width - side) // 2, side, side


def train_transform(
    frames_THW3: np.ndarray | torch.Tensor,
    size: int,
    scale: tuple[float, float],
    flip: bool,
    mean: list[float],
    std: list[float],
    rng: random.Random,
) -> torch.Tensor:
    """Random resized crop (same box for every frame) + optional flip + normalise -> (3, T, size, size)."""
    x_TCHW = _to_uint8_TCHW(frames_THW3)
    top, left, h, w = random_crop_box(x_TCHW.shape[2], x_TCHW.shape[3], scale, rng)
    x_TCHW = x_TCHW[:, :, top : top + h, left : left + w]
    x_TCHW = F.interpolate(x_TCHW, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if flip and rng.random() < 0.5:
        x_TCHW = x_TCHW.flip(-1)
    return _normalise_CTHW(x_TCHW, mean, std)


def eval_transform(
    frames_THW3: np.ndarray | torch.Tensor, size: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """Resize the whole frame to size x size (no crop) as the released evaluation does, then normalise:
    (3, T, size, size), on the frames' device (CPU, or CUDA for NVDEC frames).

    The released test transform is torchvision's `Resize((S, S), BICUBIC)` on uint8 tensors (torchvision
    < 0.17, whose tensor resize had no antialiasing): bicubic, align_corners=False, no antialias, clamped and
    rounded back to uint8; then `/ 255`, minus mean, over std, in that order.
    """
    x_TCHW = _to_uint8_TCHW(frames_THW3).float()
    x_TCHW = F.interpolate(x_TCHW, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    x_CTHW = x_TCHW.clamp_(0, 255).round_().permute(1, 0, 2, 3).contiguous()
    mean_C = torch.tensor(mean, dtype=torch.float32, device=x_CTHW.device).view(3, 1, 1, 1)
    std_C = torch.tensor(std, dtype=torch.float32, device=x_CTHW.device).view(3, 1, 1, 1)
    return x_CTHW.div_(255.0).sub_(mean_C).div_(std_C)
