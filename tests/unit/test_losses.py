"""Video-text losses: InfoNCE against a hand-written reference, exact across 2 gloo ranks (and every GPU of a
multi-GPU host over NCCL); hard negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.losses import (
    contrastive_loss,
    cosine_alignment_loss,
    matching_loss,
    positive_targets,
    sample_hard_negatives,
)

WORLD = 2


def reference_infonce(video, text, index, temp):
    """Loop form of the symmetric loss with duplicate ids as shared positives."""
    v, t = F.normalize(video, dim=-1), F.normalize(text, dim=-1)
    n = len(index)
    total = 0.0
    for sim in (v @ t.t() / temp, t @ v.t() / temp):
        for i in range(n):
            positives = [j for j in range(n) if index[j] == index[i]]
            log_z = torch.logsumexp(sim[i], dim=0)
            total += -sum((sim[i, j] - log_z) / len(positives) for j in positives) / n
    return total / 2


def test_contrastive_loss_matches_reference_with_duplicates():
    gen = torch.Generator().manual_seed(0)
    video, text = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    index = torch.tensor([0, 1, 2, 2, 3, 4])  # samples 2 and 3 share an id: both are positives of each other
    temp = torch.tensor(0.1)
    expected = reference_infonce(video, text, index, temp)
    torch.testing.assert_close(contrastive_loss(video, text, index, temp), expected, rtol=1e-5, atol=1e-6)
    assert positive_targets(index, index)[2].tolist() == [0, 0, 0.5, 0.5, 0, 0]


ROWS = 4  # samples per rank


def _global_problem(world: int):
    """A linear 'encoder' pair and a global batch of `world` x 4, ids with one duplicate pair across ranks."""
    gen = torch.Generator().manual_seed(1)
    n = ROWS * world
    x_video, x_text = torch.randn(n, 5, generator=gen), torch.randn(n, 7, generator=gen)
    w_video, w_text = torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen)
    index = torch.arange(n)
    index[ROWS + 2] = 1  # sample 1 (rank 0) and sample 6 (rank 1) share an id
    return x_video, x_text, w_video, w_text, index


def _rank_worker(rank: int, world: int, backend: str, init_file: str, out_dir: str, sum_gradients: bool = True
                 ) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    try:
        x_video, x_text, w_video, w_text, index = (t.to(device) for t in _global_problem(world))
        w_video.requires_grad_(True)
        w_text.requires_grad_(True)
        rows = slice(ROWS * rank, ROWS * (rank + 1))
        temp = torch.tensor(0.05, device=device, requires_grad=True)
        loss = contrastive_loss(x_video[rows] @ w_video, x_text[rows] @ w_text, index[rows], temp, sum_gradients)
        loss.backward()
        # Data-parallel training averages parameter gradients over ranks (DDP / DeepSpeed do this).
        grads = [w_video.grad.clone(), w_text.grad.clone(), temp.grad.clone()]
        for g in grads:
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss.detach().cpu(), "grads": [g.cpu() for g in grads]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _check_gathered_loss(tmp_path, world: int, backend: str, sum_gradients: bool = True) -> None:
    mp.spawn(_rank_worker, args=(world, backend, str(tmp_path / "rendezvous"), str(tmp_path), sum_gradients),
             nprocs=world, join=True)  # fmt: skip
    x_video, x_text, w_video, w_text, index = _global_problem(world)
    w_video.requires_grad_(True)
    w_text.requires_grad_(True)
    temp = torch.tensor(0.05, requires_grad=True)
    single = contrastive_loss(x_video @ w_video, x_text @ w_text, index, temp)
    single.backward()
    # The released gather gives the features 1/world of the whole-batch gradient; the temperature, used directly
    # in every rank's (identical) loss, gets the whole-batch one either way.
    scale = 1.0 if sum_gradients else 1.0 / world
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], single.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["grads"][0], scale * w_video.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["grads"][1], scale * w_text.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["grads"][2], temp.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(120)
def test_gathered_loss_and_gradients_equal_single_process(tmp_path):
    _check_gathered_loss(tmp_path, WORLD, "gloo")


@pytest.mark.timeout(120)
def test_released_gather_gives_the_features_one_world_of_the_gradient(tmp_path):
    """The released UMT `AllGather` backward keeps only the local loss's gradient (`task.vtc_gather_gradient:
    local`, the BERT task's default)."""
    _check_gathered_loss(tmp_path, WORLD, "gloo", sum_gradients=False)


def test_per_frame_video_slots_give_the_mean_of_the_slot_cosines():
    gen = torch.Generator().manual_seed(2)
    video_BFE, text_BE = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 8, generator=gen)
    index, temp = torch.tensor([0, 1, 2, 2, 3]), torch.tensor(0.1)
    cosines_BBF = torch.einsum("vfe,te->vtf", F.normalize(video_BFE, dim=-1), F.normalize(text_BE, dim=-1))
    sim_v2t = cosines_BBF.mean(dim=2) / temp  # the released get_sim: per-slot similarity, averaged over slots
    targets = positive_targets(index, index)
    expected = (-(targets * F.log_softmax(sim_v2t, 1)).sum(1).mean() - (targets * F.log_softmax(sim_v2t.t(), 1))
                .sum(1).mean()) / 2
    torch.testing.assert_close(contrastive_loss(video_BFE, text_BE, index, temp), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs (NCCL)")
@pytest.mark.timeout(300)
def test_gathered_loss_over_nccl_equals_single_process(tmp_path):
    """The same on every GPU of the host over NCCL (the multi-GPU machine's check; fp32 matmuls, no TF32)."""
    _check_gathered_loss(tmp_path, torch.cuda.device_count(), "nccl")


def test_hard_negatives_follow_similarity_and_avoid_positives():
    index = torch.tensor([0, 1, 2, 2])
    sim = torch.full((4, 4), -50.0)
    sim[0, 3] = 50.0  # video 0's most similar non-positive text is 3
    sim[2, 3] = 50.0  # a positive pair (equal ids): must never be drawn as a negative
    sim[1, 0] = 50.0  # text 0's most similar video is 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        text_for_video, video_for_text = sample_hard_negatives(sim, index, generator=gen)
        assert text_for_video[0] == 3 and video_for_text[0] == 1
        assert (index[text_for_video] != index).all() and (index[video_for_text] != index).all()


def test_hard_negatives_need_a_negative():
    with pytest.raises(ValueError, match="negative for every sample"):
        sample_hard_negatives(torch.zeros(3, 3), torch.tensor([4, 4, 4]))


def test_matching_loss_is_balanced_cross_entropy():
    positive, negative = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    expected = -(math.log(torch.softmax(positive[0], 0)[1]) + math.log(torch.softmax(negative[0], 0)[0])
                 + math.log(0.5)) / 3
    assert matching_loss(positive, negative).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_alignment_is_squared_distance_of_unit_vectors():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 6, generator=gen)
    distance = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1).mean()
    torch.testing.assert_close(cosine_alignment_loss(a, b), distance)
    assert cosine_alignment_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)
