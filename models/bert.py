"""BERT text encoder with cross-attention fusion layers, as UMT and VideoMamba's video-text model use it.

`BertTextEncoder` = `bert` (embeddings + `encoder.layer[0..N-1]`) + `cls` (the masked-LM head), with the
parameter names of Hugging Face's `BertForMaskedLM`, so `bert-base-uncased` weights and the released
multimodal checkpoints (`text_encoder.bert.*`, `text_encoder.cls.*`) load as they are:

- layers `0 .. fusion_layer-1` are the text encoder (self-attention only; UMT's `mode="text"`);
- layers `fusion_layer ..` are the fusion encoder: self-attention, then cross-attention whose keys and
  values come from the vision tokens (width `encoder_width`), then the feed-forward block (`mode="fusion"`).

The embeddings, feed-forward and output blocks and the LM head are `transformers`' own modules; the
attention is written here so that one video's keys and values can serve many texts at once: re-ranking
scores each video against its top-k texts, and the vision-side projections (the bulk of the fusion cost,
1,568 tokens x 576 -> 768 per layer) are then computed once per video instead of once per pair.

Legend: B batch, L text tokens, W text width, S key/value tokens, K key/value width, H heads, d head width.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class BertSpec:
    """The text tower's architecture: BERT's config fields plus where fusion starts and the vision width."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    fusion_layer: int = 9
    """First layer with cross-attention to the vision tokens (UMT: 9 of 12)."""
    encoder_width: int = 576
    """Width of the vision tokens the fusion layers attend to (VideoMamba-M: 576)."""

    def __post_init__(self) -> None:
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ValueError(f"fusion_layer={self.fusion_layer} must be in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}]")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                             f"{self.num_attention_heads}")

    def hf_config(self):
        """The `transformers.BertConfig` of the shared blocks (embeddings, feed-forward, LM head)."""
        from transformers import BertConfig

        fields = asdict(self)
        fields.pop("fusion_layer")
        fields.pop("encoder_width")
        return BertConfig(**fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MultiHeadAttention(nn.Module):
    """BERT's `self` attention block (`query`, `key`, `value`); keys/values of width `kv_width`.

    `forward(x_BLW, kv_BSK, key_valid_BS)`: `kv` may have batch 1 for a batch of B queries (one video shared
    by B texts): its keys and values are then projected once and every query row attends to them.
    """

    def __init__(self, width: int, num_heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, width // num_heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def _heads(self, x_BLW: Tensor) -> Tensor:
        B, L, _ = x_BLW.shape
        return x_BLW.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x_BLW: Tensor, kv_BSK: Tensor, key_valid_BS: Tensor | None = None) -> Tensor:
        B, L, W = x_BLW.shape
        dropout = self.dropout if self.training else 0.0
        q_BHLd = self._heads(self.query(x_BLW))
        k_BHSd, v_BHSd = self._heads(self.key(kv_BSK)), self._heads(self.value(kv_BSK))
        if kv_BSK.shape[0] == 1 and B > 1:
            if key_valid_BS is not None:
                raise ValueError("a key mask is not supported when one key/value sequence serves the whole batch")
            # All B queries attend to the same keys: fold them into one long query sequence.
            q_1HNd = q_BHLd.transpose(0, 1).reshape(1, self.num_heads, B * L, self.head_dim)
            out_1HNd = F.scaled_dot_product_attention(q_1HNd, k_BHSd, v_BHSd, dropout_p=dropout)
            out_BHLd = out_1HNd.view(self.num_heads, B, L, self.head_dim).transpose(0, 1)
        else:
            mask = None if key_valid_BS is None else key_valid_BS[:, None, None, :].bool()
            out_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask, dropout_p=dropout)
        return out_BHLd.transpose(1, 2).reshape(B, L, W)


class AttentionBlock(nn.Module):
    """`self` (attention) + `output` (dense, dropout, residual, LayerNorm): BERT's `BertAttention`."""

    def __init__(self, spec: BertSpec, hf_config, kv_width: int) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertSelfOutput

        self.self = MultiHeadAttention(spec.hidden_size, spec.num_attention_heads, kv_width,
                                       spec.attention_probs_dropout_prob)
        self.output = BertSelfOutput(hf_config)

    def forward(self, x_BLW: Tensor, kv_BSK: Tensor, key_valid_BS: Tensor | None) -> Tensor:
        return self.output(self.self(x_BLW, kv_BSK, key_valid_BS), x_BLW)


