"""The flat-map MAE: shapes, masking inside the brain, the brain-masked loss, presets, files."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from fmri_bench.errors import InputError
from fmri_bench.models.mae import PRESETS, MAEConfig, MaskedAutoencoderViT, from_pretrained, preset_config

# a model small enough for milliseconds: 2 x 4 x 8 = 64 tokens
SMALL = dict(img_size=(32, 64), num_frames=4, patch_size=8, t_patch_size=2, embed_dim=32, depth=1,
             num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(MAEConfig(**{**SMALL, **kw}))


def brain_mask(H=32, W=64) -> torch.Tensor:
    """Two 'hemispheres': pixel blocks that cover some patches fully, some partly, some not at all."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[4:28, 3:29] = True
    m[10:30, 36:60] = True
    return m


def clips(n=2, T=4, H=32, W=64, seed=0) -> torch.Tensor:
    return torch.randn(n, 1, T, H, W, generator=torch.Generator().manual_seed(seed))


def test_patchify_unpatchify_round_trip_and_layout():
    model = small_model()
    x = clips()
    p = model.patchify(x)
    assert p.shape == (2, 64, 2 * 8 * 8)
    assert torch.equal(model.unpatchify(p), x)
    # token (t=1, h=2, w=3), element (u=1, row 4, col 5) is frame 3, pixel (20, 29)
    assert p[0, 1 * 32 + 2 * 8 + 3, 1 * 64 + 4 * 8 + 5] == x[0, 0, 3, 20, 29]
    target = model.pred_target(x)  # every 2nd frame, 1 frame per token
    assert target.shape == (2, 64, 64)
    assert torch.equal(model.unpatchify(target, t_patch=1), x[:, :, ::2])


@pytest.mark.parametrize("t_patch", [None, 1])
def test_patches_at_cuts_the_rows_of_patchify(t_patch):
    model = small_model()
    x = clips(3)
    ids = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:10] for i in range(3)])
    full = model.patchify(x, t_patch=t_patch)
    want = torch.gather(full, 1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.equal(model.patches_at(x, ids, t_patch=t_patch), want)


def test_forward_shapes():
    model = small_model()
    loss, pred, visible = model(clips(), brain_mask(), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, 64, 1 * 8 * 8) and visible.shape == (2, 64) and visible.dtype == torch.bool
    assert visible.sum(1).tolist() == [int(64 * (1 - 0.9))] * 2  # 6 of 64, as upstream's int()
    feats = model.forward_features(clips(), brain_mask())
    assert feats["cls"].shape == (2, 32) and feats["avg_patch"].shape == (2, 32)
    assert feats["patch"].shape == (2, 64, 32)
    brain = feats["brain"]
    assert torch.allclose(feats["avg_patch"], feats["patch"].sum(1) / brain.sum(1, keepdim=True))
    assert (feats["patch"][~brain] == 0).all()
    rec = model.reconstruct(clips(), brain_mask())
    assert rec["pred"].shape == rec["target"].shape == (2, 1, 2, 32, 64)


def test_paper_token_grid():
    cfg = preset_config("mae_vit_base")
    assert cfg.grid_size == (1, 14, 35) and cfg.num_patches == 490
    assert int(cfg.num_patches * (1 - cfg.mask_ratio)) == 48  # "48 visible of 490"
    assert preset_config("mae_vit_tiny").grid_size == (1, 14, 35)


@pytest.mark.parametrize("tube", [False, True])
def test_visible_tokens_only_inside_brain(tube):
    model = small_model(tube_masking=tube, mask_ratio=0.75)
    mask = brain_mask()
    brain = model.brain_patches(mask[None])[0]
    assert 0 < int(brain.sum()) < 64
    # a patch is brain when any pixel is: patch (0, 3) holds only pixels 4..7 x 24..28 of the mask
    assert brain[0] and brain[3] and not brain[4] and not brain[7] and brain[8 + 4]
    gen = torch.Generator().manual_seed(1)
    seen = torch.zeros(64, dtype=torch.bool)
    for _ in range(20):
        _, _, visible = model(clips(), mask, gen)
        assert not (visible & ~brain).any()
        seen |= visible.any(0)
        if tube:  # one spatial draw shared by both temporal tokens
            v = visible.view(2, 2, 32)
            assert torch.equal(v[:, 0], v[:, 1])
    assert torch.equal(seen, brain)  # and every brain token gets drawn sometimes


def test_masking_is_reproducible_from_a_generator():
    model = small_model()
    a = model(clips(), brain_mask(), torch.Generator().manual_seed(3))
    b = model(clips(), brain_mask(), torch.Generator().manual_seed(3))
    c = model(clips(), brain_mask(), torch.Generator().manual_seed(4))
    assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[2], c[2])


