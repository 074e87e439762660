"""Asking the fMRI-LM a question (stage 3): the prompt, and constrained decoding.

- ``build_prompt``: fMRI-LM's prompt (Wei et al., arXiv 2511.21760, section 3.3),
  ``{dataset info}{descriptors}### Question: {q}\\n### Answer:``; the scan's fMRI block comes
  before it, between ``<fmri>`` and ``</fmri>``.
- ``score_options``: constrained decoding. The answer is the allowed option with the highest
  log-likelihood ``sum_i log p(option token i | scan, prompt, earlier option tokens)``, the
  option followed by EOS (what instruction tuning trains), each option after a space as in
  `` Male`` / `` Female``. The shared prefix (``<fmri>``, the scan, ``</fmri>``, the prompt)
  is read once per scan and its keys / values cached (the LLM's KV cache); that cache is
  repeated for the K options and only the option tokens of all B x K rows are read, in one
  batched pass (``share_prefix=False``: the whole sequence B x K times, the same numbers up to
  rounding). In fp32 (bf16 can flip a near tie). The public code samples among the allowed
  tokens instead (T 0.8).
- ``answer``: the chosen option and the options' probabilities (softmax over the
  log-likelihoods) per scan.

Bad input (no options, an empty or duplicated option, a prompt longer than the model reads)
raises ``InputError`` with one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmri_bench.errors import InputError
from fmri_bench.fmri_lm import FmriLM, block_causal_mask, build_layout

PROMPT = "{dataset_info}{descriptors}### Question: {question}\n### Answer:"


def build_prompt(question: str, descriptors: str = "", dataset_info: str = "") -> str:
    """The stage-3 prompt. dataset_info / descriptors end with their own separator (a newline)."""
    if not question.strip():
        raise InputError("empty question")
    return PROMPT.format(dataset_info=dataset_info, descriptors=descriptors, question=question.strip())


def check_options(options) -> list[str]:
    """The allowed answers, stripped -> list; none, an empty one or a duplicate is an InputError."""
    opts = [str(o).strip() for o in options]
    if not opts:
        raise InputError("the question has no answer options")
    if any(not o for o in opts):
        raise InputError(f"an answer option is empty: {list(options)!r}")
    dup = sorted({o for o in opts if opts.count(o) > 1})
    if dup:
        raise InputError(f"answer option(s) {', '.join(map(repr, dup))} given more than once")
    return opts


def _check_prompt(model: FmriLM, prompts: list[str]) -> None:
    tok, limit = model.tokenizer, model.config.max_text_tokens
    for p in prompts:
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise InputError(f"prompt is {n} tokens, longer than max_text_tokens ({limit}): its first {n - limit} "
                             f"tokens (dataset info / descriptors) would be cut; shorten it or raise max_text_tokens")
    ctx = getattr(model.causal_lm.config, "max_position_embeddings", None)
    need = model.config.n_time_patches + 2 + limit + 8
    if ctx is not None and need > ctx:
        raise InputError(f"the model reads {ctx} positions; fMRI ({model.config.n_time_patches} time steps) + "
                         f"markers + {limit} prompt tokens + the answer need up to {need}")


@torch.no_grad()
def score_options(model: FmriLM, features: torch.Tensor, prompts: list[str], options,
                  share_prefix: bool = True) -> torch.Tensor:
    """features (B, N, D), prompts (B,) -> log-likelihood of each option (B, K), fp32.

    share_prefix: read each scan's prefix (fMRI block + prompt) once into the KV cache, then the
    B x K option continuations in one pass; False: one forward pass over the B x K full
    sequences (the reference the cached path must agree with)."""
    opts = check_options(options)
    model.check_inputs(features)
    if len(prompts) != len(features):
        raise InputError(f"{len(prompts)} prompts for {len(features)} scans")
    _check_prompt(model, prompts)
    score = _score_cached if share_prefix else _score_full
    return score(model, features, list(prompts), opts)


def _option_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (M, L, V) predicting labels (M, L) (-100: none) -> summed log-likelihood (M,)."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(1)


def _score_full(model: FmriLM, features: torch.Tensor, prompts: list[str], opts: list[str]) -> torch.Tensor:
    b, k = len(features), len(opts)
    lay = model.layout([" " + o for _ in range(b) for o in opts], with_fmri=True,
                       prompts=[p for p in prompts for _ in range(k)])
    h = model.hidden(lay, features.repeat_interleave(k, 0))  # fp32: no autocast here
    labels = lay.labels.to(h.device)[:, 1:]
    ll = _option_logp(model.causal_lm.get_output_embeddings()(h[:, :-1]), labels)
    return ll.reshape(b, k)


def _score_cached(model: FmriLM, features: torch.Tensor, prompts: list[str], opts: list[str]) -> torch.Tensor:
    c, tok, dev = model.config, model.tokenizer, model.parcel_pos.device
    b, k = len(features), len(opts)
    head = model.causal_lm.get_output_embeddings()
    # 1. the prefixes <fmri> scan </fmri> prompt, right-padded to Lp, once per scan
    pre = build_layout(tok, [""] * b, c.n_parcels, c.n_time_patches, prompts, c.max_text_tokens, eos=False)
    valid, block = pre.valid.to(dev), pre.block.to(dev)  # (B, Lp)
    out = model.run_llm(model.embed(pre, features), block_causal_mask(block, valid), block, use_cache=True)
    last = valid.sum(1) - 1  # (B,) the last real prefix token: its state predicts option token 0
    rows = torch.arange(b, device=dev)
    first = out.last_hidden_state[rows, last]  # (B, W)
    start = block[rows, last] + 1  # (B,) position id of option token 0
    cache = out.cache
    cache.batch_repeat_interleave(k)  # row i * K + j: scan i, option j
    # 2. the options " opt" + EOS, right-padded to Lo; each sees its scan's real prefix tokens (not
    #    the prefix padding) and its own earlier tokens
    opt = build_layout(tok, [" " + o for o in opts], 0, 0, None, c.max_text_tokens)
    ovalid, oblock = opt.valid.to(dev), opt.block.to(dev)  # (K, Lo), oblock = 0, 1, ...
    lo = ovalid.shape[1]
    see_prefix = valid[:, None, None, :] & ovalid[None, :, :, None]  # (B, K, Lo, Lp)
    see_self = block_causal_mask(oblock, ovalid)[:, 0].expand(b, k, lo, lo)  # (B, K, Lo, Lo)
    allowed = torch.cat([see_prefix, see_self], -1).reshape(b * k, 1, lo, -1)
    pos = start.repeat_interleave(k)[:, None] + oblock.repeat(b, 1)  # (B K, Lo)
    h = model.run_llm(model.embed(opt).repeat(b, 1, 1), allowed, pos, past=cache).last_hidden_state
    # the state before option token t: the prefix's last for t = 0, option token t - 1 after
    before = torch.cat([first.repeat_interleave(k, 0)[:, None], h[:, :-1]], 1)  # (B K, Lo, W)
    labels = opt.labels.to(dev).repeat(b, 1)  # (B K, Lo): the option's tokens, -100 on padding
    return _option_logp(head(before), labels).reshape(b, k)


def answer(model: FmriLM, features: torch.Tensor, prompts: list[str], options) -> list[dict]:
    """Constrained answers -> per scan {"answer": option, "probabilities": {option: p}}."""
    opts = check_options(options)
    was = model.training
    model.eval()
    ll = score_options(model, features, prompts, opts)
    model.train(was)
    probs = ll.softmax(-1)
    return [{"answer": opts[int(row.argmax())], "probabilities": dict(zip(opts, map(float, row)))} for row in probs]


@torch.no_grad()
def generate(model: FmriLM, features: torch.Tensor, prompts: list[str] | None = None,
             max_new_tokens: int = 48) -> list[str]:
    """Free (greedy) generation after each scan (and its prompt) -> the texts, up to EOS or
    ``max_new_tokens``. One scan at a time, the whole sequence re-read each token (no cache):
    meant for a few held-out scans, e.g. their descriptors next to the truth."""
    from fmri_bench.fmri_lm import TEXT, Layout, build_layout

    model.check_inputs(features)
    prompts = prompts if prompts is not None else [""] * len(features)
    if prompts and any(prompts):
        _check_prompt(model, prompts)
    was = model.training
    model.eval()
    c, tok = model.config, model.tokenizer
    head = model.causal_lm.get_output_embeddings()
    out = []
    for i in range(len(features)):
        lay = build_layout(tok, [""], c.n_parcels, c.n_time_patches, [prompts[i]], c.max_text_tokens, eos=False)
        ids, kind, block = lay.ids, lay.kind, lay.block
        new = []
        for _ in range(max_new_tokens):
            h = model.hidden(Layout(ids, kind, block, torch.full_like(ids, -100)), features[i:i + 1])
            nxt = int(head(h[:, -1]).float().argmax(-1))
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            kind = torch.cat([kind, torch.tensor([[TEXT]])], 1)
            block = torch.cat([block, block[:, -1:] + 1], 1)
        out.append(tok.decode(new, skip_special_tokens=True))
    model.train(was)
    return out
