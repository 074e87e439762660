"""fmri-bench lm evaluate on a tiny random Llama: answers on test/ beside chance, the majority
class, a linear probe and FC fitted on fit/; tuned vs zero-shot questions; bad input."""

import json

import numpy as np
import pytest
import yaml

from fmri_bench import cli
from fmri_bench.lm import tiny_random_llm
from fmri_bench.lm_train import load_config
from test_lm_instruct import WORDS

R, T = 4, 30


def _part(folder, subjects, rng):
    """Two windows a subject; males (even subjects) have parcels 0 and 1 driven by one signal
    (FC ~ 0.9), females none: the FC baseline must tell them apart."""
    folder.mkdir(parents=True)
    w, labels, corpus = [], [], []
    for s in subjects:
        male = int(s) % 2 == 0
        for run in ("rfMRI_REST1_LR", "tfMRI_WM_LR"):
            x = rng.standard_normal((T, R)).astype(np.float32)
            if male:
                x[:, 1] = x[:, 0] + 0.3 * rng.standard_normal(T)
            w.append(x)
            rest = "REST" in run
            labels.append({"subject": s, "scan": f"{s}_{run}", "text": "the brain network coupling is typical.",
                           "sex": "Male" if male else "Female", "state": "rest" if rest else "task",
                           "age_years": str(22 + int(s) % 10)})
            corpus.append({"subject": s, "scan": f"{s}_{run}", "text": labels[-1]["text"], "frames": T})
    np.save(folder / "windows.npy", np.stack(w))
    for name, recs in (("labels.jsonl", labels), ("corpus.jsonl", corpus)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    llm = tiny_random_llm(0, words=WORDS, width=32)
    llm.model.save_pretrained(tmp / "llm")
    llm.tokenizer.save_pretrained(tmp / "llm")
    over = [f"tokenizer_overrides={{n_parcels: {R}, n_frames: {T}, patch_len: 10, embed_dim: 16, num_heads: 2, "
            "depth: 1, decoder_depth: 1, code_dim: 8, codebook_size: 16}", "steps=2", "progress=false", "eval_every=0",
            "ckpt_every=0", "data.n_subjects=4", "data.windows_per_subject=1",
            "model_overrides={max_text_tokens: 64, precision: fp32}", "t2t_batch_size=1", "data.t2t_val_paragraphs=2"]
    cfgp = tmp / "c.yaml"
    cfgp.write_text(yaml.safe_dump(load_config(None, over).to_dict()))
    assert cli.main(["lm", "align", "--config", str(cfgp), "--run-dir", str(tmp / "s2"), "--llm", str(tmp / "llm")]) == 0
    rng = np.random.default_rng(0)
    data = tmp / "lmdata"
    _part(data / "fit", [str(100 + i) for i in range(16)], rng)
    _part(data / "test", [str(200 + i) for i in range(8)], rng)
    (data / "split.json").write_text(json.dumps({"seed": 0, "source": "synthetic", "parts": {}}))
    assert cli.main(["lm", "instruct", "--checkpoint", str(tmp / "s2" / "fmri_lm.pt"), "--windows",
                     str(data / "fit" / "windows.npy"), "--labels", str(data / "fit" / "labels.jsonl"),
                     "--questions", "sex", "--steps", "2", "--llm", str(tmp / "llm"), "--run-dir", str(tmp / "s3")]) == 0
    return tmp, data


def test_evaluate_writes_the_table_with_its_yardsticks(trained, capsys):
    tmp, data = trained
    out = tmp / "results" / "lm_answers.json"
    capsys.readouterr()
    assert cli.main(["lm", "evaluate", "--checkpoint", str(tmp / "s3" / "fmri_lm.pt"), "--data", str(data),
                     "--out", str(out), "--llm", str(tmp / "llm"), "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file() and rec["meta"]["tuned questions"] == ["sex"]
    rows = {(r["task"], r["method"].split(":")[0].split(" (")[0]): r for r in rec["rows"]}
    assert {t for t, _ in rows} == {"sex", "state", "age"}  # every question the labels support
    for task, n_classes in (("sex", 2), ("state", 2), ("age", 8)):
        assert rows[(task, "chance")]["mean %"] == pytest.approx(100 / n_classes)
        # a constant answer's balanced accuracy is chance, whatever the class
        assert rows[(task, "majority class of the fit windows")]["mean %"] == pytest.approx(100 / n_classes)
        lm = rows[(task, "fmri-lm")]
        assert lm["n test windows"] == 16 and lm["n test subjects"] == 8 and lm["source"] == "synthetic"
        assert lm["95% CI"][0] <= lm["mean %"] <= lm["95% CI"][1]
    assert rows[("sex", "fmri-lm")]["note"].startswith("tuned") and rows[("state", "fmri-lm")]["note"].startswith("zero")
    assert rows[("sex", "FC baseline")]["mean %"] == 100.0  # the planted coupling of parcels 0 and 1
    assert rows[("age", "mean age of the fit windows")]["MAE years"] > 0 and "MAE years" in rows[("age", "fmri-lm")]
    assert "sex (tuned, synthetic data): the LLM" in printed and "state (zero-shot" in printed
    # the book's results page puts the table beside the paper's HCP sex number, as synthetic
    from fmri_bench import results_page

    spec = next(r for r in results_page.PAPER_ROWS if r.table == "lm_answers")
    cell = results_page.ours(out.parent, spec, synthetic=True)
    assert cell.startswith(f"{rows[('sex', 'fmri-lm')]['mean %']:.1f} %") and cell.endswith("[synthetic]")
    assert "lm evaluate" in cell and results_page.ours(out.parent, spec, synthetic=False) == "not run"


@pytest.mark.parametrize("case", ["no_fit", "missing_label", "not_json"])
def test_evaluate_bad_input_one_line_exit_2_nothing_written(trained, capsys, tmp_path, case):
    import shutil

    tmp, data = trained
    d = tmp_path / "lmdata"
    shutil.copytree(data, d)
    out = tmp_path / "res" / "t.json"
    args = ["lm", "evaluate", "--checkpoint", str(tmp / "s3" / "fmri_lm.pt"), "--data", str(d), "--out", str(out),
            "--llm", str(tmp / "llm")]
    if case == "no_fit":
        shutil.rmtree(d / "fit")
        msg = "no fit/windows.npy"
    elif case == "missing_label":
        args += ["--questions", "fluid"]
        msg = "needs 'fluid_tertile' in every test record"
    else:
        args[args.index(str(out))] = str(tmp_path / "t.csv")
        msg = "results table's .json path"
    capsys.readouterr()
    rc = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "res").exists()