class BertLayer(nn.Module):
    """Self-attention, cross-attention to the vision tokens (fusion layers only), feed-forward."""

    def __init__(self, spec: BertSpec, hf_config, cross_attention: bool) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        self.attention = AttentionBlock(spec, hf_config, spec.hidden_size)
        if cross_attention:
            self.crossattention = AttentionBlock(spec, hf_config, spec.encoder_width)
        self.intermediate = BertIntermediate(hf_config)
        self.output = BertOutput(hf_config)

    @property
    def is_fusion(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(self, x_BLW: Tensor, text_valid_BL: Tensor, vision_BSK: Tensor | None = None) -> Tensor:
        x_BLW = self.attention(x_BLW, x_BLW, text_valid_BL)
        if self.is_fusion:
            if vision_BSK is None:
                raise ValueError("a fusion layer needs the vision tokens")
            x_BLW = self.crossattention(x_BLW, vision_BSK, None)
        return self.output(self.intermediate(x_BLW), x_BLW)


class _Layers(nn.Module):
    """Holds `layer` so that keys read `encoder.layer.{i}`, as in BERT."""

    def __init__(self, spec: BertSpec, hf_config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(spec, hf_config, i >= spec.fusion_layer)
                                   for i in range(spec.num_hidden_layers))


class BertTower(nn.Module):
    """`embeddings` + `encoder.layer[...]` (no pooler, as UMT's `BertForMaskedLM`)."""

    def __init__(self, spec: BertSpec, hf_config) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.embeddings = BertEmbeddings(hf_config)
        # transformers keeps position_ids out of the state dict; the released checkpoints (UMT's copy of an
        # older BertEmbeddings) carry it, so it is registered as a persistent buffer to keep their exact layout.
        position_ids = self.embeddings.position_ids
        del self.embeddings.position_ids
        self.embeddings.register_buffer("position_ids", position_ids)
        self.encoder = _Layers(spec, hf_config)


class BertTextEncoder(nn.Module):
    """UMT's text encoder: `encode_text` (text layers) and `fuse` (fusion layers), plus the MLM head `cls`."""

    def __init__(self, spec: BertSpec) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        self.spec = spec
        hf_config = spec.hf_config()
        self.bert = BertTower(spec, hf_config)
        self.cls = BertOnlyMLMHead(hf_config)
        # The LM decoder shares the word embeddings and the prediction bias, as BertForMaskedLM ties them.
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias
        self.apply(_bert_init)

    @property
    def width(self) -> int:
        return self.spec.hidden_size

    def _layers(self, start: int, stop: int) -> list[BertLayer]:
        return list(self.bert.encoder.layer)[start:stop]

    def encode_text(self, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
        """Token features after the text-only layers (B, L, W); the CLS feature is row 0."""
        x_BLW = self.bert.embeddings(input_ids=input_ids_BL)
        for layer in self._layers(0, self.spec.fusion_layer):
            x_BLW = layer(x_BLW, attention_mask_BL)
        return x_BLW

    def fuse(self, text_BLW: Tensor, attention_mask_BL: Tensor, vision_BSK: Tensor) -> Tensor:
        """The fusion layers over text features from `encode_text`, attending to `vision_BSK` (every vision
        token visible). `vision_BSK` of batch 1 serves every text of the batch (its projections computed once)."""
        x_BLW = text_BLW
        for layer in self._layers(self.spec.fusion_layer, self.spec.num_hidden_layers):
            x_BLW = layer(x_BLW, attention_mask_BL, vision_BSK)
        return x_BLW

    def mlm_logits(self, fused_BLW: Tensor) -> Tensor:
        """Vocabulary logits (B, L, vocab) of fused token features."""
        return self.cls(fused_BLW)


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, zero biases, unit LayerNorm): what the fusion layers get when the
    rest of the tower is loaded from bert-base-uncased, and every weight in a from-scratch build."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if hasattr(module, "predictions"):
        nn.init.zeros_(module.predictions.bias)


def load_bert_tokenizer(source: str | os.PathLike, vocab_size: int | None = None):
    """A BERT WordPiece tokenizer from a local folder (vocab.txt / tokenizer.json) or a hub name read from
    the local Hugging Face cache (`bert-base-uncased`; HF_HUB_OFFLINE=1 on machines without internet).

    `vocab_size`: the text tower's vocabulary; a tokenizer of another size is refused (transformers quietly
    builds a 5-token tokenizer when a hub name is not in the cache, which would make every caption [UNK]).
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(source))
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ValueError(
            f"the tokenizer from {str(source)!r} has {len(tokenizer)} tokens but the text tower has {vocab_size}: "
            "its files were not found (a hub name that is not in the local Hugging Face cache) or belong to another "
            "model. Point it at a folder holding the model's vocab.txt, or download the model once "
            "(`huggingface-cli download bert-base-uncased`)."
        )
    return tokenizer


def bert_spec_from_pretrained(source: str | os.PathLike, **overrides: Any) -> BertSpec:
    """`BertSpec` from a local folder's config.json or a cached hub model's (`bert-base-uncased`), with overrides."""
    from transformers import BertConfig

    try:
        config = BertConfig.from_pretrained(str(source))
    except OSError as err:
        raise ValueError(
            f"cannot read a BERT config.json from {str(source)!r} ({err}); pass a folder holding it, or download "
            "the model once (`huggingface-cli download bert-base-uncased`)"
        ) from err
    fields = {k: getattr(config, k) for k in BertSpec.__dataclass_fields__ if hasattr(config, k)}
    return BertSpec(**{**fields, **overrides})


def load_pretrained_bert(encoder: BertTextEncoder, source: str | os.PathLike) -> list[str]:
    """Load `BertForMaskedLM` weights (e.g. `bert-base-uncased`) into `encoder`; returns the keys left at their
    init: the fusion layers' cross-attention, as UMT starts them. Any other gap or shape mismatch raises."""
    from transformers import BertForMaskedLM

    reference = BertForMaskedLM.from_pretrained(str(source))
    result = encoder.load_state_dict(reference.state_dict(), strict=False)
    cross = sorted(k for k in result.missing_keys if ".crossattention." in k)
    # transformers keeps position_ids out of its state dict; ours is the same arange.
    missing = [k for k in result.missing_keys if k not in cross and not k.endswith("embeddings.position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: not a BERT masked-LM checkpoint of this shape; missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    return cross


@torch.no_grad()
def tokenize(tokenizer, texts: list[str], max_tokens: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, max_tokens): [CLS] ... [SEP], truncated and padded to `max_tokens`
    as the released evaluation does (`padding="max_length"`)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"tokenize expects a list of strings, got {type(texts).__name__}")
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    return out["input_ids"].to(device), out["attention_mask"].to(device)
