"""FLOPs of one training step per sample, for TFLOP/s and MFU (`Task.flops_per_sample`, logged by the engine).

Convention (the usual one for MFU): 2 FLOPs per multiply-add. A module that trains costs 3x its forward (the
backward computes the gradients of its inputs and of its weights); a frozen one (a teacher, a frozen block)
costs its forward only. Every function here returns a module's FLOPs *for one sample of a step*, by that rule,
from the module's own shapes. Counted: matmuls and convolutions (the tensor-core work the peak refers to), and the
selective scan. Not counted: norms, activations, softmax, residual adds and the losses (elementwise, well
under 1% of a step at paper scale).

VideoMamba, per token through a block (D width, E = 2D inner width, R dt rank, N state size, k conv width), in
each of the two directions: the depthwise conv1d over the padded length (L + k - 1 outputs, then cut to L),
x_proj (E -> R + 2N), dt_proj (R -> E) and the scan, which mamba-ssm counts as 9·E·N per token plus E for the D
skip and E for the z gate (state-spaces/mamba#110); once per block: in_proj (D -> 2E) and out_proj (E -> D).
The patch embedding runs over every patch, masked or not; the blocks over CLS + the visible tokens. The paper's
GFLOPs count less: fvcore cannot see inside the fused mixer, so they hold only the patch embedding, in_proj,
out_proj and the head (docs/model.md, "FLOPs").

Transformers (the CLIP teacher, the text towers, the matching heads): qkv, attention (QK^T and AV: 4·L·L'·W),
the output projection and the MLP; BERT's fusion layers add a cross-attention whose keys and values are
projected from the vision tokens, and its LM head a transform and the vocabulary projection per position.
"""

from __future__ import annotations

from torch import nn

TRAIN_FACTOR = 3.0
"""Forward + backward of a trained module, in units of its forward."""


def factor(module: nn.Module) -> float:
    """`TRAIN_FACTOR` if any of the module's parameters trains, else 1 (forward only)."""
    return TRAIN_FACTOR if any(p.requires_grad for p in module.parameters()) else 1.0


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    """Forward FLOPs of a (d_in -> d_out) matmul over `tokens` rows."""
    return 2.0 * tokens * d_in * d_out


def attention_flops(queries: int, keys: int, width: int) -> float:
    """Forward FLOPs of softmax(Q K^T) V over all heads: the two (queries x keys x width) products."""
    return 4.0 * queries * keys * width


def head_flops(head: nn.Linear, tokens: int) -> float:
    """A linear layer over `tokens` rows."""
    return factor(head) * linear_flops(tokens, head.in_features, head.out_features)


# ----------------------------------------------------------------------------- VideoMamba


def _mixer_forward(mixer: nn.Module, tokens: int) -> float:
    """Forward FLOPs of a bidirectional Mamba mixer (models/bimamba.py) over `tokens` tokens."""
    D, E, R, N = mixer.d_model, mixer.d_inner, mixer.dt_rank, mixer.d_state
    k = mixer.conv1d.kernel_size[0]
    direction = (2.0 * (tokens + k - 1) * E * k  # depthwise conv1d: k multiply-adds per output and channel
                 + linear_flops(tokens, E, R + 2 * N) + linear_flops(tokens, R, E)  # x_proj, dt_proj
                 + 9.0 * tokens * E * N + 2.0 * tokens * E)  # selective scan, D skip, z gate
    return linear_flops(tokens, D, 2 * E) + 2 * direction + linear_flops(tokens, E, D)


def videomamba_flops(model: nn.Module, tokens: int) -> float:
    """A VideoMamba (models/videomamba.py) on one clip with `tokens` tokens in its blocks (CLS + visible patches)."""
    conv = model.patch_embed.proj
    patches = model.grid[0] * model.num_patches
    patch_embed = linear_flops(patches, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                               * conv.kernel_size[2], conv.out_channels)
    blocks = sum(factor(block) * _mixer_forward(block.mixer, tokens) for block in model.layers)
    head = head_flops(model.head, 1) if isinstance(model.head, nn.Linear) else 0.0  # on CLS only
    return factor(model.patch_embed) * patch_embed + blocks + head


# ----------------------------------------------------------------------------- transformers


def _resblock_forward(block: nn.Module, tokens: int) -> float:
    """Forward FLOPs of an open_clip ResidualAttentionBlock (self-attention + MLP) over `tokens` tokens."""
    width, hidden = block.attn.embed_dim, block.mlp.c_fc.out_features
    return (linear_flops(tokens, width, 3 * width) + attention_flops(tokens, tokens, width)
            + linear_flops(tokens, width, width) + 2 * linear_flops(tokens, width, hidden))


