"""The joint fMRI-text model (fMRI-LM stage 2) on a tiny random Llama: shapes, the block-causal
mask, the F2F target, LoRA freezing and what a checkpoint holds, exact resume, bad config."""

import pytest
import torch
import yaml

from fmri_bench import cli
from fmri_bench.errors import InputError
from fmri_bench.fmri_lm import (FMRI, MARKER, TEXT, FmriLM, block_causal_mask, build_layout, fmri_lm_config,
                                time_major, tokenizer_inputs)
from fmri_bench.lm import LoadedLM, tiny_random_llm
from fmri_bench.lm_train import load_config, load_model, train

WORDS = ("the a scan of brain is coupling network elevated reduced typical between and male female this "
         "module provides functions for text data files objects with").split()
R, NT, D, K = 5, 3, 8, 7  # parcels, time patches, feature dim, codes


def tiny_llm(seed: int = 0, attn: str = "sdpa") -> LoadedLM:
    """A randomly initialised 2-layer Llama (width 32) with a word-level tokenizer over WORDS."""
    return tiny_random_llm(seed, attn, words=WORDS)


def tiny_model(finetune="lora", attn="sdpa", **kw) -> FmriLM:
    torch.manual_seed(1)
    return FmriLM(tiny_llm(attn=attn), fmri_lm_config(feat_dim=D, n_parcels=R, n_time_patches=NT, n_codes=K,
                                             precision="fp32", finetune=finetune, lora_dropout=0.0, **kw))


TEXTS = ["the scan is elevated", "brain network coupling is reduced and typical"]
PLAIN = ["this module provides functions for text", "data files and objects with text"]


def test_shapes_and_every_trainable_parameter_gets_a_gradient(one_thread):
    m = tiny_model()
    f, c = torch.randn(2, R * NT, D), torch.randint(0, K, (2, R * NT))
    assert m.fmri_embeds(f).shape == (2, NT * R, 32)
    lay = m.layout(TEXTS, with_fmri=True)
    assert ((lay.kind == FMRI).sum(1) == R * NT).all() and ((lay.kind == MARKER).sum(1) == 2).all()
    h = m.hidden(lay, f)
    assert h.shape == (2, lay.ids.shape[1], 32)
    assert m.f2f_logits(h, lay).shape == (2, NT - 1, R, K)
    out = m.losses(f, c, TEXTS, PLAIN)
    assert set(out) == {"f2f", "f2f_acc", "f2t", "t2t", "total"}
    # untrained: the F2F loss sits near chance (ln K), text losses near ln(vocab)
    assert abs(float(out["f2f"].detach()) - torch.log(torch.tensor(float(K)))) < 0.5
    out["total"].backward()
    for n, p in m.named_parameters():
        if p.requires_grad and "lora_A" not in n:  # lora_A's gradient is 0 while lora_B starts at 0
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    with pytest.raises(InputError, match="features have shape"):
        m.losses(torch.randn(2, R * NT + 1, D), c, TEXTS)


def test_block_causal_mask_matrix():
    # blocks: marker 0, time step (1, 1), marker 2, text 3, text 4, then one padded position
    block = torch.tensor([[0, 1, 1, 2, 3, 4, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    m = block_causal_mask(block, valid)[0, 0].int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0, 1]])
    assert torch.equal(m, want)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # a boolean mask, or the additive float one
def test_block_causal_attention_in_the_llm(attn, one_thread):
    """Through the real LLM: a time step sees all its parcels and earlier steps, never later ones;
    the text after the scan sees all of it."""
    m = tiny_model(attn=attn).eval()
    assert m.causal_lm.config._attn_implementation == attn
    f = torch.randn(1, R * NT, D)
    lay = m.layout(TEXTS[:1], with_fmri=True)
    fm = lay.kind[0] == FMRI
    text = lay.kind[0] == TEXT

    def states(x):
        with torch.no_grad():
            h = m.hidden(lay, x)[0]
        return h[fm].reshape(NT, R, -1), h[text]

    base_f, base_t = states(f)
    g = f.clone()
    g[0, torch.arange(R) * NT + 2] += 3.0  # change time step 2 (the last) of every parcel
    f2, t2 = states(g)
    assert torch.allclose(f2[:2], base_f[:2], atol=1e-6)  # steps 0, 1 do not see step 2
    assert not torch.allclose(f2[2], base_f[2], atol=1e-3)
    assert not torch.allclose(t2, base_t, atol=1e-3)  # the text sees it
    g = f.clone()
    g[0, (R - 1) * NT + 1] += 3.0  # the last parcel of time step 1
    f3, _ = states(g)
    assert not torch.allclose(f3[1, 0], base_f[1, 0], atol=1e-3)  # parcel 0 of step 1 sees parcel R-1 (not causal)
    assert torch.allclose(f3[0], base_f[0], atol=1e-6)


