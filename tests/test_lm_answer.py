"""Stage-3 answering: the prompt, and constrained decoding scoring every option in one pass."""

import pytest
import torch

from fmri_bench.errors import InputError
from fmri_bench.lm_answer import answer, build_prompt, check_options, generate, score_options
from tests.test_fmri_lm import NT, D, R, tiny_model

OPTS = ["male", "female"]


def test_prompt_format():
    p = build_prompt("Is this scan male or female?", "Coupling is elevated.\n", "Dataset: synthetic.\n")
    assert p == "Dataset: synthetic.\nCoupling is elevated.\n### Question: Is this scan male or female?\n### Answer:"
    with pytest.raises(InputError, match="empty question"):
        build_prompt("  ")


@pytest.mark.parametrize("bad, msg", [([], "no answer options"), (["male", " "], "empty"),
                                      (["male", "male "], "more than once")])
def test_bad_options(bad, msg):
    with pytest.raises(InputError, match=msg):
        check_options(bad)


def test_batched_scores_equal_one_sequence_at_a_time(one_thread):
    m = tiny_model().eval()
    f = torch.randn(3, R * NT, D)
    opts = ["male", "brain network coupling"]  # different lengths: padding must not change a score
    p = [build_prompt("the scan is"), build_prompt("a brain scan of the network is"), build_prompt("is")]
    ll = score_options(m, f, p, opts)
    assert ll.shape == (3, 2) and (ll < 0).all()
    for i in range(3):
        for k, o in enumerate(opts):
            one = score_options(m, f[i:i + 1], p[i:i + 1], [o])
            assert torch.allclose(ll[i, k], one[0, 0], atol=1e-5)
    swapped = score_options(m, f, p, opts[::-1])
    assert torch.allclose(swapped, ll.flip(1), atol=1e-5)


@pytest.mark.parametrize("sdpa", [True, False])
def test_shared_prefix_cache_gives_the_full_pass_scores(one_thread, sdpa):
    """The KV-cached path (each scan's prefix read once) against B x K full sequences: prompts of
    different lengths (different prefix padding), options of 1-3 tokens, under sdpa and eager."""
    m = tiny_model().eval()
    if not sdpa:
        m.causal_lm.config._attn_implementation = "eager"
    f = torch.randn(4, R * NT, D)
    p = [build_prompt("the scan is"), build_prompt("a brain scan of the network coupling is"),
         build_prompt("is"), build_prompt("which one")]
    opts = ["male", "brain network coupling", "scan of"]
    cached = score_options(m, f, p, opts)
    full = score_options(m, f, p, opts, share_prefix=False)
    assert cached.shape == (4, 3)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
    assert not torch.allclose(cached[:, 0], cached[:, 1], atol=1e-3)  # the options are told apart


def test_prompt_longer_than_the_model_reads_is_refused():
    m = tiny_model(max_text_tokens=8)
    with pytest.raises(InputError, match="would be cut"):
        score_options(m, torch.randn(1, R * NT, D), [build_prompt("the scan " * 10)], OPTS)


@pytest.fixture(scope="module")
def planted():
    """A toy: the sign of one fMRI feature is the answer (+1 male, -1 female); a few LoRA steps
    on instruction examples (prompt -> answer)."""
    torch.set_num_threads(1)
    m = tiny_model(f2f_weight=0.0, t2t_weight=0.0)
    g = torch.Generator().manual_seed(0)

    def scans(n):
        y = torch.randint(0, 2, (n,), generator=g)
        f = 0.1 * torch.randn(n, R * NT, D, generator=g)
        f[:, :, 0] += (1 - 2 * y)[:, None].float()
        return f, y

    prompt = build_prompt("is this scan male or female")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    codes = torch.zeros(8, R * NT, dtype=torch.long)
    for _ in range(80):  # 40 suffice for scoring; greedy generation needs EOS to lose at the first token
        f, y = scans(8)
        m.losses(f, codes, [" " + OPTS[i] for i in y], prompts=[prompt] * 8)["total"].backward()
        opt.step()
        opt.zero_grad()
    return m.eval(), scans, prompt


def test_constrained_decoding_picks_the_planted_answer(planted):
    """After training, the constrained answer is right on new scans (chance: 50 %)."""
    m, scans, prompt = planted
    f, y = scans(64)
    out = answer(m, f, [prompt] * 64, OPTS)
    acc = sum(o["answer"] == OPTS[i] for o, i in zip(out, y.tolist())) / 64
    assert acc >= 0.9, acc
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in out)


def test_greedy_generation_says_the_planted_answer(planted):
    m, scans, prompt = planted
    f, y = scans(16)
    texts = generate(m, f, [prompt] * 16, max_new_tokens=4)
    assert sum(t.strip() == OPTS[i] for t, i in zip(texts, y.tolist())) >= 14, texts