def test_loss_ignores_pixels_outside_the_brain():
    model = small_model()
    mask = brain_mask()
    x = clips()
    y = x.clone()
    y[:, :, :, ~mask] = torch.randn_like(y[:, :, :, ~mask]) * 100
    y[0, 0, 0, 0, 0] = float("nan")
    la, pa, va = model(x, mask, torch.Generator().manual_seed(0))
    lb, pb, vb = model(y, mask, torch.Generator().manual_seed(0))
    assert torch.equal(va, vb) and torch.equal(pa, pb) and la.item() == lb.item()
    feats_x, feats_y = model.forward_features(x, mask), model.forward_features(y, mask)
    assert torch.equal(feats_x["cls"], feats_y["cls"])


def test_loss_is_mse_over_masked_brain_pixels():
    model = small_model()
    mask, x = brain_mask(), clips(n=1)
    loss, pred, visible = model(x, mask, torch.Generator().manual_seed(0))
    target = model.pred_target(x * mask)
    brain_px = model.pred_target(mask.expand(1, 1, 4, 32, 64).float())
    w = brain_px * (~visible).unsqueeze(-1)
    expected = ((pred - target) ** 2 * w).sum() / w.sum()
    assert torch.allclose(loss, expected)
    assert w.sum() == 2 * int(mask.sum()) - brain_px[visible].sum()  # 2 predicted frames, less the visible
    # changing the prediction at visible tokens or outside the brain does not change the loss
    pred2 = pred.detach().clone()
    pred2[visible] = 1e3
    pred2[brain_px.expand_as(pred2) == 0] = -1e3
    assert torch.allclose(model.forward_loss(x * mask, pred2, visible, mask[None]), loss)