def test_f2f_target_is_the_next_time_steps_code():
    m = tiny_model()
    codes = torch.arange(R * NT).reshape(1, R * NT) % K  # parcel-major: token r * NT + t
    tgt = m.f2f_targets(codes)
    for r in range(R):
        for t in range(NT - 1):
            assert int(tgt[0, t, r]) == int(codes[0, r * NT + t + 1])
    own = time_major(codes, R, NT)[:, :-1]
    assert not torch.equal(tgt, own)  # not a token's own code (the upstream leak)
    with pytest.raises(InputError, match="at least 2 time patches"):
        fmri_lm_config(n_time_patches=1)


def test_causal_tokenizer_features_carry_nothing_of_later_time_patches(one_thread):
    from fmri_bench.models.tokenizer import NeuralTokenizer, tokenizer_config

    torch.manual_seed(0)
    tok = NeuralTokenizer(tokenizer_config(n_parcels=4, n_frames=30, patch_len=10, embed_dim=16, num_heads=2,
                                           depth=1, decoder_depth=1, code_dim=8, codebook_size=16, llm_dim=8,
                                           kmeans_init=False))
    x = torch.randn(2, 30, 4)
    y = x.clone()
    y[:, 20:] += 2.0  # the last time patch
    early = torch.arange(4 * 3) % 3 < 2  # tokens of time patches 0 and 1
    fc, cc = tokenizer_inputs(tok, x, causal=True)
    fc2, _ = tokenizer_inputs(tok, y, causal=True)
    assert fc.shape == (2, 12, 16) and cc.shape == (2, 12) and cc.dtype == torch.long
    assert torch.allclose(fc[:, early], fc2[:, early], atol=1e-6)
    fb, cb = tokenizer_inputs(tok, x, causal=False)
    fb2, _ = tokenizer_inputs(tok, y, causal=False)
    assert not torch.allclose(fb[:, early], fb2[:, early], atol=1e-3)  # bidirectional features do leak
    assert torch.equal(cc, cb)  # the codes are the tokenizer's own either way


@pytest.mark.parametrize("finetune", ["lora", "full", "frozen"])
def test_what_trains_and_what_is_saved(finetune, one_thread):
    m = tiny_model(finetune)
    base = {n: p.detach().clone() for n, p in m.causal_lm.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    f, c = torch.randn(2, R * NT, D), torch.randint(0, K, (2, R * NT))
    for _ in range(2):
        m.losses(f, c, TEXTS, PLAIN)["total"].backward()
        opt.step()
        opt.zero_grad()
    changed = [n for n, p in m.causal_lm.named_parameters() if "lora_" not in n and not torch.equal(p, base[n])]
    sd = m.trainable_state_dict()
    heads = {"parcel_pos", "markers", "proj.0.weight", "proj.0.bias", "f2f_head.0.weight", "f2f_head.0.bias",
             "f2f_head.1.weight", "f2f_head.1.bias"}
    assert heads <= set(sd)
    others = set(sd) - heads
    if finetune == "lora":
        assert changed == []  # the base LLM stays frozen
        assert others and all("lora_" in k for k in others)
        assert len(others) == 2 * 7 * 2  # A and B for q/k/v/o/gate/up/down in 2 layers
    elif finetune == "frozen":
        assert changed == [] and others == set()
    else:
        assert changed and len(others) == len(base)


def _cfg(tmp_path, **kw):
    d = {"tokenizer_overrides": {"n_parcels": 4, "n_frames": 30, "patch_len": 10, "embed_dim": 16, "num_heads": 2,
                                 "depth": 1, "decoder_depth": 1, "code_dim": 8, "codebook_size": 16},
         "model_overrides": {"precision": "fp32"},
         "data": {"n_subjects": 6, "windows_per_subject": 2, "t2t_val_paragraphs": 4},
         "batch_size": 2, "t2t_batch_size": 2, "steps": 4, "log_every": 1, "eval_every": 2, "ckpt_every": 2,
         "progress": False, "warmup_steps": 1, "lr": 1e-2, **kw}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_config(path)


def test_resume_is_exact_and_the_checkpoint_holds_no_frozen_weights(tmp_path, one_thread):
    cfg = _cfg(tmp_path)
    full = train(cfg, tmp_path / "a", llm=tiny_llm())
    part = train(cfg, tmp_path / "b", stop_at=2, llm=tiny_llm())
    assert part["step"] == 2
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path / "b", llm=tiny_llm())
    rest = train(cfg, tmp_path / "b", resume=True, llm=tiny_llm())
    assert rest["step"] == 4
    a, b = full["model"].trainable_state_dict(), rest["model"].trainable_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in full["history"] if "loss" in r]
    lb = [r["loss"] for r in rest["history"] if "loss" in r]
    assert la == lb and len(la) == 4
    assert full["val"]["t2t_ppl"] > 1 and "val_t2t_ppl" in full["history"][0]  # step 0: before training
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert all("lora_" in k or not k.startswith("llm.") for k in ck["trainable"])
    # the saved adapter + heads reload to the same outputs, and only on the same LLM
    f = torch.randn(1, 12, 16)
    c = torch.randint(0, 16, (1, 12))
    m1 = full["model"].eval()
    m2 = load_model(tmp_path / "a" / "fmri_lm.pt", tiny_llm())
    with torch.no_grad():
        assert torch.equal(m1.losses(f, c, TEXTS[:1])["total"], m2.losses(f, c, TEXTS[:1])["total"])
    with pytest.raises(InputError, match="another LLM"):
        load_model(tmp_path / "a" / "fmri_lm.pt", tiny_llm(seed=5))


