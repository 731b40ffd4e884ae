"""Fine-tuning augmentation of whole clips: RandAugment (one draw per clip) and random erasing (one box per clip).

RandAugment follows timm's policy strings and op tables, as the released VideoMamba fine-tuning uses them
(`rand-m7-n4-mstd0.5-inc1`): `n` ops drawn uniformly with replacement, each applied with probability 0.5 at
magnitude `m` (out of 10, Gaussian noise of std `mstd`, clipped to [0, 10]), `inc1` selecting the variants whose
strength increases with the magnitude. The draw is made once per clip and applied to every frame, so motion is
left intact. The ops run on uint8 (T, C, H, W) tensors with torchvision; geometric ops fill with grey 128 and
shear about the frame centre (PIL's shear, which timm uses, is about the top-left corner).

Random erasing (timm's `RandomErasing`, 'pixel' mode, one box, the 'cube' variant the released video code uses):
with probability p one box of 2%-33% of the frame area, aspect ratio 0.3-3.3, at the same place in every frame,
is replaced by standard-normal noise in the normalised clip.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

_MAX_LEVEL = 10.0
_FILL = [128.0, 128.0, 128.0]


@dataclass(frozen=True)
class RandAugmentPolicy:
    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False


def parse_rand_augment(policy: str) -> RandAugmentPolicy:
    """`rand-m7-n4-mstd0.5-inc1` -> RandAugmentPolicy(7, 4, 0.5, True); defaults m10, n2, mstd0, inc0 (timm's)."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment policy {policy!r} must start with 'rand'")
    values: dict[str, str] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d+)?)", part)
        if not match:
            raise ValueError(f"RandAugment policy {policy!r}: unknown part {part!r} (use m<int>, n<int>, mstd<float>, "
                             "inc<0|1>)")
        values[match.group(1)] = match.group(2)
    return RandAugmentPolicy(magnitude=float(values.get("m", _MAX_LEVEL)), num_ops=int(float(values.get("n", 2))),
                             magnitude_std=float(values.get("mstd", 0.0)), increasing=values.get("inc", "0") == "1")


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() > 0.5 else value


