"""The results page: paper numbers beside ours, each cell labelled with its source."""

import json

from fmri_bench import results_page


def write(results, name, rows, synthetic=True):
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps({"name": name, "meta": {"profile": "book", "synthetic": synthetic},
                                                      "rows": rows}))


def test_page_puts_paper_numbers_beside_ours_with_sources(tmp_path):
    res = tmp_path / "results"
    write(res, "ch04_state_decoding", [
        {"task": "state21", "method": "mae cls", "mean %": 6.3, "95% CI": "[2.0, 10.7]"},
        {"task": "state21", "method": "mae avg_patch", "mean %": 8.8, "95% CI": "[4.6, 13.1]"},
        {"task": "state21 +5 s", "method": "fc", "mean %": 5.8, "95% CI": "[4.8, 6.7]"},
        {"task": "state21", "method": "fc", "mean %": 13.0, "95% CI": "[10.1, 16.0]"}])
    write(res, "ch05_trait_decoding", [{"task": "sex rest->task", "method": "fc", "mean %": 61.0, "95% CI": "[50, 72]"}],
          synthetic=False)
    text = results_page.page(res)
    row = next(line for line in text.splitlines() if line.startswith("| HCP 21-class state: flat-map MAE"))
    # the best of the matching rows, its interval and name, labelled synthetic; the paper's labelled paper
    assert "99.0 % (published comparison, test accuracy) [paper]" in row
    assert "8.8 % [4.6, 13.1] (mae avg_patch; book profile) [synthetic]" in row and row.endswith("| not run |")
    fc = next(line for line in text.splitlines() if line.startswith("| HCP 21-class state: FC linear"))
    assert "13.0 % [10.1, 16.0] (fc; book profile) [synthetic]" in fc  # not the +5 s row
    sex = next(line for line in text.splitlines() if line.startswith("| sex: FC"))
    assert sex.endswith("| not run | 61.0 % [50, 72] (sex rest->task; book profile) [real] |"), sex
    assert "| HCP sex, BrainLM | 81.1 % (results table) [paper] | no counterpart here |" in text


def test_every_paper_row_is_labelled_and_names_its_table():
    for r in results_page.PAPER_ROWS:
        assert r.paper.endswith(")") and "arXiv" in r.paper or "Brainmarks" in r.paper, r
        assert r.table is None or r.key, r
