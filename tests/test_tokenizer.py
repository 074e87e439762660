"""The neural tokenizer: VQ round trip and code usage, gradient reversal, soft SigLIP, exact
resume, one-line errors (tiny shapes, offline, no LLM: text features are random stand-ins)."""

import json

import numpy as np
import pytest
import torch

from fmri_bench import cli
from fmri_bench import tokenizer_train as tt
from fmri_bench.errors import InputError
from fmri_bench.models.tokenizer import (
    NeuralTokenizer, Quantiser, codebook_usage, grad_reverse, grl_strength, soft_siglip_loss, tokenizer_config)

SMALL = dict(n_parcels=12, n_frames=32, patch_len=8, embed_dim=32, depth=1, decoder_depth=1, num_heads=2,
             code_dim=8, codebook_size=16, llm_dim=16, align_dim=16, adv_hidden=16)


def test_vq_round_trip_and_code_usage(one_thread):
    """Points drawn around 8 well-separated unit directions: after k-means init + EMA the
    quantiser maps each to (almost) its centre and uses at least 8 codes."""
    torch.manual_seed(0)
    cfg = tokenizer_config("tiny", code_dim=8, codebook_size=16, cosine=True)
    q = Quantiser(cfg, 8)
    centres = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    label = torch.randint(0, 8, (4, 256))
    h = centres[label] + 0.01 * torch.randn(4, 256, 8)
    q.train()
    for _ in range(5):
        out, idx, _ = q.vq(h)
    out, idx, _ = q.vq(h)
    err = ((out - torch.nn.functional.normalize(h, dim=-1)) ** 2).sum(-1).mean()
    assert err < 0.01
    # codes do not mix clusters: every used code holds points of one cluster only
    for code in torch.unique(idx):
        assert len(torch.unique(label[idx == code])) == 1
    use = codebook_usage(idx, 16)
    assert use["used"] >= 8 and use["perplexity"] > 6


def test_codebook_usage_numbers():
    idx = torch.tensor([0, 0, 1, 1])
    u = codebook_usage(idx, 4)
    assert u["used"] == 2 and u["dead_fraction"] == 0.5 and abs(u["perplexity"] - 2.0) < 1e-9


def test_grad_reverse_flips_gradient():
    x = torch.randn(5, requires_grad=True)
    (grad_reverse(x, 0.3) * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(5.0))
    assert grl_strength(0.0) == 0.0 and 0.99 < grl_strength(1.0) < 1.0


def test_adversarial_gradient_reaches_encoder(one_thread):
    """Only the adversarial loss: the encoder gets a gradient, opposite in sign to the one it
    would get without the reversal."""
    torch.manual_seed(0)
    m = NeuralTokenizer(tokenizer_config("tiny", **SMALL))
    x, words = torch.randn(2, 32, 12), torch.randn(40, 16)
    grads = []
    for strength in (1.0, -1.0):
        m.zero_grad()
        feats = m.encode(x)
        loss, _ = m.align.adversarial(feats, words, strength, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(m.patch_embed.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], -grads[1], atol=1e-6)


@pytest.mark.parametrize("subspace", [False, True])
def test_domain_classifier_in_the_word_subspace(one_thread, subspace):
    """4-d encoder tokens mapped into a 32-d LLM width exactly as the words' main 4-d structure
    is made (words = mean + z A + isotropic noise): in the full width a classifier tells them
    apart by the words' noise outside the 4-d subspace; inside the words' top-4 principal
    directions (adv_word_subspace) it stays near chance."""
    g = torch.Generator().manual_seed(0)
    a, mean = torch.randn(4, 32, generator=g), torch.randn(32, generator=g)
    words = mean + torch.randn(1000, 4, generator=g) @ a + 0.3 * torch.randn(1000, 32, generator=g)
    tokens = mean + torch.randn(1000, 4, generator=g) @ a
    late = tt.domain_separability(tokens, words, steps=300, lr=1e-2, subspace_dim=4 if subspace else None, adv_hidden=32)
    assert (late > 0.9) if not subspace else (late < 0.65), late


