"""Data-side token masks for masked pretraining (the released mask types; docs/data.md, "Masks").

Masks are boolean *keep* masks over the T*h*w patch grid in frame-major raster order, True = visible
(the CLS token is not included: the model always keeps it). Counts at 8x14x14, ratio 0.8:

    random 314 | tube 320 | tube_row 336 | random_row 336 visible tokens

Every mask of one type and shape keeps the same number of tokens, which the model requires to batch
the visible tokens. The attention mask needs the teacher and is made in the task, not here.
"""

from __future__ import annotations

import numpy as np

DATA_MASK_TYPES = ("random", "tube", "tube_row", "random_row")


def make_keep_mask(
    mask_type: str, ratio: float, num_frames: int, grid_h: int, grid_w: int, rng: np.random.Generator
) -> np.ndarray:
    """One keep mask, bool (num_frames * grid_h * grid_w,), True = visible token."""
    T, h, w = num_frames, grid_h, grid_w
    P = h * w
    masked = np.zeros((T, h, w), dtype=bool)
    if mask_type == "random":
        flat = masked.reshape(-1)
        flat[rng.permutation(T * P)[: int(ratio * T * P)]] = True
    elif mask_type == "tube":
        frame = np.zeros(P, dtype=bool)
        frame[rng.permutation(P)[: int(ratio * P)]] = True
        masked[:] = frame.reshape(h, w)
    elif mask_type == "tube_row":
        for t in range(T):
            masked[t, rng.permutation(h)[: int(ratio * h)], :] = True
    elif mask_type == "random_row":
        rows = masked.reshape(T * h, w)
        rows[rng.permutation(T * h)[: T * int(ratio * h)], :] = True
    else:
        raise ValueError(f"mask type {mask_type!r} is not a data-side mask; choose one of {DATA_MASK_TYPES}")
    return ~masked.reshape(-1)
