"""Test helpers for the BERT-tower video-text model: a tiny tokenizer folder, a tiny random released-layout file.

Nothing downloads: the tokenizer folder holds a generated vocab.txt and a BERT config.json; the checkpoint is a
tiny `UMTVideoText` with every weight perturbed (so no LayerNorm is the identity and no bias is zero), written
in the released layout (`{"model": state_dict}`, bf16) by `models.umt_checkpoint.save_released_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.bert import BertSpec
from models.umt import build_umt_model
from models.umt_checkpoint import save_released_checkpoint

WORDS = ["a", "the", "scene", "video", "clip", "moves", "left", "right", "red", "green", "blue", "white", "yellow",
         "black", "square", "circle", "dog", "man", "runs", "park", "##s", "##ing"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_SIZE = 64
# BERT-shaped but tiny: 4 layers of width 32 (2 heads), cross-attention from layer 2 to the 32-wide video tokens.
TINY_BERT = BertSpec(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=40, fusion_layer=2, encoder_width=32)
TINY_VISION = ("videomamba_test", {"num_frames": 4, "scan_backend": "ref"})  # 4 frames x 2x2 patches, width 32


def write_tokenizer_dir(path: Path) -> Path:
    """vocab.txt (specials, WORDS, then unused fillers up to VOCAB_SIZE) + config.json of TINY_BERT."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = SPECIALS + WORDS
    tokens += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(tokens))]
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    config = TINY_BERT.hf_config().to_dict()
    (path / "config.json").write_text(json.dumps(config))
    return path


def tiny_umt_model(seed: int = 0, embed_dim: int = 16):
    """A tiny UMTVideoText with every floating weight perturbed away from its init (seeded)."""
    torch.manual_seed(seed)
    model = build_umt_model(TINY_VISION[0], TINY_VISION[1], TINY_BERT, embed_dim=embed_dim, clip_output_dim=24)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "temp":
                continue
            scale = 0.2 if param.dim() == 1 else 0.05
            param.add_(scale * torch.randn_like(param))
    return model


def write_released_checkpoint(path: Path, seed: int = 0) -> Path:
    save_released_checkpoint(tiny_umt_model(seed), path)
    return path