def test_siglip_matched_lower_than_shuffled():
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=-1)
    f = torch.nn.functional.normalize(t + 0.1 * torch.randn(16, 32, generator=g), dim=-1).requires_grad_()
    matched = soft_siglip_loss(f, t, 0.125)
    shuffled = soft_siglip_loss(f, t[torch.randperm(16, generator=g)], 0.125)
    assert matched < shuffled
    matched.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_forward_shapes_and_losses(one_thread):
    torch.manual_seed(0)
    m = NeuralTokenizer(tokenizer_config("tiny", **SMALL))
    out = m(torch.randn(3, 32, 12), torch.randn(3, 16), torch.randn(40, 16))
    assert out.quantized.shape == (3, 12 * 4, 8) and out.indices.shape == (3, 48)
    assert out.recon.shape == (3, 32, 12)
    assert {"recon", "commit", "adv", "siglip", "total"} <= set(out.losses)
    with pytest.raises(InputError, match="expects"):
        m(torch.randn(3, 32, 11))


def test_fsq_option(one_thread):
    m = NeuralTokenizer(tokenizer_config("tiny", **{**SMALL, "quantizer": "fsq", "fsq_levels": [4, 4], "code_dim": 2}))
    out = m(torch.randn(2, 32, 12))
    assert out.indices.max() < 16 and m.quantiser.n_codes == 16


def test_bad_config_keys():
    with pytest.raises(InputError, match="unknown tokenizer setting"):
        tokenizer_config("tiny", depht=3)
    with pytest.raises(InputError, match="unknown tokenizer preset"):
        tokenizer_config("huge")
    with pytest.raises(InputError, match="bogus"):
        tt.load_config(None, ["bogus=1"])
    with pytest.raises(InputError, match="did you mean 'steps'"):
        tt.load_config(None, ["stesp=1"])
    with pytest.raises(InputError, match="did you mean 'n_subjects'"):
        tt.load_config(None, ["data={n_subject: 3}"])


@pytest.mark.parametrize("override,msg", [
    ("steps=0", "steps must be >= 1"), ("batch_size=1", "batch_size must be >= 2"), ("lr=0", "lr must be > 0"),
    ("lr=abc", "lr must be a number"), ("steps=2.5", "steps must be a whole number"),
    ("progress=3", "progress must be true or false"), ("data.val_fraction=0", "val_fraction must be > 0"),
    ("data.n_subjects=1", "n_subjects must be >= 2")])
def test_bad_config_values_are_one_line_errors(override, msg):
    with pytest.raises(InputError, match=msg):
        tt.load_config(None, [override])
    assert tt.load_config(None, []).lr > 0  # the defaults pass
    assert tt.load_config(None, ["lr=1e-3"]).lr == 1e-3  # YAML 1.1 reads this as a string


def _cfg(tmp_path, **kw):
    over = ["preset=tiny", "model_overrides={n_parcels: 12, n_frames: 32, patch_len: 8, embed_dim: 32, depth: 1, "
            "decoder_depth: 1, num_heads: 2, code_dim: 8, codebook_size: 16}", "llm=none", "progress=false",
            "steps=6", "log_every=1", "eval_every=3", "ckpt_every=2", "batch_size=4",
            "data.n_subjects=6", "data.windows_per_subject=2"]
    return tt.load_config(None, over + [f"{k}={v}" for k, v in kw.items()])


def _feats(n):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 16, generator=g), torch.randn(30, 16, generator=g)


