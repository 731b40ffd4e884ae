"""Clip transforms in plain torch: uint8 (T, H, W, 3) frames -> normalised float (3, T, S, S).

Train: one random resized crop for the whole clip (area fraction from `scale`, aspect 3/4..4/3),
optional horizontal flip, optional RandAugment, normalise, optional random erasing (`pipeline.data.augment`).
Eval: resize the full frame to S x S (bicubic without antialiasing, no crop: the released zero-shot retrieval
protocol, docs/evaluation.md), or resize the short side to S and take the central square (bilinear:
classification validation); `spatial_crops` gives the multi-crop classification test views (short side to S,
crops evenly spaced along the long side, docs/finetune.md).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.augment import ClipAugment, rand_augment, random_erase

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
    augment: ClipAugment | None = None,
) -> torch.Tensor:
    """Random resized crop (same box for every frame) + optional flip [+ RandAugment] + normalise [+ random
    erasing] -> (3, T, size, size). RandAugment runs on the cropped clip, where it costs size^2 per frame."""
    x_TCHW = _to_uint8_TCHW(frames_THW3)
    top, left, h, w = random_crop_box(x_TCHW.shape[2], x_TCHW.shape[3], scale, rng)
    x_TCHW = x_TCHW[:, :, top : top + h, left : left + w]
    x_TCHW = F.interpolate(x_TCHW, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if flip and rng.random() < 0.5:
        x_TCHW = x_TCHW.flip(-1)
    if augment is not None and augment.rand_augment is not None:
        if x_TCHW.is_floating_point():  # CUDA (NVDEC) clips are resized as floats; the ops are uint8 ones
            x_TCHW = x_TCHW.round_().clamp_(0, 255).to(torch.uint8)
        x_TCHW = rand_augment(x_TCHW, augment.rand_augment, rng)
    x_CTHW = _normalise_CTHW(x_TCHW, mean, std)
    if augment is not None:
        x_CTHW = random_erase(x_CTHW, augment.random_erasing, rng)
    return x_CTHW


def eval_transform(
    frames_THW3: np.ndarray | torch.Tensor, size: int, mean: list[float], std: list[float], crop: str = "none"
) -> torch.Tensor:
    """Normalised (3, T, size, size), on the frames' device (CPU, or CUDA for NVDEC frames).

    crop="none": resize the whole frame to size x size as the released zero-shot evaluation does. Its test
    transform is torchvision's `Resize((S, S), BICUBIC)` on uint8 tensors (torchvision < 0.17, whose tensor
    resize had no antialiasing): bicubic, align_corners=False, no antialias, clamped and rounded back to uint8;
    then `/ 255`, minus mean, over std, in that order.
    crop="center": the short side to `size` (bilinear), then the central square (classification validation).
    """
    if crop == "center":
        return spatial_crops(frames_THW3, size, 1, mean, std)[0]
    if crop != "none":
        raise ValueError(f"unknown eval crop {crop!r}; choose none or center")
    x_TCHW = _to_uint8_TCHW(frames_THW3).float()
    x_TCHW = F.interpolate(x_TCHW, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    x_CTHW = x_TCHW.clamp_(0, 255).round_().permute(1, 0, 2, 3).contiguous()
    mean_C = torch.tensor(mean, dtype=torch.float32, device=x_CTHW.device).view(3, 1, 1, 1)
    std_C = torch.tensor(std, dtype=torch.float32, device=x_CTHW.device).view(3, 1, 1, 1)
    return x_CTHW.div_(255.0).sub_(mean_C).div_(std_C)


def spatial_crops(frames_THW3: np.ndarray | torch.Tensor, size: int, num_crops: int, mean: list[float],
                  std: list[float]) -> list[torch.Tensor]:
    """Resize the short side to `size` (bilinear, aspect kept), then `num_crops` size x size squares evenly spaced
    along the long side (one: the centre; three: start, centre, end), each normalised -> (3, T, size, size)."""
    x_TCHW = _to_uint8_TCHW(frames_THW3)
    height, width = x_TCHW.shape[2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x_TCHW = F.interpolate(x_TCHW, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    slack = max(new_h, new_w) - size
    starts = [slack // 2] if num_crops == 1 else [int(i * slack / (num_crops - 1)) for i in range(num_crops)]
    crops = [x_TCHW[:, :, s : s + size, :size] if new_h > new_w else x_TCHW[:, :, :size, s : s + size]
             for s in starts]  # fmt: skip
    return [_normalise_CTHW(crop, mean, std) for crop in crops]
