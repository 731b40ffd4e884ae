"""Retrieval metrics, scoring helpers and annotation parsing: hand-computed cases and brute-force references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.evaluation import retrieval_metrics
from pipeline.evaluation.annotations import drop_missing, load_annotations
from pipeline.evaluation.similarity import apply_rerank, dual_softmax, top_k_pairs


def brute_force_metrics(sim: np.ndarray, txt2vid: list[int], vid2txt: list[list[int]]) -> dict[str, float]:
    """Reference: sort every row/column explicitly, wrong items first among equal scores."""

    def rank_of_first_correct(scores: np.ndarray, correct: set[int]) -> int:
        # Sort by descending score; among equal scores wrong items (key 0) come before correct ones (key 1).
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i in correct))
        return next(pos for pos, i in enumerate(order, start=1) if i in correct)

    t2v = [rank_of_first_correct(sim[i], {txt2vid[i]}) for i in range(sim.shape[0])]
    v2t = [rank_of_first_correct(sim[:, j], set(vid2txt[j])) for j in range(sim.shape[1])]
    out = {}
    for prefix, ranks in (("t2v", t2v), ("v2t", v2t)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{prefix}_medr"] = float(np.median(ranks))
        out[f"{prefix}_meanr"] = sum(ranks) / len(ranks)
    return out


def test_hand_computed_example():
    # 3 texts, 2 videos; texts 0 and 1 describe video 0, text 2 describes video 1.
    sim = np.array(
        [
            [0.9, 0.1],  # text 0: video 0 first            -> t2v rank 1
            [0.2, 0.5],  # text 1: video 0 second           -> t2v rank 2
            [0.3, 0.3],  # text 2: tie with the wrong video -> pessimistic rank 2
        ]
    )
    m = retrieval_metrics(sim, [0, 0, 1], [[0, 1], [2]])
    # t2v ranks [1, 2, 2]
    assert m["t2v_r1"] == pytest.approx(100 / 3)
    assert m["t2v_r5"] == m["t2v_r10"] == 100.0
    assert m["t2v_medr"] == 2.0
    assert m["t2v_meanr"] == pytest.approx(5 / 3)
    # video 0 column [0.9, 0.2, 0.3]: best correct text 0 is first -> rank 1.
    # video 1 column [0.1, 0.5, 0.3]: correct text 2 (0.3) is behind text 1 (0.5) -> rank 2.
    assert m["v2t_r1"] == 50.0
    assert m["v2t_medr"] == 1.5
    assert m["v2t_meanr"] == 1.5


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_ties_and_multi_caption(seed):
    rng = np.random.default_rng(seed)
    num_videos = 23
    captions_per_video = rng.integers(1, 4, size=num_videos)
    txt2vid = [j for j in range(num_videos) for _ in range(captions_per_video[j])]
    vid2txt = [[i for i, v in enumerate(txt2vid) if v == j] for j in range(num_videos)]
    # Few distinct values -> many ties, including ties between correct and wrong items.
    sim = rng.integers(0, 4, size=(len(txt2vid), num_videos)).astype(np.float32) / 4
    expected = brute_force_metrics(sim, txt2vid, vid2txt)
    for given in (sim, torch.from_numpy(sim)):
        got = retrieval_metrics(given, txt2vid, vid2txt)
        assert got == pytest.approx(expected)


def test_constant_scores_rank_last():
    m = retrieval_metrics(np.zeros((4, 4)), [0, 1, 2, 3], [[0], [1], [2], [3]])
    assert m["t2v_r1"] == m["v2t_r1"] == 0.0
    assert m["t2v_meanr"] == m["v2t_meanr"] == 4.0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3), [0], [[0]])
    with pytest.raises(ValueError, match="txt2vid has 2 entries but sim has 3"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1], [[0], [1]])
    with pytest.raises(ValueError, match="vid2txt has 1 entries but sim has 2"):
        retrieval_metrics(np.zeros((2, 2)), [0, 1], [[0, 1]])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2], [[0], [1]])
    with pytest.raises(ValueError, match="disagree"):
        retrieval_metrics(np.zeros((2, 2)), [0, 1], [[1], [0]])
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((2, 2)), [0, 0], [[0, 1], []])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 2), np.nan), [0, 1], [[0], [1]])


def test_dual_softmax_demotes_a_hub_video():
    # Video 0 is a "hub": close to every text. Text 1's true video is 1, but cosine ranks the hub first.
    sim = torch.tensor(
        [
            [0.90, 0.10, 0.10],
            [0.80, 0.70, 0.10],
            [0.85, 0.10, 0.60],
        ]
    )
    txt2vid, vid2txt = [0, 1, 2], [[0], [1], [2]]
    plain = retrieval_metrics(sim, txt2vid, vid2txt)
    assert plain["t2v_r1"] == pytest.approx(100 / 3)  # only text 0 finds its video first
    t2v, v2t = dual_softmax(sim, temperature=0.05)
    # Column 0's softmax over texts concentrates on text 0, so texts 1 and 2 now rank their own video first.
    assert t2v.argmax(dim=1).tolist() == [0, 1, 2]
    assert retrieval_metrics(t2v, txt2vid, vid2txt)["t2v_r1"] == 100.0
    # The v2t matrix reweights by the softmax over videos of each row.
    expected_v2t = sim * torch.softmax(sim / 0.05, dim=1)
    torch.testing.assert_close(v2t, expected_v2t)


def test_rerank_moves_candidates_above_the_rest_and_keeps_their_order():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4]])
    t2v_TV, v2t_TV = top_k_pairs(sim, sim, k=2)
    assert t2v_TV.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert v2t_TV.all()  # only two texts: every pair is in each video's top-2
    vtm = torch.tensor([[-5.0, -1.0, 9.0, 9.0], [9.0, 9.0, -3.0, 2.0]])
    out = apply_rerank(sim, t2v_TV, vtm)
    # Row 0: the VTM head flips the two candidates; non-candidates stay below them, in cosine order.
    assert out[0].argsort(descending=True).tolist() == [1, 0, 3, 2]
    assert out[1].argsort(descending=True).tolist() == [3, 2, 1, 0]


def test_annotations_paragraph_mode_and_merging(tmp_path):
    path = tmp_path / "anno.json"
    entries = [
        {"video": "a.mp4", "caption": ["a man walks.", " he sits down."]},
        {"video": "b.mp4", "caption": "a dog runs"},
        {"video": "a.mp4", "caption": "the end"},
    ]
    path.write_text(json.dumps(entries))
    para = load_annotations(path, paragraph=True)
    assert para.videos == ["a.mp4", "b.mp4"]
    assert para.texts == ["a man walks. he sits down. the end", "a dog runs"]
    assert para.txt2vid == [0, 1] and para.vid2txt == [[0], [1]]
    single = load_annotations(path, paragraph=False)
    assert single.texts == ["a man walks.", "he sits down.", "the end", "a dog runs"]
    assert single.txt2vid == [0, 0, 0, 1] and single.vid2txt == [[0, 1, 2], [3]]
    assert single.sha256 == para.sha256


def test_annotation_format_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4"}]))
    with pytest.raises(ValueError, match=r"bad.json\[1\].*\"video\" and \"caption\""):
        load_annotations(path, paragraph=False)
    path.write_text(json.dumps({"video": "a.mp4"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_annotations(path, paragraph=False)
    with pytest.raises(FileNotFoundError, match="docs/evaluation.md"):
        load_annotations(tmp_path / "nope.json", paragraph=False)


def test_missing_videos_error_lists_them_or_are_skipped(tmp_path):
    path = tmp_path / "anno.json"
    path.write_text(json.dumps([{"video": v, "caption": [f"{v} one", f"{v} two"]} for v in ("a", "b", "c")]))
    anno = load_annotations(path, paragraph=False)
    present = {"a", "c"}
    with pytest.raises(FileNotFoundError, match=r"1 of 3 videos .* not in /videos:\n  b\n.*skip_missing"):
        drop_missing(anno, present.__contains__, skip_missing=False, source="/videos")
    kept = drop_missing(anno, present.__contains__, skip_missing=True, source="/videos")
    assert kept.videos == ["a", "c"] and kept.missing == ["b"]
    assert kept.texts == ["a one", "a two", "c one", "c two"]
    assert kept.txt2vid == [0, 0, 1, 1] and kept.vid2txt == [[0, 1], [2, 3]]
    with pytest.raises(FileNotFoundError, match="none of the 3"):
        drop_missing(anno, lambda v: False, skip_missing=True, source="/videos")