def test_resume_is_exact(tmp_path, one_thread):
    cfg = _cfg(tmp_path)
    data = tt.synthetic_windows(6, 2, 32, 12, 0)
    full = tt.train(cfg, tmp_path / "a", data=data, text_feats=_feats(12))
    tt.train(cfg, tmp_path / "b", data=data, text_feats=_feats(12), stop_at=4)
    resumed = tt.train(cfg, tmp_path / "b", resume=True, data=data, text_feats=_feats(12))
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    def strip(recs):  # timings differ run to run; every loss and eval number must agree
        return [{k: v for k, v in r.items() if k != "clips_s"} for r in recs]

    assert strip(tt.read_metrics(tmp_path / "a")) == strip(tt.read_metrics(tmp_path / "b"))
    assert (tmp_path / "b" / "tokenizer.pt").is_file()
    again = tt.load_tokenizer(tmp_path / "b" / "tokenizer.pt").state_dict()
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_run_dir_refuses_overwrite_and_other_config(tmp_path, one_thread):
    data = tt.synthetic_windows(6, 2, 32, 12, 0)
    tt.train(_cfg(tmp_path, steps=2), tmp_path / "r", data=data, text_feats=_feats(12))
    with pytest.raises(InputError, match="already holds a checkpoint"):
        tt.train(_cfg(tmp_path, steps=2), tmp_path / "r", data=data, text_feats=_feats(12))
    with pytest.raises(InputError, match="different config"):
        tt.train(_cfg(tmp_path, steps=2, lr=0.5), tmp_path / "r", resume=True, data=data, text_feats=_feats(12))


def test_training_reduces_reconstruction(tmp_path, one_thread):
    data = tt.synthetic_windows(6, 2, 32, 12, 0)
    res = tt.train(_cfg(tmp_path, steps=40, lr=3e-3, eval_every=40), None, data=data, text_feats=_feats(12))
    recs = [r["recon"] for r in res["history"] if "recon" in r]
    assert np.mean(recs[-5:]) < 0.8 * np.mean(recs[:3])


def test_real_data_inputs(tmp_path, one_thread):
    w = np.random.default_rng(0).standard_normal((4, 32, 12)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "subject": f"s{i}"}) + "\n" for i in range(3)))
    cfg = _cfg(tmp_path, **{"data.synthetic": "false", "data.windows": str(tmp_path / "w.npy"),
                            "data.corpus": str(tmp_path / "c.jsonl")})
    with pytest.raises(InputError, match="3 corpus records for 4 windows"):
        tt.train(cfg, None)