def test_bad_config_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(InputError, match="stepz") as e:
        load_config(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(InputError, match="lora_rank"):
        load_config(None, ["model_overrides.lora_rank=4"])
    with pytest.raises(InputError, match="t2t_txt"):
        load_config(None, ["data.t2t_txt=a.txt"])
    with pytest.raises(InputError, match="finetune must be"):
        load_config(None, ["model_overrides.finetune=half"])
    rc = cli.main(["lm", "align", "--config", str(bad), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "stepz" in err and len(err.splitlines()) == 1


def test_marker_in_text_is_refused():
    m = tiny_model()
    with pytest.raises(InputError, match="fMRI marker"):
        build_layout(m.tokenizer, ["the <fmri> scan"], R, NT)


@pytest.mark.parametrize("name", ["lm_tiny_cpu.yaml", "lm_paper.yaml"])
def test_example_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    mc = fmri_lm_config(cfg.preset, **cfg.model_overrides)
    assert (mc.finetune, mc.lora_r, mc.lora_alpha) == ("lora", 8, 16)  # the paper's LoRA
    if name == "lm_tiny_cpu.yaml":  # 160 fMRI positions: 40 parcels x 4 time patches
        t = cfg.tokenizer_overrides
        assert t["n_parcels"] * t["n_frames"] // t["patch_len"] == 160
    else:
        assert mc.n_codes == 8192 and mc.feat_dim == 384 and not cfg.data.synthetic


def test_cli_align_trains_a_saved_llm(tmp_path, capsys, one_thread):
    llm = tiny_llm()
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    cfg = _cfg(tmp_path, steps=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    rc = cli.main(["lm", "align", "--config", str(path), "--run-dir", str(tmp_path / "run"), "--llm", str(tmp_path / "llm")])
    out = capsys.readouterr().out
    assert rc == 0 and "step 2" in out and (tmp_path / "run" / "fmri_lm.pt").is_file()


def test_a_trained_tokenizer_file_is_used_and_a_swapped_one_refused(tmp_path, one_thread):
    from fmri_bench.models.tokenizer import NeuralTokenizer, tokenizer_config
    from fmri_bench.tokenizer_train import save_tokenizer

    def tok_file(seed):
        torch.manual_seed(seed)
        t = NeuralTokenizer(tokenizer_config(n_parcels=4, n_frames=30, patch_len=10, embed_dim=16, num_heads=2,
                                             depth=1, decoder_depth=1, code_dim=8, codebook_size=16, llm_dim=8))
        save_tokenizer(t, tmp_path / "tokenizer.pt")

    tok_file(0)
    cfg = _cfg(tmp_path, tokenizer=str(tmp_path / "tokenizer.pt"), tokenizer_overrides={})
    res = train(cfg, tmp_path / "run", stop_at=2, llm=tiny_llm())
    assert res["model"].config.n_parcels == 4 and res["model"].config.feat_dim == 16
    tok_file(1)  # another tokenizer at the same path
    with pytest.raises(InputError, match="another tokenizer"):
        train(cfg, tmp_path / "run", resume=True, llm=tiny_llm())


def test_cli_ask_answers_and_refuses_bad_input(tmp_path, capsys, one_thread):
    import numpy as np

    llm = tiny_llm()
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, steps=2).to_dict()))
    assert cli.main(["lm", "align", "--config", str(path), "--run-dir", str(tmp_path / "run"),
                     "--llm", str(tmp_path / "llm")]) == 0
    capsys.readouterr()
    scan = tmp_path / "scan.npy"
    np.save(scan, np.random.default_rng(0).standard_normal((2, 30, 4)).astype(np.float32))
    ck = str(tmp_path / "run" / "fmri_lm.pt")
    rc = cli.main(["ask", "is this scan male or female", "--checkpoint", ck, "--scan", str(scan),
                   "--options", "male", "female"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0].split()[1] in ("male", "female") and "(2 windows)" in out[0]
    probs = [float(line.split(":")[1]) for line in out[1:]]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 2e-3
    np.save(tmp_path / "wrong.npy", np.zeros((1, 30, 5), np.float32))
    for args, msg in [(["--scan", str(tmp_path / "wrong.npy"), "--options", "male", "female"], "5 parcels"),
                      (["--scan", str(scan), "--options", "male", "male"], "more than once")]:
        rc = cli.main(["ask", "q", "--checkpoint", ck, *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, err


def test_cli_ask_parcellates_a_run_file(tmp_path, capsys, one_thread):
    """A CIFTI run is parcellated (Yeo-7: 7 parcels), put at TR 2 s and windowed as the model
    reads it; the same windows as a .npy give the same answer; an atlas the model was not
    trained on and a run too short for one window are one-line errors."""
    import numpy as np

    from fmri_bench import parcels as P
    from fmri_bench.io import write_cifti

    llm = tiny_llm()
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    over = {"n_parcels": 7, "n_frames": 30, "patch_len": 10, "embed_dim": 16, "num_heads": 2, "depth": 1,
            "decoder_depth": 1, "code_dim": 8, "codebook_size": 16}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, steps=2, tokenizer_overrides=over).to_dict()))
    assert cli.main(["lm", "align", "--config", str(path), "--run-dir", str(tmp_path / "run"),
                     "--llm", str(tmp_path / "llm")]) == 0
    ck = str(tmp_path / "run" / "fmri_lm.pt")
    rng = np.random.default_rng(0)
    run = write_cifti(tmp_path / "sub-01_task-rest_bold.dtseries.nii", rng.standard_normal((130, 59412)), tr=1.0)
    capsys.readouterr()
    q = ["ask", "is this scan male or female", "--checkpoint", ck, "--options", "male", "female"]
    assert cli.main(q + ["--scan", str(run), "--atlas", "yeo7"]) == 0
    from_run = capsys.readouterr().out
    assert "(2 windows)" in from_run  # 130 s at TR 2 s: 65 frames, two windows of 30
    windows = P.model_windows(P.parcel_series(run, "yeo7"), length=30)
    np.save(tmp_path / "w.npy", windows)
    assert cli.main(q + ["--scan", str(tmp_path / "w.npy")]) == 0
    assert capsys.readouterr().out == from_run
    short = write_cifti(tmp_path / "short.dtseries.nii", rng.standard_normal((10, 59412)), tr=1.0)
    for args, msg in [(["--scan", str(run), "--atlas", "mmp"], "gives 360 regions (mmp), the model reads 7"),
                      (["--scan", str(run), "--atlas", "mmp", "--networks"], "gives 14 regions (mmp, networks)"),
                      (["--scan", str(short), "--atlas", "yeo7"], "too short")]:
        assert cli.main(q + args) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_named_val_subjects_are_held_out_and_unknown_ones_refused(tmp_path, one_thread):
    cfg = _cfg(tmp_path)
    held = ["sub-001", "sub-004"]  # synthetic_windows' subject ids are sub-000, sub-001, ...
    res = train(cfg, None, llm=tiny_llm(), val_subjects=held)
    tr, va = res["split"]
    w = cfg.data.windows_per_subject
    assert sorted(va.tolist()) == [w, w + 1, 4 * w, 4 * w + 1]  # exactly the named subjects' windows
    assert len(tr) == (cfg.data.n_subjects - 2) * w and set(va.tolist()).isdisjoint(tr.tolist())
    with pytest.raises(InputError, match="val_subjects not in the data"):
        train(cfg, None, llm=tiny_llm(), val_subjects=["nobody"])