def _transformer_flops(resblocks: nn.ModuleList, tokens: int) -> float:
    return sum(factor(block) * _resblock_forward(block, tokens) for block in resblocks)


def clip_vision_flops(teacher: nn.Module, frames: int) -> float:
    """A CLIP teacher (`models.teachers.CLIPTeacher`) on `frames` frames: patch embedding, blocks, and `proj`
    of each returned layer's tokens (the teacher runs every block: the last one gives the CLS attention)."""
    visual = teacher.visual
    conv = visual.conv1
    patches = teacher.num_patches
    tokens = 1 + patches
    patch_embed = linear_flops(patches, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
                               conv.out_channels)
    proj = len(teacher.return_layers) * linear_flops(tokens, *visual.proj.shape)
    per_frame = factor(visual) * (patch_embed + proj) + _transformer_flops(visual.transformer.resblocks, tokens)
    return frames * per_frame


def text_tower_flops(tower: nn.Module, tokens: int) -> float:
    """An open_clip text transformer (`models.text.TextEncoder.tower`, no projection of its own) over `tokens`, its
    padded context length."""
    return _transformer_flops(tower.transformer.resblocks, tokens)


def _decoder_layer_forward(layer: nn.TransformerDecoderLayer, queries: int, memory: int) -> float:
    """Forward FLOPs of a decoder layer: self-attention over the queries, cross-attention to the memory, MLP."""
    width, hidden = layer.self_attn.embed_dim, layer.linear1.out_features
    self_attention = (linear_flops(queries, width, 3 * width) + attention_flops(queries, queries, width)
                      + linear_flops(queries, width, width))
    cross_attention = (linear_flops(queries, width, width) + linear_flops(memory, width, 2 * width)
                       + attention_flops(queries, memory, width) + linear_flops(queries, width, width))
    return self_attention + cross_attention + 2 * linear_flops(queries, width, hidden)


def matching_head_flops(head: nn.Module, text_tokens: int, video_tokens: int) -> float:
    """The video-text matching head (`models.video_text.MatchingHead`) on one (video, text) pair."""
    blocks = sum(factor(layer) * _decoder_layer_forward(layer, text_tokens, video_tokens) for layer in head.blocks)
    return head_flops(head.video_in, video_tokens) + blocks + head_flops(head.classifier, 1)


# ----------------------------------------------------------------------------- BERT tower (models/bert.py)


def _bert_layer_forward(layer: nn.Module, text_tokens: int, vision_tokens: int) -> float:
    """Forward FLOPs of a `models.bert.BertLayer`: self-attention, the fusion layers' cross-attention to the
    vision tokens (keys and values projected from the vision width), the feed-forward block."""
    width, hidden = layer.attention.self.query.in_features, layer.intermediate.dense.out_features
    flops = (linear_flops(text_tokens, width, 3 * width) + attention_flops(text_tokens, text_tokens, width)
             + linear_flops(text_tokens, width, width) + 2 * linear_flops(text_tokens, width, hidden))
    if layer.is_fusion:
        kv_width = layer.crossattention.self.key.in_features
        flops += (linear_flops(text_tokens, width, width) + linear_flops(vision_tokens, kv_width, 2 * width)
                  + attention_flops(text_tokens, vision_tokens, width) + linear_flops(text_tokens, width, width))
    return flops


def bert_text_flops(encoder: nn.Module, text_tokens: int) -> float:
    """The text layers (`BertTextEncoder.encode_text`, layers before `fusion_layer`) over `text_tokens`."""
    layers = list(encoder.bert.encoder.layer)[:encoder.spec.fusion_layer]
    return sum(factor(layer) * _bert_layer_forward(layer, text_tokens, 0) for layer in layers)


def bert_fusion_flops(encoder: nn.Module, text_tokens: int, vision_tokens: int) -> float:
    """The fusion layers (`BertTextEncoder.fuse`) on one (text, video) pair."""
    layers = list(encoder.bert.encoder.layer)[encoder.spec.fusion_layer:]
    return sum(factor(layer) * _bert_layer_forward(layer, text_tokens, vision_tokens) for layer in layers)


def mlm_head_flops(encoder: nn.Module, text_tokens: int) -> float:
    """BERT's LM head over `text_tokens` positions: the transform (W -> W) and the tied decoder (W -> vocabulary)."""
    transform, decoder = encoder.cls.predictions.transform.dense, encoder.cls.predictions.decoder
    return factor(encoder.cls) * (linear_flops(text_tokens, transform.in_features, transform.out_features)
                                  + linear_flops(text_tokens, decoder.in_features, decoder.out_features))
