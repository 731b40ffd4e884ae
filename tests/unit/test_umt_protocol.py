"""The released zero-shot protocol: its pieces against hand-computed cases, and a released-layout checkpoint
evaluated end to end (`jobs/eval_retrieval.py`, real mp4s) against an independent reference of the released
scoring written here from the released code's math (`tasks/retrieval_utils.py::evaluation` and `itm_eval`,
`xbert.py`'s BERT layers, `PretrainVideoMamba`'s pooling), at fp32 within 1e-5.

The reference shares only the VideoMamba backbone with the code under test (its numerics have their own
tests); pooling, projections, the BERT text and fusion layers, the tokenizer (transformers' pure-Python
`BertTokenizerLegacy`), caption cleaning, top-k and the score-matrix fill are its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.umt import frame_mean_similarity
from pipeline.data.captions import clean_caption
from pipeline.data.decode import middle_frame_indices
from pipeline.data.encode import encode_h264
from pipeline.evaluation.annotations import load_annotations
from pipeline.evaluation.config import load_eval_config
from pipeline.evaluation.features import ClipSpec
from pipeline.evaluation.metrics import t2v_ranks, v2t_ranks
from pipeline.evaluation.run import evaluate_retrieval
from pipeline.evaluation.scoring import Scores, candidates
from tests._umt import TINY_BERT, write_released_checkpoint, write_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
K_TEST, MAX_TOKENS, ITM_BATCH = 10, 12, 3


# ---------------------------------------------------------------------------------------------- protocol pieces


@pytest.mark.parametrize(("num_video_frames", "expected"), [
    (80, [4, 14, 24, 34, 44, 54, 64, 74]),   # bounds 0, 10, ..., 80
    (100, [5, 18, 30, 43, 55, 68, 80, 93]),  # bounds int(linspace(0, 100, 9)) = 0, 12, 25, 37, 50, 62, 75, 87, 100
    (9, [0, 1, 2, 3, 4, 5, 6, 7]),           # bounds 0, 1, 2, 3, 4, 5, 6, 7, 9: the last segment is [7, 9)
    (3, [0, 1, 2, 2, 2, 2, 2, 2]),           # fewer frames than asked: each once, then the last repeated
    (1, [0] * 8),
])
def test_middle_sampling_is_the_released_rule(num_video_frames, expected):
    assert middle_frame_indices(num_video_frames, 8) == expected


def test_caption_cleaning_is_the_released_rule():
    assert clean_caption("A man's dog-walking, (quickly)!  Near  the park/lake...") == \
        "a mans dog walking quickly near the park lake"
    assert clean_caption("<person> opens a door;\n") == "person opens a door"
    assert clean_caption('"Hi" #1: ~ok? *yes*') == "hi 1 ok yes"
    assert clean_caption("a\tb") == "a\tb"  # a single whitespace character is kept, as released
    assert clean_caption("one two three four", max_words=2) == "one two"


def test_paragraphs_are_joined_then_cleaned(tmp_path):
    path = tmp_path / "anno.json"
    path.write_text(json.dumps([{"video": "a.mp4", "caption": ["First clip.", "Second-clip!"]},
                                {"video": "b.mp4", "caption": "Just ONE"}]))
    assert load_annotations(path, paragraph=True, clean=True).texts == ["first clip second clip", "just one"]
    assert load_annotations(path, paragraph=False, clean=True).texts == ["first clip", "second clip", "just one"]
    assert load_annotations(path, paragraph=False, clean=False).texts == ["First clip.", "Second-clip!", "Just ONE"]


def test_frame_mean_similarity_by_hand():
    text_TE = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    video_VFE = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [3.0, 0.0]]])  # frames: (x, y), (x, x)
    # cosines per frame: text x -> video 0 (1, 0), video 1 (1, 1); text y -> video 0 (0, 1), video 1 (0, 0).
    torch.testing.assert_close(frame_mean_similarity(text_TE, video_VFE), torch.tensor([[0.5, 1.0], [0.5, 0.0]]))


def test_rerank_candidates_and_fill_by_hand():
    sim_TV = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.7, 0.6, 0.4]])
    t2v, v2t, pairs_VT = candidates(sim_TV, sim_TV, k=2)
    # Each text's top-2 videos (rows) and each video's top-2 texts (columns).
    assert t2v.tolist() == [[True, False, True], [False, True, True], [True, True, False]]
    assert v2t.tolist() == [[True, False, True], [False, True, False], [True, True, True]]
    assert pairs_VT.T.tolist() == [[True, False, True], [False, True, True], [True, True, True]]  # the union
    vtm_TV = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    scores = Scores(sim_TV, sim_TV, features_hit=False, vtm_TV=vtm_TV, t2v_candidates_TV=t2v, v2t_candidates_TV=v2t)
    released_t2v, released_v2t = scores.released_rerank()
    assert released_t2v.tolist() == [[1, -100, 3], [-100, 5, 6], [7, 8, -100]]
    assert released_v2t.tolist() == [[1, -100, 3], [-100, 5, -100], [7, 8, 9]]
    ranking_t2v, ranking_v2t = scores.ranking()
    # Text 0: v2 (3) > v0 (1) > v1 (not a candidate); text 1: v2 (6) > v1 (5) > v0; text 2: v1 (8) > v0 (7) > v2.
    assert t2v_ranks(ranking_t2v, [0, 1, 2]).tolist() == [2, 2, 3]
    # Video 0: t2 (7) > t0 (1) > t1 (not a candidate); video 1: t2 (8) > t1 (5) > t0; video 2: t2 (9) > t1 > t0.
    assert v2t_ranks(ranking_v2t, [[0], [1], [2]]).tolist() == [2, 2, 1]


# ------------------------------------------------------------------------------ the reference released scoring


def _released_pre_text(text: str) -> str:
    """dataset/utils.py::pre_text (no max_l)."""
    text = re.sub(r"([,.'!?\"()*#:;~])", "", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text)
    return text.rstrip("\n").strip(" ")


class ReleasedReference:
    """The released evaluation's math on a released-layout state dict (names as in the file)."""

    def __init__(self, state: dict[str, torch.Tensor], heads: int) -> None:
        self.sd = {k: v.float() for k, v in state.items()}
        self.heads = heads
        self.fusion = TINY_BERT.fusion_layer
        self.layers = TINY_BERT.num_hidden_layers

    def _ln(self, x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], self.sd[prefix + ".weight"], self.sd[prefix + ".bias"], eps)

    def _linear(self, x, prefix):
        return F.linear(x, self.sd[prefix + ".weight"], self.sd[prefix + ".bias"])

    def _attention(self, x, kv, prefix, additive_mask):
        """xbert BertAttention: scores / sqrt(d) + mask, softmax, context, dense, residual LayerNorm."""
        B, L, W = x.shape
        d = W // self.heads

        def split(t):
            return t.view(t.shape[0], t.shape[1], self.heads, d).permute(0, 2, 1, 3)

        q, k, v = (split(self._linear(src, f"{prefix}.self.{name}")) for src, name in
                   ((x, "query"), (kv, "key"), (kv, "value")))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if additive_mask is not None:
            scores = scores + additive_mask
        context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, L, W)
        return self._ln(self._linear(context, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm", 1e-12)

    def _layer(self, i, x, additive_mask, vision=None):
        prefix = f"text_encoder.bert.encoder.layer.{i}"
        x = self._attention(x, x, f"{prefix}.attention", additive_mask)
        if vision is not None:  # an all-ones encoder mask: the inverted mask adds 0
            x = self._attention(x, vision, f"{prefix}.crossattention", None)
        hidden = F.gelu(self._linear(x, f"{prefix}.intermediate.dense"))
        return self._ln(self._linear(hidden, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm", 1e-12)

    @staticmethod
    def _additive(mask_BL):
        return (1.0 - mask_BL[:, None, None, :].float()) * -10000.0

    def text(self, input_ids, mask):
        """mode="text": embeddings then layers [0, fusion_layer)."""
        e = "text_encoder.bert.embeddings"
        x = (self.sd[f"{e}.word_embeddings.weight"][input_ids] + self.sd[f"{e}.token_type_embeddings.weight"][0]
             + self.sd[f"{e}.position_embeddings.weight"][: input_ids.shape[1]])
        x = self._ln(x, f"{e}.LayerNorm", 1e-12)
        for i in range(self.fusion):
            x = self._layer(i, x, self._additive(mask))
        return x

    def fusion_cls(self, text_feats, mask, vision):
        """mode="fusion" with encoder_embeds: layers [fusion_layer, N) over text features, output [CLS]."""
        x = text_feats
        for i in range(self.fusion, self.layers):
            x = self._layer(i, x, self._additive(mask), vision)
        return x[:, 0]

    def itm(self, text_feats, mask, vision):
        return self._linear(self.fusion_cls(text_feats, mask, vision), "itm_head")[:, 1]

    def vision(self, tokens_BLD):
        """PretrainVideoMamba.forward (keep_temporal, cls+avg): patch tokens and per-frame pool_norm -> vision_proj."""
        B, _, D = tokens_BLD.shape
        cls, patches = tokens_BLD[:, :1], tokens_BLD[:, 1:]
        pooled = self._ln(cls + patches.view(B, 4, -1, D).mean(2), "vision_encoder.pool_norm", 1e-5)
        return patches, self._linear(pooled, "vision_proj")

    def evaluate(self, tokens_VLD, input_ids, mask, k_test, bs=32):
        """tasks/retrieval_utils.py::evaluation, single rank, concat frame ensemble."""
        image_feats, pooled = self.vision(tokens_VLD)
        text_feats = self.text(input_ids, mask)
        vision_proj = F.normalize(pooled, dim=-1).float()
        text_proj = F.normalize(self._linear(text_feats[:, 0], "text_proj"), dim=-1).float()
        i2t = torch.einsum("mld,nd->mln", vision_proj, text_proj).mean(1)
        t2i = torch.einsum("nd,mld->nlm", text_proj, vision_proj).mean(1)
        V, N = i2t.shape
        i2t_x = torch.full((V, N), -100.0)
        for i in range(V):
            topk = i2t[i].topk(min(N, k_test)).indices
            scores = [self.itm(text_feats[topk[j:j + bs]], mask[topk[j:j + bs]],
                               image_feats[i].repeat(len(topk[j:j + bs]), 1, 1)) for j in range(0, len(topk), bs)]
            i2t_x[i, topk] = torch.cat(scores)
        t2i_x = torch.full((N, V), -100.0)
        for i in range(N):
            topk = t2i[i].topk(min(V, k_test)).indices
            scores = [self.itm(text_feats[i].repeat(len(topk[j:j + bs]), 1, 1), mask[i].repeat(len(topk[j:j + bs]), 1),
                               image_feats[topk[j:j + bs]]) for j in range(0, len(topk), bs)]
            t2i_x[i, topk] = torch.cat(scores)
        return i2t_x, t2i_x, i2t, t2i


def released_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """tasks/retrieval_utils.py::itm_eval (0-based argsort ranks, rank < k)."""
    def ranks(scores, gts):
        out = np.zeros(scores.shape[0])
        for index, score in enumerate(scores):
            inds = np.argsort(score)[::-1]
            out[index] = min(np.where(inds == g)[0][0] for g in gts[index])
        return out

    tr = ranks(scores_i2t, img2txt)
    ir = ranks(scores_t2i, [[g] for g in txt2img])
    return {f"{name}_r{k}": 100.0 * (r < k).mean() for name, r in (("txt", tr), ("img", ir)) for k in (1, 5, 10)}


# ------------------------------------------------------------------------------------------ end to end

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240),
           "yellow": (230, 220, 20), "black": (20, 20, 20)}  # fmt: skip
SHAPES = ("square", "circle")
VIDEOS = [f"clips/{c}_{s}.mp4" for c in COLOURS for s in SHAPES]  # 12 videos


def _captions(colour: str, shape: str) -> list[str]:
    # Upper case and punctuation on purpose: the released cleaning must apply before tokenising.
    return [f"A {colour.upper()} {shape}, moves left!", f"the {colour} {shape}-clip: runs (right)"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("umt_eval")
    rng = np.random.default_rng(0)
    for rel in VIDEOS:
        colour, shape = Path(rel).stem.split("_")
        frames = np.zeros((10, 40, 56, 3), dtype=np.uint8)
        frames[:] = COLOURS[colour]
        frames += rng.integers(0, 30, size=frames.shape, dtype=np.uint8)
        for t in range(10):  # a moving patch, its size by shape, so frames and videos differ
            side = 8 if shape == "square" else 14
            frames[t, 10:10 + side, 3 * t:3 * t + side] = 128
        (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / rel).write_bytes(encode_h264(frames, fps=5.0))
    entries = [{"video": rel, "caption": _captions(*Path(rel).stem.split("_"))} for rel in VIDEOS]
    (root / "anno.json").write_text(json.dumps(entries))
    return {"root": root, "checkpoint": write_released_checkpoint(root / "videomamba_tiny_released.pth", seed=1),
            "tokenizer": write_tokenizer_dir(root / "tokenizer")}


@pytest.fixture(scope="module")
def reference(workspace):
    """The released scoring of the same frames, from the released-layout file's tensors."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from models import VideoMamba, load_pretrained

    state = torch.load(workspace["checkpoint"], weights_only=True)["model"]
    backbone = VideoMamba(img_size=32, patch_size=16, num_frames=4, embed_dim=32, depth=2, num_classes=0,
                          scan_backend="ref").eval()
    report = load_pretrained(backbone, state)
    assert report.missing == [] and set(report.unexpected) == {"pool_norm.weight", "pool_norm.bias",
        "clip_decoder.0.head.weight", "clip_decoder.0.head.bias", "clip_decoder.0.norm.weight",
        "clip_decoder.0.norm.bias"}  # fmt: skip
    spec = ClipSpec(4, 32, *IMAGENET, None)
    clips = torch.stack([spec.load(str(workspace["root"] / "videos" / rel)) for rel in VIDEOS])
    texts = [_released_pre_text(c) for rel in VIDEOS for c in _captions(*Path(rel).stem.split("_"))]
    tok = BertTokenizerLegacy.from_pretrained(str(workspace["tokenizer"]))
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    assert (enc["input_ids"] == tok.unk_token_id).sum() == 0  # every cleaned word is in the vocabulary
    with torch.no_grad():
        tokens = backbone.forward_features(clips).tokens_BLD
        i2t_x, t2i_x, i2t, t2i = ReleasedReference(state, TINY_BERT.num_attention_heads).evaluate(
            tokens, enc["input_ids"], enc["attention_mask"], K_TEST)
    txt2img = [j for j in range(len(VIDEOS)) for _ in range(2)]
    img2txt = [[2 * j, 2 * j + 1] for j in range(len(VIDEOS))]
    return {"i2t_x": i2t_x.numpy(), "t2i_x": t2i_x.numpy(), "i2t": i2t.numpy(), "t2i": t2i.numpy(), "texts": texts,
            "metrics": released_itm_eval(i2t_x.numpy(), t2i_x.numpy(), txt2img, img2txt),
            "metrics_emb": released_itm_eval(i2t.numpy(), t2i.numpy(), txt2img, img2txt)}


def _overrides(ws, out: Path, *extra: str) -> list[str]:
    return [f"model.checkpoint={ws['checkpoint']}", f"model.text_model={ws['tokenizer']}",
            f"data.annotation={ws['root'] / 'anno.json'}", f"data.root={ws['root'] / 'videos'}",
            "data.num_frames=null", "data.img_size=null", f"data.max_text_tokens={MAX_TOKENS}", "data.num_workers=0",
            "data.batch_size=5", f"scoring.rerank_top_k={K_TEST}", f"scoring.rerank_batch_size={ITM_BATCH}",
            "evaluation.save_scores=true", f"output_dir={out}", f"cache.dir={out / 'cache'}",
            "tracking.enabled=false", *extra]


def _assert_matches_released(npz_path: Path, result: dict, reference: dict) -> None:
    scores = np.load(npz_path)
    assert list(scores["texts"]) == reference["texts"]
    np.testing.assert_allclose(scores["similarity_t2v_TV"], reference["t2i"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["similarity_v2t_TV"].T, reference["i2t"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["rerank_t2v_TV"], reference["t2i_x"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores["rerank_v2t_TV"].T, reference["i2t_x"], atol=1e-5, rtol=0)
    assert (scores["rerank_t2v_TV"] == -100).sum() == (reference["t2i_x"] == -100).sum() > 0  # top-k < videos
    for ours, theirs in (("", "metrics"), ("similarity/", "metrics_emb")):
        expected = reference[theirs]
        got = {f"{name}_r{k}": result[f"{ours}{direction}_r{k}"]
               for name, direction in (("txt", "v2t"), ("img", "t2v")) for k in (1, 5, 10)}
        assert got == pytest.approx(expected, abs=1e-9), (ours, got, expected)


@pytest.mark.timeout(240)
def test_released_checkpoint_evaluates_with_the_job_like_the_released_code(workspace, reference, tmp_path):
    out = tmp_path / "job"
    cmd = [sys.executable, "jobs/eval_retrieval.py", "--config", "configs/eval/msrvtt.yaml",
           *_overrides(workspace, out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "retrieval_msrvtt.json").read_text())
    flat = {**result["metrics"]}
    _assert_matches_released(out / "scores_msrvtt.npz", flat, reference)
    protocol = result["protocol"]
    assert protocol["text_family"] == "bert" and protocol["scoring"]["similarity"] == "frame-mean cosine"
    assert protocol["text"] == {"clean_captions": True, "max_text_tokens": MAX_TOKENS}
    assert protocol["resize"]["antialias"] is False and protocol["scoring"]["rerank_top_k"] == K_TEST
    table = (out / "retrieval_msrvtt.md").read_text()
    assert "Similarity alone, before re-ranking:" in table

    # Without the token cache every video is decoded and encoded once more for the re-rank: same matrices.
    again = evaluate_retrieval(load_eval_config(REPO / "configs/eval/msrvtt.yaml", _overrides(
        workspace, tmp_path / "again", "scoring.cache_vision_tokens=false", "cache.dir=null")))
    _assert_matches_released(Path(again["scores"]), again, reference)
    assert json.loads(Path(again["report"]).read_text())["timing"]["vtm_rerank_decode_s"] > 0


def _evaluate_on_rank(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    import torch.distributed as dist

    from pipeline.evaluation.run import evaluate_on_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        evaluate_on_rank(load_eval_config(REPO / "configs/eval/msrvtt.yaml", overrides))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_ranks_rerank_their_own_videos_and_give_the_released_matrices(workspace, reference, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    mp.spawn(_evaluate_on_rank, args=(2, port, _overrides(workspace, out, "cache.dir=null")), nprocs=2, join=True)
    result = json.loads((out / "retrieval_msrvtt.json").read_text())
    assert result["cache"]["world_size"] == 2
    _assert_matches_released(out / "scores_msrvtt.npz", result["metrics"], reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(240)
def test_on_gpu_fp32_the_matrices_match_the_reference(workspace, reference, tmp_path):
    # The GPU kernels (triton scan, SDPA) against the CPU reference; TF32 off so fp32 means fp32.
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = evaluate_retrieval(load_eval_config(REPO / "configs/eval/msrvtt.yaml", _overrides(
            workspace, tmp_path / "gpu", "scaling.use_gpu=true", "model.precision=fp32", "cache.dir=null")))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
    scores = np.load(result["scores"])
    np.testing.assert_allclose(scores["similarity_t2v_TV"], reference["t2i"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores["rerank_t2v_TV"], reference["t2i_x"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores["rerank_v2t_TV"].T, reference["i2t_x"], atol=1e-4, rtol=0)
