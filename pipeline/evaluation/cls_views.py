"""The test views of a video, as the released VideoMamba test sampler makes them: temporal clips x spatial crops.

Temporal: the video's frames are cut into T equal segments (segment length s = (n - 1) / T); clip c of C takes in
every segment the frame round(s * i) + floor(s / (C + 1) * (c + 1)), i.e. the clips sit at evenly spaced offsets
inside the segments (`pipeline.data.decode.sparse_clip_indices`; one clip is the validation view, data sampling
mode `sparse_middle`, not the zero-shot `middle` rule). All clips' frames are decoded in one pass.
Spatial: each clip's short side is resized to the view size and `num_crops` squares are cut evenly along the long
side (three: start, centre, end). Views are ordered clip-major: view v = clip v // num_crops, crop v % num_crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.data.decode import decode_at, sparse_clip_indices
from pipeline.data.transforms import spatial_crops


@dataclass(frozen=True)
class ViewSpec:
    """Everything that decides a video's test views (`load` is what `evaluation.features.map_clips` calls)."""

    num_frames: int
    img_size: int
    num_clips: int
    num_crops: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def load(self, source: str | bytes) -> Tensor:
        """Normalised float views (V, C, T, S, S) of one video."""

        def choose(num_video_frames: int) -> list[int]:
            return [i for c in range(self.num_clips)
                    for i in sparse_clip_indices(num_video_frames, self.num_frames, self.num_clips, c)]  # fmt: skip

        frames_NHW3 = decode_at(source, choose)
        views = []
        for c in range(self.num_clips):
            clip_THW3 = frames_NHW3[c * self.num_frames : (c + 1) * self.num_frames]
            views += spatial_crops(clip_THW3, self.img_size, self.num_crops, list(self.mean), list(self.std))
        return torch.stack(views)