def _affine(x: Tensor, angle: float = 0.0, translate: tuple[float, float] = (0.0, 0.0),
            shear: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    return TF.affine(x, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
                     interpolation=InterpolationMode.BILINEAR, fill=_FILL)


def _solarize_add(x: Tensor, add: int) -> Tensor:
    return torch.where(x < 128, (x.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), x)


def _solarize(x: Tensor, threshold: int) -> Tensor:
    return x if threshold > 255 else TF.solarize(x, threshold)


def _enhance(level: float, increasing: bool, rng: random.Random) -> float:
    """The blend factor of colour/contrast/brightness/sharpness: 1 +- 0.9 level (increasing), else 0.1..1.9."""
    return 1.0 + _signed(level / _MAX_LEVEL * 0.9, rng) if increasing else level / _MAX_LEVEL * 1.8 + 0.1


# name -> op(x_TCHW uint8, level in [0, 10], increasing, rng) -> x_TCHW
_Op = Callable[[Tensor, float, bool, random.Random], Tensor]
_OPS: dict[str, _Op] = {
    "AutoContrast": lambda x, level, inc, rng: TF.autocontrast(x),
    "Equalize": lambda x, level, inc, rng: TF.equalize(x),
    "Invert": lambda x, level, inc, rng: TF.invert(x),
    "Rotate": lambda x, level, inc, rng: _affine(x, angle=_signed(level / _MAX_LEVEL * 30.0, rng)),
    # bits kept: 4 -> 0 with the level (increasing) or 0 -> 4
    "Posterize": lambda x, level, inc, rng: TF.posterize(
        x, 4 - int(level / _MAX_LEVEL * 4) if inc else int(level / _MAX_LEVEL * 4)),
    "Solarize": lambda x, level, inc, rng: _solarize(
        x, 256 - int(level / _MAX_LEVEL * 256) if inc else int(level / _MAX_LEVEL * 256)),
    "SolarizeAdd": lambda x, level, inc, rng: _solarize_add(x, int(level / _MAX_LEVEL * 110)),
    "Color": lambda x, level, inc, rng: TF.adjust_saturation(x, _enhance(level, inc, rng)),
    "Contrast": lambda x, level, inc, rng: TF.adjust_contrast(x, _enhance(level, inc, rng)),
    "Brightness": lambda x, level, inc, rng: TF.adjust_brightness(x, _enhance(level, inc, rng)),
    "Sharpness": lambda x, level, inc, rng: TF.adjust_sharpness(x, _enhance(level, inc, rng)),
    "ShearX": lambda x, level, inc, rng: _affine(
        x, shear=(math.degrees(math.atan(_signed(level / _MAX_LEVEL * 0.3, rng))), 0.0)),
    "ShearY": lambda x, level, inc, rng: _affine(
        x, shear=(0.0, math.degrees(math.atan(_signed(level / _MAX_LEVEL * 0.3, rng))))),
    "TranslateXRel": lambda x, level, inc, rng: _affine(
        x, translate=(_signed(level / _MAX_LEVEL * 0.45, rng) * x.shape[-1], 0.0)),
    "TranslateYRel": lambda x, level, inc, rng: _affine(
        x, translate=(0.0, _signed(level / _MAX_LEVEL * 0.45, rng) * x.shape[-2])),
}
OP_NAMES = tuple(_OPS)
_OP_PROBABILITY = 0.5


def apply_op(name: str, x_TCHW: Tensor, level: float, increasing: bool, rng: random.Random) -> Tensor:
    """One RandAugment op (`OP_NAMES`) at `level` in [0, 10] on a uint8 (T, C, H, W) clip; signs come from `rng`."""
    return _OPS[name](x_TCHW, level, increasing, rng)


def rand_augment(x_TCHW: Tensor, policy: RandAugmentPolicy, rng: random.Random) -> Tensor:
    """Apply one RandAugment draw to every frame of a uint8 (T, C, H, W) clip."""
    for name in rng.choices(OP_NAMES, k=policy.num_ops):
        if rng.random() > _OP_PROBABILITY:
            continue
        level = policy.magnitude
        if policy.magnitude_std > 0:
            level = rng.gauss(level, policy.magnitude_std)
        x_TCHW = apply_op(name, x_TCHW, min(_MAX_LEVEL, max(0.0, level)), policy.increasing, rng)
    return x_TCHW


def random_erase(x_CTHW: Tensor, probability: float, rng: random.Random) -> Tensor:
    """With `probability`, one box (2%-33% of the area, aspect 0.3-3.3) at the same place in every frame of a
    normalised float (C, T, H, W) clip (on any device) becomes standard-normal noise (fresh per frame); in place,
    returned."""
    if probability <= 0 or rng.random() > probability:
        return x_CTHW
    C, T, H, W = x_CTHW.shape
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(100):
        area = rng.uniform(0.02, 1 / 3) * H * W
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < W and h < H:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            noise = torch.randn(C, T, h, w, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
            x_CTHW[:, :, top : top + h, left : left + w] = noise.to(x_CTHW)
            break
    return x_CTHW


@dataclass(frozen=True)
class ClipAugment:
    """The extra training augmentation of `data.augment` (None parts are off)."""

    rand_augment: RandAugmentPolicy | None = None
    random_erasing: float = 0.0

    @classmethod
    def from_config(cls, augment_cfg) -> ClipAugment | None:
        """From an AugmentConfig; None when it turns nothing on."""
        policy = parse_rand_augment(augment_cfg.rand_augment) if augment_cfg.rand_augment else None
        if policy is None and augment_cfg.random_erasing == 0:
            return None
        return cls(policy, augment_cfg.random_erasing)
