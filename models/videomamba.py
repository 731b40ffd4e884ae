"""VideoMamba (Li et al., ECCV 2024), as released: tubelet patch embed, CLS + spatial + temporal position
embeddings, spatial-first token order, Add -> RMSNorm -> BiMamba residual blocks, final norm_f, CLS head.

Legend: B batch, C channels, T frames, H/W pixels, P patches per frame, L tokens (1 + T'*P, CLS first),
D model width, K kept patch tokens. Parameter names match the official checkpoints (docs/model.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.bimamba import BiMamba
from models.ops import rms_norm
from models.registry import register_model


@dataclass
class Features:
    """Output of VideoMamba.forward_features."""

    tokens_BLD: Tensor  # every kept token after norm_f, CLS first
    residuals: dict[int, Tensor] = field(default_factory=dict)  # i -> residual stream entering block i (fp32)

    @property
    def cls_BD(self) -> Tensor:
        return self.tokens_BLD[:, 0]


def visible_index(keep_BL: Tensor, num_kept: int | None = None) -> Tensor:
    """(B, K) positions of the kept tokens, in order, from a (B, P) bool keep mask that keeps the same K in
    every row (a ragged batch cannot be packed into (B, K, D)).

    Without `num_kept`, K is read from the mask: one host sync on a GPU. A caller that knows K (every mask of one
    type keeps the same count, pipeline/tasks/token_masks.py) passes it and costs none: the rows are then checked
    on the host only where that is free (a CPU mask), and on a GPU by an asynchronous device-side assert.
    """
    if num_kept is None or keep_BL.device.type == "cpu":
        counts = keep_BL.sum(dim=1).tolist()  # the one sync (none for a CPU mask)
        if len(set(counts)) > 1 or (num_kept is not None and counts and counts[0] != num_kept):
            raise ValueError(f"every clip must keep the same number of tokens ({num_kept or 'any'}); got {counts}")
        num_kept = counts[0] if counts else 0
    else:
        torch._assert_async((keep_BL.sum(dim=1) == num_kept).all(),
                            f"visible_index: a keep mask row does not keep {num_kept} tokens")
    # A stable sort puts the kept positions first, in their original order.
    order_BP = torch.sort(keep_BL.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return order_BP[:, :num_kept]


def gather_tokens(x_BLD: Tensor, index_BK: Tensor) -> Tensor:
    """CLS + the patch tokens at index_BK (positions among the patches, as VideoMamba.visible_index gives them):
    (..., B, 1 + K, D). x may carry leading dims (e.g. K layers of targets). A gather: no host sync."""
    index_BKD = index_BK.to(x_BLD.device)[..., None].expand(*x_BLD.shape[:-3], *index_BK.shape, x_BLD.shape[-1])
    return torch.cat([x_BLD[..., :1, :], x_BLD[..., 1:, :].gather(-2, index_BKD)], dim=-2)


def as_static_clip(video_BCTHW: Tensor, num_frames: int) -> Tensor:
    """An image batch (T = 1) as static clips of `num_frames` frames (an expanded view, no copy); others as given."""
    if video_BCTHW.dim() == 5 and video_BCTHW.shape[2] == 1 and num_frames > 1:
        return video_BCTHW.expand(-1, -1, num_frames, -1, -1)
    return video_BCTHW


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's branch with probability p, scale survivors by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class RMSNorm(nn.Module):
    """RMSNorm with a weight and no bias (mamba-ssm's); the fused add lives in models.ops.rms_norm, run on
    `backend` (the model's scan_backend: the Triton backend fuses add + norm into one kernel)."""

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def add_norm(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual in fp32)."""
        return rms_norm(x, self.weight, self.eps, residual=residual, prenorm=True, residual_in_fp32=True,
                        backend=self.backend)


class Block(nn.Module):
    """residual += drop_path(previous mixer output); h = norm(residual); return (mixer(h), residual)."""

    def __init__(self, dim: int, drop_path: float, scan_backend: str, eps: float) -> None:
        super().__init__()
        self.mixer = BiMamba(dim, scan_backend=scan_backend)
        self.norm = RMSNorm(dim, eps, scan_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden_BLD: Tensor, residual_BLD: Tensor | None,
                use_checkpoint: bool = False) -> tuple[Tensor, Tensor]:
        if residual_BLD is not None:
            hidden_BLD = self.drop_path(hidden_BLD)
        normed_BLD, residual_BLD = self.norm.add_norm(hidden_BLD, residual_BLD)
        if use_checkpoint:  # recompute only the mixer in backward, as the released code does
            return checkpoint(self.mixer, normed_BLD, use_reentrant=False), residual_BLD
        return self.mixer(normed_BLD), residual_BLD


class PatchEmbed(nn.Module):
    """Conv3d tubelets (tubelet_size x patch x patch) -> (B, D, T', h, w)."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video_BCTHW: Tensor) -> Tensor:
        return self.proj(video_BCTHW)


class VideoMamba(nn.Module):
    """Video classifier / backbone. `forward(video_BCTHW) -> logits`; `forward_features` for pretraining."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 8,
        tubelet_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 24,
        num_classes: int = 400,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fc_drop_rate: float = 0.0,
        norm_epsilon: float = 1e-5,
        use_checkpoint: bool = False,
        checkpoint_num: int = 0,
        scan_backend: str = "auto",
        mixer_init: str = "segm",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames={num_frames} must be a multiple of tubelet_size={tubelet_size}")
        if mixer_init not in ("segm", "mamba"):
            raise ValueError(f"mixer_init must be 'segm' (released code) or 'mamba'; got {mixer_init!r}")
        if not 0 <= checkpoint_num <= depth:
            raise ValueError(f"checkpoint_num={checkpoint_num} must be in [0, depth={depth}]")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.in_chans, self.embed_dim, self.depth = in_chans, embed_dim, depth
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[1] * self.grid[2]
        self.use_checkpoint, self.checkpoint_num = use_checkpoint, checkpoint_num

        # Registration order = official state_dict order: own parameters, patch_embed, head, layers, norm_f.
        self.patch_embed = PatchEmbed(patch_size, tubelet_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, self.grid[0], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head_drop = nn.Dropout(fc_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # Block i drops the output of mixer i-1 with rate dpr[i-1]; norm_f drops the last one at the full rate.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.layers = nn.ModuleList(
            Block(embed_dim, ([0.0] + dpr)[i], scan_backend, norm_epsilon) for i in range(depth))
        self.norm_f = RMSNorm(embed_dim, norm_epsilon, scan_backend)
        init_weights(self, mixer_init)

    def embed(self, video_BCTHW: Tensor) -> Tensor:
        """Patch tokens + position embeddings, spatial-first, CLS first: (B, 1 + T'*P, D)."""
        self._check_video(video_BCTHW)
        x_BDThw = self.patch_embed(video_BCTHW)
        x_BTPD = x_BDThw.flatten(3).permute(0, 2, 3, 1)
        x_BTPD = x_BTPD + self.pos_embed[:, None, 1:] + self.temporal_pos_embedding[:, :, None]
        cls_1LD = self.cls_token + self.pos_embed[:, :1]  # the CLS token gets no temporal embedding
        return torch.cat([cls_1LD.expand(x_BTPD.shape[0], -1, -1), x_BTPD.flatten(1, 2)], dim=1)

    def forward_features(self, video_BCTHW: Tensor, keep_BL: Tensor | None = None,
                         return_residuals: Iterable[int] = ()) -> Features:
        """Run the backbone on all tokens, or on the visible ones (keep_BL True; CLS always kept)."""
        index_BK = None if keep_BL is None else self.visible_index(keep_BL)
        return self.forward_visible(video_BCTHW, index_BK, return_residuals)

    def visible_index(self, keep_BL: Tensor, num_kept: int | None = None) -> Tensor:
        """`visible_index` of a (B, T'*P) keep mask, checked against this model's token grid."""
        patches = self.grid[0] * self.num_patches
        if keep_BL.dtype != torch.bool or keep_BL.dim() != 2 or keep_BL.shape[1] != patches:
            raise ValueError(f"keep_BL must be a bool tensor of shape (B, T'*P) = (B, {patches}); "
                             f"got {keep_BL.dtype} {tuple(keep_BL.shape)}")
        return visible_index(keep_BL, num_kept)

    def forward_visible(self, video_BCTHW: Tensor, index_BK: Tensor | None,
                        return_residuals: Iterable[int] = ()) -> Features:
        """forward_features on CLS + the patch tokens at index_BK ((B, K) from `visible_index`; None: all). No
        host sync and no data-dependent shape, so a CUDA graph can capture it (pipeline/cuda_graph.py)."""
        wanted = set(return_residuals)
        if not wanted <= set(range(self.depth + 1)):
            raise ValueError(f"return_residuals must be layer indices in [0, {self.depth}]; got {sorted(wanted)}")
        x_BLD = self.embed(video_BCTHW)
        if index_BK is not None:
            if index_BK.shape[0] != x_BLD.shape[0]:
                raise ValueError(f"index_BK has {index_BK.shape[0]} rows for a batch of {x_BLD.shape[0]} clips")
            x_BLD = gather_tokens(x_BLD, index_BK)
        hidden_BLD, residual_BLD = self.pos_drop(x_BLD), None
        residuals: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            hidden_BLD, residual_BLD = layer(hidden_BLD, residual_BLD,
                                             use_checkpoint=self.use_checkpoint and i < self.checkpoint_num)
            if i in wanted:
                residuals[i] = residual_BLD
        tokens_BLD, residual_BLD = self.norm_f.add_norm(self.drop_path(hidden_BLD), residual_BLD)
        if self.depth in wanted:
            residuals[self.depth] = residual_BLD
        return Features(tokens_BLD, residuals)

    def forward(self, video_BCTHW: Tensor) -> Tensor:
        return self.head(self.head_drop(self.forward_features(video_BCTHW).cls_BD))

    def _check_video(self, video: Tensor) -> None:
        expected = (self.in_chans, self.num_frames, self.img_size, self.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video must be (B, C, T, H, W) = (B, {', '.join(map(str, expected))}) for this "
                             f"model; got {tuple(video.shape)}. Build the model with matching num_frames/img_size.")


def _segm_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _gpt2_init(m: nn.Module, n_layer: int) -> None:
    """mamba-ssm's _init_weights: zero Linear biases (unless _no_reinit), rescale out_proj by 1/sqrt(depth)."""
    if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
        nn.init.zeros_(m.bias)
    for name, p in m.named_parameters():
        if name == "out_proj.weight":
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_layer)


def init_weights(model: VideoMamba, mixer_init: str) -> None:
    """The released init order (docs/model.md). mixer_init="segm" reproduces the whole-model trunc-normal
    pass that overwrites Mamba's dt init (dt_proj bias -> 0); "mamba" applies it to the head only (as Vim)."""
    (model if mixer_init == "segm" else model.head).apply(_segm_init)
    model.head.apply(_segm_init)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    model.apply(partial(_gpt2_init, n_layer=model.depth))


def _build(arch: dict, overrides: dict) -> VideoMamba:
    allowed = set(inspect.signature(VideoMamba.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown VideoMamba override(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    return VideoMamba(**{**arch, **overrides})


# Video sizes default to the K400 head (400 classes), 8 frames, 224 px: the released video checkpoints.
@register_model
def videomamba_tiny(**overrides) -> VideoMamba:
    return _build(dict(embed_dim=192, depth=24), overrides)


@register_model
def videomamba_small(**overrides) -> VideoMamba:
    return _build(dict(embed_dim=384, depth=24), overrides)


@register_model
def videomamba_middle(**overrides) -> VideoMamba:
    return _build(dict(embed_dim=576, depth=32), overrides)


@register_model
def videomamba_base(**overrides) -> VideoMamba:
    return _build(dict(embed_dim=768, depth=24), overrides)


@register_model
def videomamba_test(**overrides) -> VideoMamba:
    """Tiny CPU model for tests and demos: 4 frames of 32 px, 2x2 patches per frame, 2 blocks of width 32."""
    return _build(dict(embed_dim=32, depth=2, img_size=32, patch_size=16, num_frames=4, num_classes=5), overrides)


@register_model
def videomamba_test_wide(**overrides) -> VideoMamba:
    """videomamba_test at width 48: the CPU student that videomamba_test teaches in the self-distillation tests."""
    return _build(dict(embed_dim=48, depth=2, img_size=32, patch_size=16, num_frames=4, num_classes=5), overrides)