@pytest.mark.parametrize("argv, msg", [
    (["steps=2", "nosuch=1"], "nosuch"),
    (["--llm", "/no/such/model", "steps=1"], "LLM path not found"),
    (["data.synthetic=false", "data.windows=/no/w.npy", "data.corpus=/no/c.jsonl", "llm=none"], "file not found"),
])
def test_cli_bad_inputs_exit_2(tmp_path, capsys, argv, msg):
    rc = cli.main(["tokenizer", "--run-dir", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1


def test_mae_tokenizer_quantises_frozen_patch_features(tmp_path, one_thread):
    """The flat-map MAE as tokenizer: codes per brain patch, MAE frozen, heads trainable."""
    from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config
    from fmri_bench.models.tokenizer import MAEFeatures, MAETokenizer

    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(preset_config("mae_vit_tiny", img_size=(16, 32), num_frames=16, depth=1, decoder_depth=1))
    mae.save_pretrained(tmp_path / "mae.pt")
    feats = MAEFeatures.from_pretrained(tmp_path / "mae.pt")
    tok = MAETokenizer(feats, tokenizer_config("tiny", **{**SMALL, "llm_dim": 16}))
    clips, mask = torch.randn(3, 1, 16, 16, 32), torch.ones(16, 32, dtype=torch.bool)
    out = tok(clips, mask, torch.randn(3, 16), torch.randn(40, 16))
    n_patches = (16 // 8) * (32 // 8)
    assert out.indices.shape == (3, n_patches) and out.quantized.shape == (3, n_patches, 8)
    out.losses["total"].backward()
    assert all(p.grad is None for p in feats.parameters())
    assert tok.quantiser.proj[0].weight.grad.abs().sum() > 0
    tok.train()
    assert not feats.mae.training


@pytest.mark.parametrize("name", ["tokenizer_tiny_cpu.yaml", "tokenizer_paper.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / name
    cfg = tt.load_config(str(path))
    mcfg = tokenizer_config(cfg.preset, **cfg.model_overrides)
    assert mcfg.n_frames % mcfg.patch_len == 0
    if cfg.preset == "paper":
        assert (mcfg.embed_dim, mcfg.depth, mcfg.num_heads, mcfg.codebook_size, mcfg.code_dim) == (384, 12, 6, 8192, 128)
        assert mcfg.siglip_temperature == 0.125 and mcfg.adv_weight == 0.5 and mcfg.ema_decay == 0.99


def test_padding_is_left_out_of_the_reconstruction_loss(one_thread):
    """Windows padded at the end (lengths): what sits in the padding changes neither the
    reconstruction loss nor the pooled embedding's input tokens."""
    torch.manual_seed(0)
    m = NeuralTokenizer(tokenizer_config("tiny", **SMALL)).eval()
    x = torch.randn(2, 32, 12)
    y = x.clone()
    y[:, 16:] = 100.0  # only the padding differs; the encoder still sees it, so compare masks
    lengths = torch.tensor([16, 16])
    w = m.token_weight(lengths, 2)[..., 0]
    assert w.shape == (2, 48) and w.sum() == 2 * 12 * 2  # 2 of 4 time patches per parcel are real
    fm = m.frame_mask(lengths, 2)
    assert fm[:, :16].all() and not fm[:, 16:].any()
    out = m(x, lengths=lengths)
    manual = ((out.recon - x)[:, :16] ** 2).mean()
    assert torch.allclose(out.losses["recon"], manual, atol=1e-6)
    assert not torch.allclose(m(x).losses["recon"], manual)


def test_text_centre_removes_common_component(one_thread):
    """Anisotropic text states (a shared component dominating): centred on the training mean,
    their projections are no longer all alike, so the soft SigLIP targets are not all ~1."""
    torch.manual_seed(0)
    m = NeuralTokenizer(tokenizer_config("tiny", **SMALL))
    states = 50 * torch.randn(1, 16) + torch.randn(20, 16)
    t = m.align.embed_text(states)
    before = (t @ t.T)[~torch.eye(20, dtype=torch.bool)].mean()
    m.align.set_text_centre(states)
    t = m.align.embed_text(states)
    after = (t @ t.T)[~torch.eye(20, dtype=torch.bool)].mean()
    assert before > 0.9 and after.abs() < 0.2


def test_mae_tokenizer_training_on_precomputed_features(tmp_path, one_thread):
    """train_mae_tokenizer lowers the feature reconstruction below the training-mean yardstick's
    start, leaves the MAE untouched, and evaluate_mae_tokenizer retrieves by scan."""
    from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config
    from fmri_bench.models.tokenizer import MAEFeatures, MAETokenizer

    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(preset_config("mae_vit_tiny", img_size=(16, 32), num_frames=16, depth=1, decoder_depth=1))
    feats = MAEFeatures(mae)
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    g = np.random.default_rng(0)
    patch = g.standard_normal((12, 8, feats.dim)).astype(np.float32)
    brain = np.ones((12, 8), bool)
    brain[:, -2:] = False
    patch[~brain] = 0
    cf = tt.ClipFeatures(patch, brain, [f"s{i // 2}_r" for i in range(12)], [f"s{i // 2}" for i in range(12)])
    tok = MAETokenizer(feats, tokenizer_config("tiny", **{**SMALL, "llm_dim": 16}))
    states, words = torch.randn(12, 16), torch.randn(30, 16)
    hist = tt.train_mae_tokenizer(tok, cf, np.arange(8), states, words, steps=30, batch_size=4, lr=3e-3)
    assert np.mean([h["recon"] for h in hist[-5:]]) < np.mean([h["recon"] for h in hist[:3]])
    assert all(torch.equal(before[k], v) for k, v in mae.state_dict().items())
    res = tt.evaluate_mae_tokenizer(tok, cf, np.arange(8, 12), states, words)
    assert {"recon_mse", "perplexity", "domain_acc", "top1", "chance_top1"} <= set(res)
    assert res["chance_top1"] == 0.5  # two held-out scans, two clips each
    y = tt.feature_yardsticks(cf, np.arange(8), np.arange(8, 12))
    assert y["pca32"] <= y["pca8"] <= y["mean"] * 1.01
    assert tt.scan_of_shard_key("sub-100121_rfMRI_REST1_LR_Atlas_MSMAll_b24cf2c64d") == "100121_rfMRI_REST1_LR"


def test_per_window_yardsticks_average_to_the_pooled_ones_on_equal_lengths():
    from fmri_bench.tokenizer_train import recon_yardsticks

    rng = np.random.default_rng(0)
    tr, va = rng.standard_normal((6, 10, 5)), rng.standard_normal((4, 10, 5))
    va[1] *= 3.0  # one loud window
    y = recon_yardsticks(tr, va, ks=(2,), val_lengths=np.array([10, 10, 10, 10]), per_window=True)
    assert y["zero_windows"].shape == (4,) and np.isclose(y["zero_windows"].mean(), y["zero"])
    assert np.argmax(y["zero_windows"]) == 1
    assert np.isclose(y["zero_windows"][0], (va[0] ** 2).mean())
    short = recon_yardsticks(tr, va, ks=(2,), val_lengths=np.array([10, 4, 10, 10]), per_window=True)
    assert np.isclose(short["zero_windows"][1], (va[1, :4] ** 2).mean())  # only the real frames


def test_paired_difference_resamples_subjects_and_the_verdict_reads_the_interval():
    from fmri_bench.tokenizer_train import paired_difference, recon_verdict

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(10), 4)
    a = 1.0 + 0.1 * rng.standard_normal(40)
    d = paired_difference(a - 0.5, a, groups, rng=np.random.default_rng(0))
    assert np.isclose(d["mean"], -0.5) and d["ci95"][1] < 0 and d["n_groups"] == 10
    same = paired_difference(a + 0.01 * rng.standard_normal(40), a, groups)
    assert same["ci95"][0] < 0 < same["ci95"][1]
    text = recon_verdict("tok", {"PCA-8": d, "zero": same})
    assert "below PCA-8" in text and "not told from zero" in text
    # a subject-level effect: clustered differences give a wider interval than i.i.d. windows would
    clustered = np.repeat(rng.standard_normal(10), 4)
    wide = paired_difference(clustered, np.zeros(40), groups)
    narrow = paired_difference(clustered, np.zeros(40), np.arange(40))
    assert wide["ci95"][1] - wide["ci95"][0] > 1.5 * (narrow["ci95"][1] - narrow["ci95"][0])


def test_padding_tokens_never_reach_the_codebook(one_thread):
    """Quantiser(mask=): k-means init and the EMA update see real tokens only, so what sits in
    the padding tokens leaves the codebook and the commitment loss unchanged (not so unmasked)."""
    from fmri_bench.models.tokenizer import Quantiser

    cfg = tokenizer_config("tiny", **{**SMALL, "dead_code_threshold": 0.5})
    assert cfg.dead_code_threshold == 0.5
    z = torch.randn(2, 48, cfg.embed_dim)
    z2 = z.clone()
    z2[:, 24:] = 50.0 * torch.randn(2, 24, cfg.embed_dim)
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[:, :24] = True

    def run(x, m):
        torch.manual_seed(3)
        qz = Quantiser(cfg, cfg.embed_dim).train()
        _, idx, commit = qz(x, m)
        _, idx, commit = qz(x, m)  # after init: one EMA update
        return qz.vq._codebook.embed.detach().clone(), idx[:, :24], commit.detach()

    a, b = run(z, mask), run(z2, mask)
    assert torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.allclose(a[2], b[2])
    c, d = run(z, None), run(z2, None)
    assert not torch.allclose(c[0], d[0])
