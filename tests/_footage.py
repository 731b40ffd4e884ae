"""Reference decoding for the footage tests: PyAV decoding every frame in order, turned upright."""

from __future__ import annotations

import io

import av
import numpy as np


def full_decode(data: bytes) -> list[np.ndarray]:
    """Every frame as uint8 RGB, in order, np.rot90 counter-clockwise by its display rotation."""
    with av.open(io.BytesIO(data)) as container:
        return [np.rot90(f.to_ndarray(format="rgb24"), k=round((f.rotation or 0) / 90) % 4)
                for f in container.decode(container.streams.video[0])]  # fmt: skip
