"""The offline LLM loader: GGUF -> safetensors gives the same logits; bad paths exit 2."""

import pytest
import torch

from fmri_bench import cli, lm
from fmri_bench.errors import InputError

PROMPT = "The capital of France is"


@pytest.mark.slow  # reads the GGUF (~25 s on 2 cores)
def test_gguf_and_cached_safetensors_give_same_logits(tmp_path):
    model, tok = lm.load_from_gguf(lm.default_gguf_file())
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0, -1]
    out = lm.convert_default(tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    cached = lm.load_llm(out)
    got = lm.logits(cached, PROMPT)
    assert torch.allclose(ref, got, atol=1e-4)
    assert tok.decode(int(got.argmax())).strip() == "Paris"
    assert cached.hidden_size == 576
    states = lm.text_states(cached, ["a short text", "another, longer text here"])
    assert states.shape == (2, 576) and torch.isfinite(states).all()
    # the last-token state of a padded text equals the state of the text alone
    alone = lm.text_states(cached, ["a short text"])
    assert torch.allclose(states[0], alone[0], atol=1e-4)
    words = lm.word_embeddings(cached, ["a short text"])
    assert words.shape[1] == 576 and len(words) == len(set(cached.tokenizer("a short text")["input_ids"]))


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="LLM path not found"):
        lm.load_llm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot load a causal LM"):
        lm.load_llm(tmp_path / "empty")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(InputError, match="bad.gguf"):
        lm.load_llm(tmp_path / "bad.gguf")


def test_cli_unreadable_model_exits_2(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    rc = cli.main(["tokenizer", "--run-dir", str(tmp_path / "r"), "--llm", str(tmp_path / "m"), "steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(tmp_path / "m") in err and len(err.splitlines()) == 1