def expected_params(cfg: MAEConfig) -> tuple[int, int]:
    """Encoder and decoder parameter counts from the config alone."""
    def block(d):
        h = int(d * cfg.mlp_ratio)
        return (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + 4 * d

    t, h, w = cfg.grid_size
    D, Dd = cfg.embed_dim, cfg.decoder_embed_dim
    patch = cfg.t_patch_size * cfg.patch_size ** 2 * cfg.in_chans
    pred = cfg.t_pred_patch_size * cfg.patch_size ** 2 * cfg.in_chans
    enc = patch * D + D + (h * w + t + 2) * D + cfg.depth * block(D) + 2 * D
    # decoder_embed, its own cls token + cls position, mask token, spatial + temporal positions
    dec = D * Dd + Dd + (1 + 1 + 1 + h * w + t) * Dd + cfg.decoder_depth * block(Dd) + 2 * Dd + Dd * pred + pred
    return enc, dec


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    cfg = preset_config(name)
    model = MaskedAutoencoderViT(cfg)
    enc, dec = expected_params(cfg)
    assert model.num_params("encoder") == enc and model.num_params("decoder") == dec
    if name == "mae_vit_base":  # the paper: 102.9M in all, 88.6M in the encoder
        assert (enc + dec, enc) == (102_888_960, 88_581_120)
        assert round((enc + dec) / 1e6, 1) == 102.9 and round(enc / 1e6, 1) == 88.6
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (768, 12, 12)
    if name == "mae_vit_small":
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (384, 12, 6)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_parameter_gets_a_gradient(name):
    # the preset's widths, heads, patching and grid, one block deep so the test stays quick
    torch.manual_seed(0)
    cfg = preset_config(name, depth=1, decoder_depth=1)
    model = MaskedAutoencoderViT(cfg)
    H, W = cfg.img_size
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[H // 8: -H // 8, W // 10: -W // 10] = True
    x = torch.randn(1, 1, cfg.num_frames, H, W)
    loss, _, _ = model(x, mask, torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_tiny_preset_overfits_one_batch():
    # the tiny preset's widths, depths, heads and tubelets on a 16 x 32 grid (8 tokens, 1 visible)
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(preset_config("mae_vit_tiny", img_size=(16, 32), num_frames=16))
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[2:14] = True
    x = clips(n=1, T=16, H=16, W=32)
    noise = model.draw_noise(1, torch.Generator().manual_seed(0))  # the same masking every step
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(80):
        loss, _, _ = model(x, mask, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[0] > 0.8 and losses[-1] < losses[0] / 10


def test_save_and_load_round_trip(tmp_path):
    model = small_model(tube_masking=True)
    model.save_pretrained(tmp_path / "m.pt")
    again = from_pretrained(tmp_path / "m.pt")
    assert again.config == model.config
    x, mask = clips(), brain_mask()
    assert torch.equal(model(x, mask, torch.Generator().manual_seed(0))[0],
                       again(x, mask, torch.Generator().manual_seed(0))[0])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        from_pretrained(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="no such model file"):
        from_pretrained(tmp_path / "missing.pt")


def test_bad_config_and_bad_clip_give_clear_errors():
    with pytest.raises(InputError, match="unknown MAE config key 'embed_dims'.*did you mean 'embed_dim'"):
        MAEConfig.from_dict({"embed_dims": 8})
    with pytest.raises(InputError, match="not divisible by patch_size"):
        MAEConfig(img_size=(30, 64))
    with pytest.raises(InputError, match="unknown model preset"):
        preset_config("mae_vit_huge")
    model = small_model()
    with pytest.raises(InputError, match=r"clip has shape \(2, 1, 4, 30, 64\).*expects \(N, 1, 4, 32, 64\)"):
        model(torch.zeros(2, 1, 4, 30, 64), brain_mask())
    with pytest.raises(InputError, match="brain mask has shape"):
        model(clips(), torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(InputError, match="no in-brain pixels"):
        model(clips(), torch.zeros(32, 64, dtype=torch.bool))


def test_masking_figure():
    from fmri_bench.models.viz import plot_masking, plot_reconstruction

    model = small_model()
    fig = plot_masking(model, clips(n=1)[0], brain_mask(), torch.Generator().manual_seed(0))
    assert len(fig.axes) == 3
    fig = plot_reconstruction(model.reconstruct(clips(), brain_mask()), brain_mask(), frames=(0, 1))
    assert len(fig.axes) == 6


def test_a_batch_of_different_masks_equals_each_clip_alone():
    """Clips of a batch may come from runs with different masks (sites, spaces): every output
    of the batch equals that clip's output alone, for features, loss and masking."""
    model = small_model().eval()
    x = clips(3)
    masks = torch.stack([brain_mask(), brain_mask().flip(1), torch.ones(32, 64, dtype=torch.bool)])
    feats = model.forward_features(x, masks)
    for b in range(3):
        one = model.forward_features(x[b:b + 1], masks[b])
        torch.testing.assert_close(feats["avg_patch"][b:b + 1], one["avg_patch"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats["cls"][b:b + 1], one["cls"], atol=1e-5, rtol=1e-5)
        assert torch.equal(feats["brain"][b], model.brain_patches(masks[b][None])[0])
    assert feats["brain"].sum(1).tolist() != [feats["brain"][0].sum().item()] * 3  # the masks really differ
    noise = model.draw_noise(3, torch.Generator().manual_seed(0))
    loss, _, visible = model(x, masks, noise=noise)
    losses = [model(x[b:b + 1], masks[b:b + 1], noise=noise[b:b + 1]) for b in range(3)]
    for b, (_, _, vis) in enumerate(losses):
        assert torch.equal(visible[b], vis[0])
        assert not (visible[b] & ~model.brain_patches(masks[b][None])[0]).any()  # visible only inside brain
    # each clip is normalised by its own masked brain pixels, then clips are averaged
    torch.testing.assert_close(loss, torch.stack([l for l, _, _ in losses]).mean(), atol=1e-5, rtol=1e-5)


# --- the decoder reads visible + hidden brain tokens only ----------------------------------------
def decoder_inputs(model) -> list[dict]:
    """Record what enters the first decoder block on each call: token count and attention mask."""
    seen = []

    def hook(_module, args, kwargs):
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        seen.append({"tokens": x.shape[1], "attn_mask": mask})

    model.decoder_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_only_visible_and_hidden_brain_tokens_reach_the_decoder():
    model = small_model(mask_ratio=0.75)
    mask = brain_mask()
    brain = model.brain_patches(mask[None])[0]
    n_brain = int(brain.sum())
    assert n_brain < 64  # some tokens lie outside the brain
    seen = decoder_inputs(model)
    loss, pred, visible = model(clips(), mask, torch.Generator().manual_seed(0))
    K = int(visible[0].sum())
    # own cls + K visible + (n_brain - K) hidden brain tokens; no attention mask with one brain mask
    assert seen[0]["tokens"] == 1 + K + (n_brain - K) == 1 + n_brain
    assert seen[0]["attn_mask"] is None
    # predictions exist exactly at the hidden brain tokens
    decoded = pred.abs().sum(-1) > 0
    assert torch.equal(decoded, brain[None] & ~visible)


def test_non_brain_and_visible_tokens_have_zero_loss_weight():
    model = small_model()
    mask = brain_mask()
    brain = model.brain_patches(mask[None])[0]
    _, pred, visible = model(clips(), mask, torch.Generator().manual_seed(0))
    weight = model.loss_weight(mask[None].expand(2, -1, -1), visible)  # (N, L, P)
    per_token = weight.sum(-1)
    assert (per_token[:, ~brain] == 0).all() and (per_token[visible] == 0).all()
    assert (per_token[brain[None] & ~visible] > 0).all()
    # so the zeros the decoder leaves there cannot move the loss: any value there gives the same loss
    x = clips() * mask
    pred2 = pred.detach().clone()
    pred2[:, ~brain] = 1e3
    pred2[visible] = -1e3
    torch.testing.assert_close(model.forward_loss(x, pred2, visible, mask[None].expand(2, -1, -1)),
                               model.forward_loss(x, pred.detach(), visible, mask[None].expand(2, -1, -1)))


def all_token_decoder_loss(model, imgs, mask, noise):
    """The previous decoder, as reference: mask tokens at *every* grid position (brain or not),
    the encoded visible tokens scattered back to their places, the decoder's class token in front,
    all 1 + L tokens through the decoder blocks."""
    imgs, mask = model.check_inputs(imgs, mask)
    latent, visible, ids_keep = model.forward_encoder(imgs, mask, model.config.mask_ratio, noise=noise)
    x = model.decoder_embed(latent[:, 1:])
    N, _, Dd = x.shape
    tokens = model.mask_token.expand(N, model.config.num_patches, Dd)
    tokens = tokens.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), x) + model._pos_embed(decoder=True)
    cls = (model.decoder_cls_token + model.decoder_pos_embed_class).expand(N, -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x[:, 1:]))
    return model.forward_loss(imgs, pred, visible, mask), pred, visible


@pytest.mark.parametrize("tube", [False, True])
def test_whole_grid_brain_gives_the_all_token_loss(tube):
    """When every token holds brain, the hidden brain tokens are all masked tokens: the new decoder
    sees the same token set as the all-token one (in another order), so loss and predictions agree."""
    model = small_model(tube_masking=tube)
    with torch.no_grad():  # non-trivial decoder tokens, so a mix-up of positions would show
        model.decoder_cls_token.normal_(std=0.5)
    mask = torch.ones(32, 64, dtype=torch.bool)
    x = clips(3)
    noise = model.draw_noise(3, torch.Generator().manual_seed(5))
    seen = decoder_inputs(model)
    loss, pred, visible = model(x, mask, noise=noise)
    assert seen[0]["tokens"] == 1 + 64
    ref_loss, ref_pred, ref_visible = all_token_decoder_loss(model, x, mask, noise)
    assert torch.equal(visible, ref_visible)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pred[~visible], ref_pred[~visible], atol=1e-5, rtol=1e-5)
    assert loss.item() > 0.5  # an untrained model: a real error, not a zero that matches anything


def test_mixed_masks_pad_and_match_each_clip_alone_in_loss_and_gradient():
    """(N, H, W) masks with different brain counts: the shorter hidden lists are padded, the padding
    is no attention key, the loss is finite and its gradient is the mean of the clips' own."""
    model = small_model()
    masks = torch.stack([brain_mask(), torch.ones(32, 64, dtype=torch.bool), brain_mask().flip(0)])
    masks[2, :, 40:] = False
    brain = model.brain_patches(masks)
    counts = brain.sum(1).tolist()
    assert len(set(counts)) == 3  # three different brain counts
    x = clips(3)
    noise = model.draw_noise(3, torch.Generator().manual_seed(2))
    seen = decoder_inputs(model)
    loss, pred, visible = model(x, masks, noise=noise)
    assert torch.isfinite(loss)
    K = int(visible[0].sum())
    assert seen[0]["tokens"] == 1 + K + (max(counts) - K)
    keys = seen[0]["attn_mask"].reshape(3, -1)  # True = attend
    assert keys.sum(1).tolist() == [1 + c for c in counts]  # cls + visible + this clip's hidden only
    assert torch.equal(pred.abs().sum(-1) > 0, brain & ~visible)
    # the loss on the decoded tokens is the full-grid definition
    torch.testing.assert_close(loss, model.forward_loss(x * masks[:, None, None], pred, visible, masks))
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["mask_token"].abs().sum() > 0 and grads["decoder_cls_token"].abs().sum() > 0
    alone = {n: torch.zeros_like(g) for n, g in grads.items()}
    for b in range(3):
        model.zero_grad()
        (model(x[b:b + 1], masks[b:b + 1], noise=noise[b:b + 1])[0] / 3).backward()
        for n, p in model.named_parameters():
            alone[n] += p.grad
    for n in ("mask_token", "decoder_cls_token", "decoder_blocks.0.attn.qkv.weight", "patch_embed.weight"):
        torch.testing.assert_close(grads[n], alone[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(in_chans=2), dict(t_pred_stride=1), dict(t_pred_stride=2, tube_masking=True)])
def test_decoded_loss_is_the_full_grid_loss(kw):
    """forward's loss (on the decoded tokens only) equals forward_loss over the whole grid."""
    model = small_model(**kw)
    C = model.config.in_chans
    x = torch.randn(2, C, 4, 32, 64, generator=torch.Generator().manual_seed(1))
    masks = torch.stack([brain_mask(), brain_mask().flip(1)])
    loss, pred, visible = model(x, masks, torch.Generator().manual_seed(0))
    full = model.forward_loss(x * masks[:, None, None], pred, visible, masks)
    torch.testing.assert_close(loss, full)
    assert loss.item() > 0.5


def test_an_older_checkpoint_format_is_named(tmp_path):
    from fmri_bench.errors import InputError
    from fmri_bench.models.mae import from_pretrained, save_checkpoint

    model = MaskedAutoencoderViT(preset_config("mae_vit_tiny", embed_dim=16, num_heads=2, depth=1,
                                               decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1))
    save_checkpoint(tmp_path / "old.pt", {"format": "fmri_bench.mae/1", "config": model.config.to_dict(),
                                          "state_dict": model.state_dict()})
    with pytest.raises(InputError, match="older fmri_bench .format 'fmri_bench.mae/1'"):
        from_pretrained(tmp_path / "old.pt")
