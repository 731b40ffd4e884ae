"""VideoMamba architecture: sizes and parameter counts, official key layout, token layout, masking, residual
taps, stochastic depth, gradient checkpointing, init and input errors (videomamba_test on CPU)."""

import math

import pytest
import torch

from models import create_model, list_models
from models.ops import rms_norm

# The released code's counts (docs/model.md, "Sizes"): 400-class head, 8 frames, 224 px.
K400_COUNTS = {"videomamba_tiny": 7_033_744, "videomamba_small": 25_568_656, "videomamba_middle": 73_875_856}
IN1K_COUNTS = {"videomamba_tiny": 7_148_008, "videomamba_small": 25_796_584, "videomamba_middle": 74_217_448,
               "videomamba_base": 97_598_440}


def analytic_count(D, depth, classes, frames, img=224, patch=16, tubelet=1, N=16, W=4):
    """Parameters of VideoMamba counted from its definition (docs/model.md)."""
    E, R = 2 * D, math.ceil(D / 16)
    direction = E * W + E + E * (R + 2 * N) + R * E + E + E * N + E  # conv, x_proj, dt_proj, A_log, D
    layer = D * 2 * E + E * D + 2 * direction + D  # in_proj, out_proj, two directions, norm
    embed = D * 3 * tubelet * patch * patch + D + D + ((img // patch) ** 2 + 1) * D + frames // tubelet * D
    head = (D * classes + classes) if classes else 0
    return embed + head + depth * layer + D


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_registry_lists_every_size():
    assert {"videomamba_tiny", "videomamba_small", "videomamba_middle", "videomamba_base",
            "videomamba_test"} <= set(list_models())


@pytest.mark.parametrize("name", ["videomamba_tiny", "videomamba_small", "videomamba_middle", "videomamba_base",
                                  "videomamba_test"])
def test_parameter_counts(name):
    model = meta_model(name)
    D, depth = model.embed_dim, model.depth
    assert n_params(model) == analytic_count(D, depth, model.head.out_features, model.num_frames,
                                             model.img_size, model.patch_size)
    if name in K400_COUNTS:
        assert n_params(model) == K400_COUNTS[name]
    # The image (IN-1K) variant = 1000-class head and no temporal embedding.
    in1k = n_params(meta_model(name, num_classes=1000)) - model.temporal_pos_embedding.numel()
    if name in IN1K_COUNTS:
        assert in1k == IN1K_COUNTS[name]


def test_tiny_state_dict_matches_official_layout():
    """The 416 keys of the released VideoMamba-Ti K400 checkpoint, in order, with their shapes (docs/model.md)."""
    state = create_model("videomamba_tiny").state_dict()
    top = [("cls_token", (1, 1, 192)), ("pos_embed", (1, 197, 192)), ("temporal_pos_embedding", (1, 8, 192)),
           ("patch_embed.proj.weight", (192, 3, 1, 16, 16)), ("patch_embed.proj.bias", (192,)),
           ("head.weight", (400, 192)), ("head.bias", (400,))]
    per_layer = [("mixer.A_log", (384, 16)), ("mixer.D", (384,)), ("mixer.A_b_log", (384, 16)),
                 ("mixer.D_b", (384,)), ("mixer.in_proj.weight", (768, 192)), ("mixer.conv1d.weight", (384, 1, 4)),
                 ("mixer.conv1d.bias", (384,)), ("mixer.x_proj.weight", (44, 384)),
                 ("mixer.dt_proj.weight", (384, 12)), ("mixer.dt_proj.bias", (384,)),
                 ("mixer.conv1d_b.weight", (384, 1, 4)), ("mixer.conv1d_b.bias", (384,)),
                 ("mixer.x_proj_b.weight", (44, 384)), ("mixer.dt_proj_b.weight", (384, 12)),
                 ("mixer.dt_proj_b.bias", (384,)), ("mixer.out_proj.weight", (192, 384)), ("norm.weight", (192,))]
    expected = top + [(f"layers.{i}.{k}", s) for i in range(24) for k, s in per_layer] + [("norm_f.weight", (192,))]
    assert len(expected) == 416
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected


@pytest.fixture
def video():
    return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))


def test_shapes_and_attributes(video):
    model = create_model("videomamba_test").eval()
    assert (model.embed_dim, model.depth, model.num_frames, model.tubelet_size) == (32, 2, 4, 1)
    assert (model.patch_size, model.img_size, model.num_patches, model.grid) == (16, 32, 4, (4, 2, 2))
    assert model(video).shape == (2, 5)
    feats = model.forward_features(video)
    assert feats.tokens_BLD.shape == (2, 1 + 4 * 4, 32)
    backbone = create_model("videomamba_test", num_classes=0, tubelet_size=2).eval()
    assert backbone.grid == (2, 2, 2) and backbone(video).shape == (2, 32)


def test_token_layout_is_cls_then_spatial_first(video):
    """Token 1 + t*P + p = patch p (raster) of frame t + pos_embed[1 + p] + temporal_pos_embedding[t]."""
    model = create_model("videomamba_test")
    with torch.no_grad():
        model.temporal_pos_embedding.normal_()
        model.cls_token.normal_()
        x = model.embed(video)
        conv = model.patch_embed.proj(video)  # (B, D, T, h, w)
    B, D, T, h, w = conv.shape
    torch.testing.assert_close(x[:, 0], (model.cls_token + model.pos_embed[:, 0]).expand(B, 1, D)[:, 0])
    for t in range(T):
        for row in range(h):
            for col in range(w):
                p = row * w + col
                expected = conv[:, :, t, row, col] + model.pos_embed[0, 1 + p] + model.temporal_pos_embedding[0, t]
                torch.testing.assert_close(x[:, 1 + t * h * w + p], expected)


