"""Text encoder for video-text pretraining: an open_clip CLIP text transformer and its tokenizer.

`create_text_encoder(name, pretrained=None, **overrides)` builds the text tower of the open_clip model
`name` (e.g. "ViT-B-16"): with `pretrained` a tag ("openai") or a file, the CLIP weights' text half is
loaded; with None it is randomly initialised. `overrides` replace fields of the model's `text_cfg`
(width, layers, heads, context_length, ...), which is how tests build a tiny tower.

The tower returns its own width (CLIP's `text_projection` is dropped: the video-text model learns its
own `text_proj`, as UMT learns one over BERT). A shorter `context_length` than the checkpoint's keeps
the first positional embeddings: with CLIP's causal mask a token never sees later positions, so the
truncated tower computes exactly what the full one computes on texts that fit.

Legend: B batch, L text tokens (context length), D text width.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

# Fields of open_clip's CLIPTextCfg that change parameter shapes; pretrained weights cannot have them overridden.
_SHAPE_FIELDS = ("width", "layers", "heads", "mlp_ratio", "vocab_size")


class TextEncoder(nn.Module):
    """open_clip text transformer + tokenizer; `forward(tokens_BL) -> (pooled_BD, tokens_BLD, valid_BL)`."""

    def __init__(self, tower: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        if tower.pool_type != "argmax":
            raise ValueError(f"text tower pools with {tower.pool_type!r}; only CLIP's EOT ('argmax') pooling is "
                             "supported")
        self.tower = tower
        self.tokenizer = tokenizer

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def context_length(self) -> int:
        return self.tower.context_length

    def tokenize(self, texts: list[str], device: torch.device | str = "cpu", max_tokens: int | None = None) -> Tensor:
        """(B, L) token ids, zero-padded and truncated to the context length (EOT kept last); `max_tokens` truncates
        each text to fewer tokens (EOT kept last), still padded to the context length. With the causal mask and
        EOT pooling the padding changes nothing."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"tokenize expects a list of strings, got {type(texts).__name__}")
        length = self.context_length if max_tokens is None else min(max_tokens, self.context_length)
        tokens_BL = self.tokenizer(list(texts), context_length=length)
        tokens_BL = torch.nn.functional.pad(tokens_BL, (0, self.context_length - length))
        if torch.device(device).type == "cuda":
            # A blocking copy waits for the GPU (a host sync), and so may one from pageable memory; from pinned
            # memory (torch's caching host allocator) it is a queued DMA.
            tokens_BL = tokens_BL.pin_memory()
        return tokens_BL.to(device, non_blocking=True)

    def forward(self, tokens_BL: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pooled text feature (the EOT token after ln_final), all token features, and the non-pad mask."""
        pooled_BD, tokens_BLD = self.tower(tokens_BL)
        return pooled_BD, tokens_BLD, self.valid_mask(tokens_BL)

    @staticmethod
    def eot_index(tokens_BL: Tensor) -> Tensor:
        """Position of each text's end-of-text token: CLIP's EOT id is the largest in the vocabulary."""
        return tokens_BL.argmax(dim=-1)

    def valid_mask(self, tokens_BL: Tensor) -> Tensor:
        """True up to and including EOT (padding id 0 is also the id of '!', so it cannot tell pads apart)."""
        positions_BL = torch.arange(tokens_BL.shape[1], device=tokens_BL.device).expand_as(tokens_BL)
        return positions_BL <= self.eot_index(tokens_BL)[:, None]


def text_config(name: str, **overrides: Any) -> dict[str, Any]:
    """open_clip's `text_cfg` of model `name` with `overrides` applied (a plain dict)."""
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(
            f"text encoder: unknown open_clip model {name!r}; choose one of open_clip.list_models(), e.g. 'ViT-B-16'"
        )
    cfg = copy.deepcopy(model_cfg["text_cfg"])
    if "hf_model_name" in cfg:
        raise ValueError(
            f"text encoder: {name!r} uses a Hugging Face text tower; only open_clip's own text transformer "
            "(bundled BPE tokenizer, works offline) is supported, e.g. 'ViT-B-16'"
        )
    from open_clip.model import CLIPTextCfg

    allowed = set(CLIPTextCfg.__dataclass_fields__)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"text encoder: unknown text_cfg field(s) {unknown}; allowed: {sorted(allowed)}")
    cfg.update(overrides)
    return cfg


def create_text_encoder(name: str = "ViT-B-16", pretrained: str | None = None, **overrides: Any) -> TextEncoder:
    """Build the text tower of open_clip model `name`; load CLIP weights from a tag or file if `pretrained`.

    Tags download through the Hugging Face hub cache (set HF_HUB_OFFLINE=1 on machines without internet:
    a cached file is then used, a missing one fails at once instead of after a minute of retries).
    """
    import open_clip
    from open_clip.model import _build_text_tower

    if pretrained is not None:
        fixed = sorted(k for k in overrides if k in _SHAPE_FIELDS)
        if fixed:
            raise ValueError(
                f"text encoder: overrides {fixed} change parameter shapes and cannot be combined with "
                f"pretrained={pretrained!r}; drop them or set pretrained to null"
            )
    cfg = text_config(name, **overrides)
    # The joint-space projection is learned by the video-text model (text_proj), so the tower has none.
    cfg.update(proj_type="none", output_tokens=True)
    quick_gelu = _uses_quick_gelu(name, pretrained)
    tower = _build_text_tower(embed_dim=0, text_cfg=cfg, quick_gelu=quick_gelu)
    if pretrained is not None:
        clip = open_clip.create_model(name, pretrained=pretrained, force_custom_text=True,
                                      force_quick_gelu=quick_gelu)
        state = {k: v for k, v in clip.text.state_dict().items() if not k.startswith("text_projection")}
        state["positional_embedding"] = state["positional_embedding"][: tower.num_pos]
        tower.load_state_dict(state, strict=True)
        del clip
    tokenizer = open_clip.get_tokenizer(name)
    return TextEncoder(tower, tokenizer)


def _uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    # OpenAI's weights were trained with QuickGELU; open_clip's plain "ViT-B-16" config says GELU and
    # only warns on the mismatch, so follow the tag's own setting.
    import open_clip

    model_cfg = open_clip.get_model_config(name) or {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    return bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
