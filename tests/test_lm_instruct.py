"""fMRI-LM stage 3 on a tiny random Llama: examples never state their answer, few-shot subsets
are class-balanced and test-disjoint, tuning learns a planted mapping, resume is exact, the
saved adapter reloads to identical answers, constrained decoding picks a planted answer."""

import numpy as np
import pytest
import torch

from fmri_bench import descriptors as D
from fmri_bench import lm_instruct as I
from fmri_bench.errors import InputError
from fmri_bench.fmri_lm import FmriLM, fmri_lm_config
from fmri_bench.lm import TINY_WORDS, tiny_random_llm

WORDS = TINY_WORDS + tuple("what sex participant from or report participant's was this recorded at during "
                           "resting doing in state brain male female dataset an fmri cohort cortical regions tr "
                           "2 s . ? : ### , '".split())
R, NT, D_ = 3, 2, 8


def model(seed=1):
    torch.manual_seed(seed)
    return FmriLM(tiny_random_llm(0, words=WORDS, width=32),
                  fmri_lm_config(feat_dim=D_, n_parcels=R, n_time_patches=NT, n_codes=5, precision="fp32",
                                 lora_dropout=0.0, max_text_tokens=64))


def planted(n=24, seed=0):
    """Windows whose first feature is +2 for males and -2 for females; subjects own 2 windows."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"s{i:02d}" for i in range(n // 2)], 2)
    male = np.repeat(rng.permutation(np.arange(n // 2) % 2 == 0), 2)
    f = torch.randn(n, R * NT, D_, generator=torch.Generator().manual_seed(seed)) * 0.1
    f[:, :, 0] = torch.from_numpy(np.where(male, 2.0, -2.0)).float()[:, None]
    labels = {"sex": np.where(male, "Male", "Female"), "state": np.where(np.arange(n) % 2, "task", "rest"),
              "fluid_tertile": np.array(["lower", "mean", "higher"])[np.arange(n) % 3],
              "paradigm": np.array(list(I.PARADIGMS.values()))[np.arange(n) % len(I.PARADIGMS)],
              "age_bin": I.age_bin(22 + np.arange(n) % 16), "age_years": I.age_years(22 + np.arange(n) % 16)}
    return f, labels, subjects


def test_examples_never_state_the_answer_and_follow_the_prompt_template():
    f, labels, subjects = planted()
    texts = ["the brain network coupling is elevated"] * len(f)
    assert set(I.QUESTIONS) == {"sex", "state", "fluid", "paradigm", "age_bin", "age"}  # every type is checked
    for kind in I.QUESTIONS:
        exs = I.examples(labels, texts, range(len(f)), [kind], n_regions=R, seed=0)
        q = I.QUESTIONS[kind]
        assert len(exs) == len(f) and {e[2] for e in exs} == set(q.options)
        for i, prompt, ans, k in exs:
            assert prompt.endswith("### Answer:") and k == kind
            context = prompt.split("### Question:")[0]  # dataset info + descriptors
            assert D.label_leaks(context, {"answer": ans}) == [], context
            assert ans.lower() not in context.lower()
        assert len({e[1] for e in exs}) > 1  # paraphrases vary
    nodesc = I.examples(labels, texts, [0], ["sex"], n_regions=R, descriptors=False)
    assert "coupling" not in nodesc[0][1]
    with pytest.raises(InputError, match="unknown question type"):
        I.examples(labels, texts, [0], ["iq"], n_regions=R)
    with pytest.raises(InputError, match="needs per-window labels"):
        I.examples({"sex": labels["sex"]}, texts, [0], ["state"], n_regions=R)


def test_age_and_paradigm_labels():
    assert I.age_bin([22, 25.9, 26, 30.5, 31, 35.99, 36, 37.2]).tolist() == [
        "22-25", "22-25", "26-30", "26-30", "31-35", "31-35", "36+", "36+"]
    assert I.age_years([22.0, 29.7, 37.9]).tolist() == ["22", "29", "37"]
    with pytest.raises(InputError, match="22-37"):
        I.age_years([21.5, 30])
    with pytest.raises(InputError, match="start at 22"):
        I.age_bin([19])
    assert [I.paradigm_label(r) for r in ("rfMRI_REST1_LR", "tfMRI_WM_RL", "tfMRI_MOTOR_LR", "task-REST2")] == [
        "rest", "working memory", "motor", "rest"]
    with pytest.raises(InputError, match="names none of the paradigms"):
        I.paradigm_label("func_run-01")


def test_numeric_question_reports_the_mean_absolute_error():
    y, pred = ["22", "30", "25", "36"], ["24", "30", "25", "30"]  # errors 2, 0, 0, 6
    mae, ci = I.mae_with_ci(y, pred, ["a", "b", "c", "d"], n_boot=200)
    assert mae == 2.0 and ci[0] <= 2.0 <= ci[1] and ci[1] <= 6.0 and ci[0] >= 0.0
    f, labels, subjects = planted()
    exs = I.examples(labels, [""] * len(f), range(len(f)), ["age"], n_regions=R, descriptors=False)
    res = I.evaluate(model(), f, exs, subjects, n_boot=20)
    truth = np.array([e[2] for e in exs], float)
    assert res["mae"] == pytest.approx(np.abs(truth - np.array(res["predictions"], float)).mean())
    assert "mae" not in I.evaluate(model(), f, I.examples(labels, [""] * len(f), range(len(f)), ["sex"],
                                                          n_regions=R, descriptors=False), subjects, n_boot=20)


def test_few_shot_subjects_are_balanced_and_disjoint_from_test_and_its_families():
    subs = [f"s{i}" for i in range(20)]
    cls = ["M" if i % 2 else "F" for i in range(20)]
    fam = [f"f{i // 2}" for i in range(20)]  # s0/s1 one family, ...
    test = ["s0", "s3"]
    for k in (2, 4, 8):
        shots = I.few_shot_subjects(subs, cls, k, test, families=fam, seed=k)
        assert len(shots) == 2 * k and len(set(shots)) == 2 * k
        assert sum(cls[subs.index(s)] == "M" for s in shots) == k
        assert not {"s0", "s1", "s2", "s3"} & set(shots)  # the test subjects and their families
    with pytest.raises(InputError, match="has only"):
        I.few_shot_subjects(subs, cls, 9, test, families=fam)


def test_tuning_learns_a_planted_feature_to_answer_mapping_and_resume_is_exact(tmp_path):
    f, labels, subjects = planted()
    texts = [""] * len(f)
    exs = I.examples(labels, texts, range(len(f)), ["sex"], n_regions=R, seed=0, descriptors=False)
    m = model()
    before = I.evaluate(m, f, exs, subjects)
    hist = I.instruct_train(m, f, exs, steps=60, batch_size=8, lr=5e-3, seed=0)
    after = I.evaluate(m, f, exs, subjects)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert after["balanced_accuracy"] == 1.0 and after["p_right"] > 0.65 > 0.55 > before["p_right"]
    # resume: 6 steps in one go == 3 steps, stop, 3 more
    a, b = model(), model()
    ha = I.instruct_train(a, f, exs, steps=6, batch_size=4, seed=2, run_dir=tmp_path / "a", ckpt_every=3)
    I.instruct_train(b, f, exs, steps=6, batch_size=4, seed=2, run_dir=tmp_path / "b", ckpt_every=3, stop_at=3)
    with pytest.raises(InputError, match="already holds"):
        I.instruct_train(model(), f, exs, steps=6, run_dir=tmp_path / "b")
    b2 = model()
    hb = I.instruct_train(b2, f, exs, steps=6, batch_size=4, seed=2, run_dir=tmp_path / "b", ckpt_every=3, resume=True)
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], abs=1e-6)
    sa, sb = a.trainable_state_dict(), b2.trainable_state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_saved_adapter_reloads_to_identical_answers(tmp_path):
    from fmri_bench.lm_train import save_model, load_model

    f, labels, subjects = planted()
    exs = I.examples(labels, [""] * len(f), range(len(f)), ["state"], n_regions=R, descriptors=False)
    m = model()
    I.instruct_train(m, f, exs, steps=3, batch_size=4)
    save_model(m, tmp_path / "m.pt", "tok")
    again = load_model(tmp_path / "m.pt", tiny_random_llm(0, words=WORDS, width=32), "tok")
    a, b = I.evaluate(m, f, exs, subjects), I.evaluate(again, f, exs, subjects)
    assert a["predictions"] == b["predictions"] and a["p_right"] == pytest.approx(b["p_right"], abs=1e-6)


def test_balanced_accuracy_and_subject_bootstrap():
    y = np.array(["a"] * 8 + ["b"] * 2)
    assert I.balanced_accuracy(y, ["a"] * 10) == 0.5  # majority guessing is chance
    assert I.balanced_accuracy(y, y) == 1.0
    ci = I.subject_bootstrap(y, y, np.arange(10))
    assert ci == [1.0, 1.0]
    rng = np.random.default_rng(0)
    yy = rng.choice(["a", "b"], 200)
    lo, hi = I.subject_bootstrap(yy, rng.choice(["a", "b"], 200), np.repeat(np.arange(50), 4))
    assert lo < 0.5 < hi


def test_tertiles_use_training_subjects_only():
    v = np.array([0, 1, 2, 3, 4, 5, 100, 200, 300.0])
    lab = I.tertile_labels(v, [1, 1, 1, 1, 1, 1, 0, 0, 0])
    assert list(lab[:6]) == ["lower", "lower", "mean", "mean", "higher", "higher"]
    assert set(lab[6:]) == {"higher"}


def test_descriptors_are_cut_at_sentence_ends_to_fit_the_prompt():
    m = model()
    f, labels, subjects = planted()
    text = "the brain network coupling is elevated. the scan is typical. the network is reduced."
    full = I.examples(labels, [text] * len(f), [0], ["sex"], n_regions=R, paraphrase=0)[0][1]
    n_full = len(m.tokenizer(full, add_special_tokens=False)["input_ids"])
    cut = I.examples(labels, [text] * len(f), [0], ["sex"], n_regions=R, paraphrase=0, fit=(m.tokenizer, n_full - 2))[0][1]
    assert len(m.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= n_full - 2
    assert "the scan is typical." in cut and "reduced" not in cut  # the last sentence went, whole
    none = I.examples(labels, [text] * len(f), [0], ["sex"], n_regions=R, paraphrase=0, fit=(m.tokenizer, 5))[0][1]
    assert "coupling" not in none and none.endswith("### Answer:")


def test_cli_instruct_tunes_a_stage2_model_and_refuses_bad_input(tmp_path, capsys):
    import json

    import yaml

    from fmri_bench import cli
    from fmri_bench.lm_train import load_config

    llm = tiny_random_llm(0, words=WORDS, width=32)
    llm.model.save_pretrained(tmp_path / "llm")
    llm.tokenizer.save_pretrained(tmp_path / "llm")
    over = ["tokenizer_overrides={n_parcels: 4, n_frames: 30, patch_len: 10, embed_dim: 16, num_heads: 2, depth: 1, "
            "decoder_depth: 1, code_dim: 8, codebook_size: 16}", "steps=2", "progress=false", "eval_every=0",
            "ckpt_every=0", "data.n_subjects=4", "data.windows_per_subject=1", "model_overrides={max_text_tokens: 64, "
            "precision: fp32}", "t2t_batch_size=1", "data.t2t_val_paragraphs=2"]
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(load_config(None, over).to_dict()))
    assert cli.main(["lm", "align", "--config", str(cfgp), "--run-dir", str(tmp_path / "s2"), "--llm", str(tmp_path / "llm")]) == 0
    ck = str(tmp_path / "s2" / "fmri_lm.pt")
    w = np.random.default_rng(0).standard_normal((6, 30, 4)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    lab = tmp_path / "labels.jsonl"
    lab.write_text("".join(json.dumps({"subject": f"s{i // 2}", "sex": "Male" if i % 2 else "Female", "state": "rest",
                                       "text": "the brain network coupling is elevated."}) + "\n" for i in range(6)))
    capsys.readouterr()
    base = ["lm", "instruct", "--checkpoint", ck, "--windows", str(tmp_path / "w.npy"), "--labels", str(lab),
            "--llm", str(tmp_path / "llm"), "--steps", "3"]
    assert cli.main(base + ["--run-dir", str(tmp_path / "s3")]) == 0
    assert "step 3" in capsys.readouterr().out and (tmp_path / "s3" / "fmri_lm.pt").is_file()
    rc = cli.main(["ask", "What is the sex of the participant?", "--checkpoint", str(tmp_path / "s3" / "fmri_lm.pt"),
                   "--scan", str(tmp_path / "w.npy"), "--options", "Male", "Female", "--llm", str(tmp_path / "llm")])
    assert rc == 0 and capsys.readouterr().out.startswith("answer: ")
    np.save(tmp_path / "bad.npy", np.zeros((6, 30, 5), np.float32))
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"subject": "s", "sex": "Male", "text": "the scan is typical. " * 40}) + "\n"
                            for _ in range(6)))
    for args, msg in [(["--windows", str(tmp_path / "bad.npy")], "5 parcels"),
                      (["--labels", str(long)], "longer than max_text_tokens"),
                      (["--questions", "iq"], "unknown question type"),
                      (["--questions", "fluid"], "needs 'fluid_tertile'")]:
        a = list(base)
        for j in range(0, len(args), 2):
            if args[j] in a:
                a[a.index(args[j]) + 1] = args[j + 1]
            else:
                a += args[j:j + 2]
        rc = cli.main(a + ["--run-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x" / "fmri_lm.pt").exists()
    assert cli.main(base + ["--labels", str(long), "--fit-descriptors", "--run-dir", str(tmp_path / "fit")]) == 0
    # the same run from a YAML config (+ key=value overrides; flags win over the file)
    cfg = tmp_path / "i.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint": ck, "windows": str(tmp_path / "w.npy"), "labels": str(lab),
                                   "questions": ["sex"], "steps": 9, "llm": str(tmp_path / "llm")}))
    assert cli.main(["lm", "instruct", "--config", str(cfg), "--run-dir", str(tmp_path / "c1"), "steps=2"]) == 0
    assert "step 2:" in capsys.readouterr().out and (tmp_path / "c1" / "fmri_lm.pt").is_file()
    assert cli.main(["lm", "instruct", "--config", str(cfg), "--run-dir", str(tmp_path / "c2"), "steps=2",
                     "--steps", "1"]) == 0
    assert "step 1:" in capsys.readouterr().out
    for extra, msg in [(["stepz=3"], "unknown instruct config key 'stepz' (did you mean 'steps'?)"),
                       (["steps=0"], "steps must be an integer >= 1"), (["lr=-1"], "lr must be a number > 0"),
                       (["questions=[iq]"], "unknown question type"), (["checkpoint=null"], "no checkpoint")]:
        rc = cli.main(["lm", "instruct", "--config", str(cfg), "--run-dir", str(tmp_path / "y")] + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "y").exists()


def test_shipped_instruct_configs_load():
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    for name in ("instruct_tiny_cpu.yaml", "instruct_paper.yaml"):
        with pytest.raises(InputError, match="no checkpoint"):
            I.load_instruct_config(root / name)
        c = I.load_instruct_config(root / name, ["checkpoint=a.pt", "windows=w.npy", "labels=l.jsonl"])
        assert c.steps >= 1 and c.lr > 0 and set(c.questions) <= set(I.QUESTIONS) and c.descriptors


def test_resume_refuses_another_llm_tokenizer_or_settings(tmp_path):
    f, labels, subjects = planted()
    exs = I.examples(labels, [""] * len(f), range(len(f)), ["sex"], n_regions=R, descriptors=False)
    run = tmp_path / "r"
    kw = dict(steps=4, batch_size=2, seed=0, run_dir=run, ckpt_every=2, tokenizer_fp="tokA", settings={"windows": "w1"})
    I.instruct_train(model(), f, exs, stop_at=2, **kw)
    ck = torch.load(run / "instruct_checkpoint.pt", weights_only=False)
    assert ck["tokenizer"] == "tokA" and ck["settings"]["windows"] == "w1" and ck["step"] == 2
    bad = [(dict(kw, tokenizer_fp="tokB"), "another tokenizer"), (dict(kw, lr=1e-3), "other settings"),
           (dict(kw, settings={"windows": "w2"}), "other settings"), (dict(kw, steps=6), "other settings")]
    for over, msg in bad:
        with pytest.raises(InputError, match=msg):
            I.instruct_train(model(), f, exs, resume=True, **over)
    with pytest.raises(InputError, match="other settings"):  # other examples (another question)
        I.instruct_train(model(), f, I.examples(labels, [""] * len(f), range(len(f)), ["state"], n_regions=R,
                                                descriptors=False), resume=True, **kw)
    other = FmriLM(tiny_random_llm(5, words=WORDS, width=32),
                   fmri_lm_config(feat_dim=D_, n_parcels=R, n_time_patches=NT, n_codes=5, precision="fp32",
                                  lora_dropout=0.0, max_text_tokens=64))
    with pytest.raises(InputError, match="another LLM"):
        I.instruct_train(other, f, exs, resume=True, **kw)
    assert len(I.instruct_train(model(), f, exs, resume=True, **kw)) == 4  # the same settings resume


@pytest.mark.slow
def test_ablation_script_runs_every_variant_on_the_same_shots(capsys):
    """benchmarks/ablate_instruct.py on the smoke cohort with a tiny random Llama: each variant
    trains what it says (frozen: fewer trainable parameters) and the last line is machine-readable."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "ablate_instruct.py"
    spec = importlib.util.spec_from_file_location("ablate_instruct", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res, yard = mod.main(["--llm", "tiny", "--cohort", "smoke", "--windows-per-subject", "2", "--test-per-class", "1",
                          "--tok-steps", "2", "--instruct-steps", "1", "--shot-steps", "1", "--k", "1",
                          "--batch-size", "2", "--n-boot", "20", "--mae-steps", "2"])
    assert set(res) == {"lora", "frozen", "nodesc", "flatmap"}
    assert res["frozen"]["trainable"] < res["lora"]["trainable"] == res["nodesc"]["trainable"]
    assert res["flatmap"]["trainable"] != res["lora"]["trainable"]  # its adapter reads the MAE's width and tokens
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(f.split("=") for f in last.split()[1:])
    assert last.startswith("ablate_instruct ") and fields["data"] == "synthetic"
    for key in ("state_lora", "state_frozen", "state_nodesc", "state_flatmap", "sex_lora", "sex_frozen", "sex_nodesc",
                "sex_flatmap", "sex_probe", "state_runlength", "sex_flatprobe", "state_flatprobe", "seconds"):
        assert 0 <= float(fields[key]) <= (1e6 if key == "seconds" else 100)


@pytest.mark.slow  # the real SmolLM2-135M-Instruct from the cache (< 60 s on 2 cores)
def test_real_default_llm_learns_one_feature_to_sex_in_a_few_steps():
    from fmri_bench.lm import load_llm

    try:
        llm = load_llm(None)
    except InputError as err:
        pytest.skip(f"default LLM not available offline: {err}")
    torch.manual_seed(0)
    m = FmriLM(llm, fmri_lm_config(feat_dim=D_, n_parcels=R, n_time_patches=NT, n_codes=5, precision="fp32",
                                   lora_dropout=0.0, max_text_tokens=64))
    f, labels, subjects = planted(n=8)
    exs = I.examples(labels, [""] * len(f), range(len(f)), ["sex"], n_regions=R, seed=0, descriptors=False,
                     paraphrase=0)
    hist = I.instruct_train(m, f, exs, steps=8, batch_size=4, lr=3e-3, seed=0)
    after = I.evaluate(m, f, exs, subjects, n_boot=10)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert after["balanced_accuracy"] == 1.0, (hist, after)