def test_all_true_keep_mask_equals_unmasked_forward(video):
    model = create_model("videomamba_test").eval()
    keep = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        full = model.forward_features(video, return_residuals=(0, 1, 2))
        kept = model.forward_features(video, keep_BL=keep, return_residuals=(0, 1, 2))
    assert torch.equal(full.tokens_BLD, kept.tokens_BLD)
    assert all(torch.equal(full.residuals[i], kept.residuals[i]) for i in range(3))


def test_keep_mask_runs_the_gathered_subsequence(video):
    model = create_model("videomamba_test").eval()
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    for b in range(2):
        keep[b, torch.randperm(16, generator=g)[:5]] = True
    with torch.no_grad():
        feats = model.forward_features(video, keep_BL=keep, return_residuals=(0,))
        embedded = model.embed(video)
    assert feats.tokens_BLD.shape == (2, 6, 32)
    for b in range(2):
        positions = [0] + [1 + i for i in range(16) if keep[b, i]]
        torch.testing.assert_close(feats.residuals[0][b], embedded[b, positions])


def test_residual_taps(video):
    """residuals[i] is the fp32 stream block i normalises; residuals[depth] is what norm_f normalises."""
    model = create_model("videomamba_test").eval()
    with torch.no_grad():
        feats = model.forward_features(video, return_residuals=(0, 1, 2))
        first_mixer = model.layers[0].mixer(rms_norm(feats.residuals[0], model.layers[0].norm.weight))
    assert all(r.dtype == torch.float32 and r.shape == (2, 17, 32) for r in feats.residuals.values())
    torch.testing.assert_close(feats.residuals[1], feats.residuals[0] + first_mixer)
    torch.testing.assert_close(feats.tokens_BLD, rms_norm(feats.residuals[2], model.norm_f.weight))


def test_stochastic_depth_schedule_and_eval_identity(video):
    model = create_model("videomamba_test", depth=3, drop_path_rate=0.5)
    rates = [getattr(layer.drop_path, "p", 0.0) for layer in model.layers]
    assert rates == [0.0, 0.0, 0.25] and model.drop_path.p == 0.5  # block i drops mixer i-1; norm_f the last
    plain = create_model("videomamba_test", depth=3)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(video), plain(video))
    model.train(), plain.train()
    with torch.no_grad():  # in training every kept branch is rescaled by 1/(1-p), so outputs always differ
        assert not torch.allclose(model(video), plain(video))


def test_gradient_checkpointing_gives_identical_grads(video):
    base = create_model("videomamba_test")
    ckpt = create_model("videomamba_test", use_checkpoint=True, checkpoint_num=2)
    ckpt.load_state_dict(base.state_dict())
    grads = []
    for model in (base, ckpt):
        model(video).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0)


def test_init_follows_the_released_order():
    torch.manual_seed(0)
    model = create_model("videomamba_test", depth=4, embed_dim=64)
    mixer = model.layers[1].mixer
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert torch.equal(mixer.D_b, torch.ones(128))
    # Quirk reproduced: the whole-model trunc-normal pass zeroes the dt bias Mamba had initialised.
    assert torch.equal(mixer.dt_proj.bias, torch.zeros(128)) and torch.equal(mixer.dt_proj_b.bias, torch.zeros(128))
    assert mixer.x_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.cls_token, torch.zeros_like(model.cls_token))
    assert torch.equal(model.temporal_pos_embedding, torch.zeros_like(model.temporal_pos_embedding))
    # out_proj: kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)), then / sqrt(depth).
    bound = 1 / math.sqrt(128) / math.sqrt(4)
    assert mixer.out_proj.weight.abs().max().item() <= bound
    assert mixer.out_proj.weight.abs().max().item() > 0.9 * bound
    # mixer_init="mamba" keeps Mamba's dt init: softplus(bias) = dt in [1e-3, 0.1].
    dt = torch.nn.functional.softplus(create_model("videomamba_test", mixer_init="mamba").layers[0].mixer
                                      .dt_proj.bias.detach())
    assert dt.min().item() >= 1e-3 * 0.999 and dt.max().item() <= 0.1 * 1.001


def test_bf16_autocast_forward_is_close_to_fp32(video):
    model = create_model("videomamba_test").eval()
    with torch.no_grad():
        ref = model.forward_features(video).tokens_BLD
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.forward_features(video, return_residuals=(1,))
    assert low.residuals[1].dtype == torch.float32
    torch.testing.assert_close(low.tokens_BLD.float(), ref, rtol=0.1, atol=0.1)


def test_bad_inputs_are_named(video):
    with pytest.raises(ValueError, match="videomamba_test"):
        create_model("videomamba_huge")
    with pytest.raises(TypeError, match="num_frame"):
        create_model("videomamba_test", num_frame=8)
    with pytest.raises(ValueError, match="scan_backend"):
        create_model("videomamba_test", scan_backend="fast")
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        create_model("videomamba_test", tubelet_size=3)
    model = create_model("videomamba_test")
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 32, 32\)"):
        model(video[:, :, :2])
    with pytest.raises(ValueError, match="same number of tokens"):
        keep = torch.zeros(2, 16, dtype=torch.bool)
        keep[0, :3], keep[1, :4] = True, True
        model.forward_features(video, keep_BL=keep)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model.forward_features(video, keep_BL=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="return_residuals"):
        model.forward_features(video, return_residuals=(3,))
