"""The joint fMRI-text model of fMRI-LM stage 2: a causal LLM that reads tokenizer features.

Follows fMRI-LM (Wei et al., arXiv 2511.21760, section 3.2):

- In: the neural tokenizer's continuous features (B, N, D) with N = R parcels x n_t time
  patches, parcel-major (token ``r * n_t + t``, as ``NeuralTokenizer.encode`` returns them), and
  its code indices (B, N). The features go through Linear + GELU to the LLM width W, a learned
  per-parcel position embedding is added, and the R x n_t vectors enter the LLM as
  ``inputs_embeds`` in time-major order between ``<fmri>`` and ``</fmri>`` (added special
  tokens of the text tokenizer whose embeddings are two learned vectors here, so the frozen
  LLM's vocabulary is left as it is).
- Attention is block-causal: the R tokens of one time patch form one block that sees itself
  and every earlier block; each text token is a block of its own (ordinary causal text). All
  tokens of one block share a position id. Text after ``</fmri>`` sees the whole scan.
- F2F: a separate head (LayerNorm + Linear) on the LLM's last hidden state of token (t, r)
  predicts the code of (t + 1, r), the next time step. The public code, with one time patch,
  predicts a token's own code (a leak). Tokenizer features that were computed with
  bidirectional attention over time also carry the next patch; ``tokenizer_inputs`` computes
  them time-causally (``causal=True``) so the F2F target is not in the input.
- F2T: next-token loss on the scan's descriptor text after the fMRI block. T2T: next-token
  loss on plain text (no fMRI), so the LLM keeps its language.
- LoRA through ``peft`` (r 8, alpha 16 on q/k/v/o/gate/up/down, the paper's); ``finetune=
  "full"`` trains the whole LLM, ``"frozen"`` only the heads. bf16 autocast where the device
  has bf16 matmul (``precision="auto"``); losses in fp32.

``FmriLM.losses`` returns a dict of scalars with ``total``; ``trainable_state_dict`` holds the
adapter and the heads only (the frozen LLM is never saved).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmri_bench.errors import InputError

FMRI_START, FMRI_END = "<fmri>", "</fmri>"
# kinds of sequence position in a Layout
PAD, TEXT, FMRI, MARKER = 0, 1, 2, 3
# LoRA target module names, by model family (the first family whose names the model has wins)
LORA_TARGETS = (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),  # Llama, Qwen, SmolLM
                ("c_attn", "c_proj", "c_fc"))  # GPT-2
FINETUNE = ("lora", "full", "frozen")
PRECISION = ("auto", "fp32", "bf16")


@dataclass
class FmriLMConfig:
    """Joint-model settings; defaults fit the tiny tokenizer and a CPU. Presets: ``PRESETS``."""

    feat_dim: int = 64  # the tokenizer's embed_dim
    n_parcels: int = 360
    n_time_patches: int = 4
    n_codes: int = 256  # the tokenizer's codebook size
    finetune: str = "lora"  # "lora" | "full" | "frozen"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05  # not stated in the paper
    lora_targets: tuple = ()  # empty: the first of LORA_TARGETS the model has
    f2f_weight: float = 1.0
    f2t_weight: float = 1.0
    t2t_weight: float = 1.0
    precision: str = "auto"  # "auto": bf16 where the device has bf16 matmul, else fp32
    max_text_tokens: int = 96  # longer texts are cut at this many tokens (the end is dropped)

    def __post_init__(self):
        self.lora_targets = tuple(str(t) for t in self.lora_targets)
        if self.finetune not in FINETUNE:
            raise InputError(f"finetune must be one of {', '.join(FINETUNE)}, got {self.finetune!r}")
        if self.precision not in PRECISION:
            raise InputError(f"precision must be one of {', '.join(PRECISION)}, got {self.precision!r}")
        if self.n_time_patches < 2 and self.f2f_weight:
            raise InputError(f"n_time_patches is {self.n_time_patches}: next-time-step prediction (F2F) needs "
                             "at least 2 time patches (set f2f_weight=0 or a shorter tokenizer patch_len)")
        for name in ("feat_dim", "n_parcels", "n_time_patches", "n_codes", "lora_r", "max_text_tokens"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


PRESETS = {
    "tiny": {},  # CPU chapters and tests: the tiny tokenizer (64-d features, 256 codes)
    # the paper-size tokenizer (ViT-S 384-d, 8192 codes, patch 16 -> 10 time patches)
    "paper": dict(feat_dim=384, n_codes=8192, n_time_patches=10),
}


def fmri_lm_config(preset: str = "tiny", **overrides) -> FmriLMConfig:
    """A preset with ``overrides`` -> FmriLMConfig; an unknown preset or key is an InputError."""
    if preset not in PRESETS:
        raise InputError(f"unknown fMRI-LM preset {preset!r} (known: {', '.join(PRESETS)})")
    names = {f.name for f in dataclasses.fields(FmriLMConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise InputError(f"unknown fMRI-LM setting(s) {', '.join(map(repr, bad))} (known: {', '.join(sorted(names))})")
    return FmriLMConfig(**{**PRESETS[preset], **overrides})


# --- inputs from the tokenizer ---------------------------------------------------------------
@torch.no_grad()
def tokenizer_inputs(tokenizer, windows: torch.Tensor, causal: bool = True, batch_size: int = 16):
    """A frozen ``NeuralTokenizer`` on windows (n, T, R) -> (features (n, N, D), codes (n, N)).

    causal: the encoder's attention is restricted to the same and earlier time patches (a
    block-causal mask over time), so the feature of (t, r) carries nothing of time t + 1 and
    the F2F target cannot leak through the input (the encoder is run here with that mask, from
    the tokenizer's own patch embedding and position tables). The codes are always the tokenizer's own
    (bidirectional encoder, then the quantiser), i.e. what it would emit for the window.
    """
    was = tokenizer.training
    tokenizer.eval()
    n_t = tokenizer.config.n_time_patches
    n = tokenizer.config.n_tokens
    time = torch.arange(n) % n_t  # parcel-major token order
    mask = time[None, :] > time[:, None] if causal else None  # True = may not attend
    feats, codes = [], []
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        tokenizer.check_inputs(x)
        bidir = tokenizer.encode(x)
        codes.append(tokenizer.quantiser(bidir)[1])
        if causal:
            h = tokenizer.patch_embed(tokenizer.patchify(x)) + tokenizer._pos(tokenizer.parcel_pos, tokenizer.time_pos)
            feats.append(tokenizer.encoder(h, mask=mask))
        else:
            feats.append(bidir)
    tokenizer.train(was)
    return torch.cat(feats), torch.cat(codes)


def time_major(x: torch.Tensor, n_parcels: int, n_time: int) -> torch.Tensor:
    """Parcel-major tokens (B, R * n_t, ...) -> (B, n_t, R, ...)."""
    b = x.shape[0]
    return x.reshape(b, n_parcels, n_time, *x.shape[2:]).transpose(1, 2)


# --- sequence layout and the block-causal mask -----------------------------------------------
@dataclass
class Layout:
    """A batch of sequences, right-padded to L. ids (B, L) token ids (fMRI slots hold the pad
    id); kind (B, L) PAD / TEXT / FMRI / MARKER; block (B, L) attention block (= position id);
    labels (B, L) the token to predict at each position from the one before (-100: none)."""

    ids: torch.Tensor
    kind: torch.Tensor
    block: torch.Tensor
    labels: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.kind != PAD


def build_layout(tok, targets: list[str], n_parcels: int = 0, n_time: int = 0, prompts: list[str] | None = None,
                 max_text_tokens: int = 96, eos: bool = True) -> Layout:
    """Token layout of ``[<fmri> fMRI </fmri>] prompt target [eos]`` per sample -> Layout.

    n_time = 0: no fMRI block (plain text, T2T). The target (and EOS) is what the loss reads;
    the prompt is context only. Each is cut to ``max_text_tokens`` tokens: a target loses its
    end, a prompt its beginning (the question and ``### Answer:`` sit at its end).
    """
    prompts = prompts if prompts is not None else [""] * len(targets)
    if len(prompts) != len(targets):
        raise InputError(f"{len(prompts)} prompts for {len(targets)} targets")
    start, end = tok.convert_tokens_to_ids(FMRI_START), tok.convert_tokens_to_ids(FMRI_END)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = []
    for prompt, target in zip(prompts, targets):
        ids, kind, block, labels, b = [], [], [], [], 0
        if n_time:
            ids.append(start); kind.append(MARKER); block.append(b); labels.append(-100); b += 1
            for _ in range(n_time):
                ids += [pad] * n_parcels; kind += [FMRI] * n_parcels; block += [b] * n_parcels; labels += [-100] * n_parcels
                b += 1
            ids.append(end); kind.append(MARKER); block.append(b); labels.append(-100); b += 1
        p = tok(prompt, add_special_tokens=False)["input_ids"][-max_text_tokens:] if prompt else []
        t = tok(target, add_special_tokens=False)["input_ids"][:max_text_tokens]
        if start in p + t or end in p + t:
            raise InputError(f"text contains the fMRI marker {FMRI_START!r} or {FMRI_END!r}: {(prompt + target)[:60]!r}")
        if eos and tok.eos_token_id is not None:
            t = t + [tok.eos_token_id]
        for j, i in enumerate(p + t):
            ids.append(i); kind.append(TEXT); block.append(b); b += 1
            labels.append(i if j >= len(p) else -100)
        rows.append((ids, kind, block, labels))
    L = max(len(r[0]) for r in rows)
    out = torch.full((4, len(rows), L), 0, dtype=torch.long)
    out[0].fill_(pad)
    out[3].fill_(-100)
    for i, r in enumerate(rows):
        for k in range(4):
            out[k, i, :len(r[k])] = torch.tensor(r[k], dtype=torch.long)
    return Layout(ids=out[0], kind=out[1], block=out[2], labels=out[3])


def block_causal_mask(block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """block, valid (B, L) -> allowed (B, 1, L, L) bool: query i may see key j iff j is a real
    token whose block is not later than i's. A padded query sees only itself (no empty rows)."""
    allowed = (block[:, None, :] <= block[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    eye = torch.eye(block.shape[1], dtype=torch.bool, device=block.device)
    allowed = allowed | (eye & ~valid[:, :, None])
    return allowed[:, None]


# --- the model -------------------------------------------------------------------------------
def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matmul (CUDA: the driver says; CPU: avx512_bf16 / amx_bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lora_targets(model: nn.Module, wanted: tuple = ()) -> list[str]:
    """Module names LoRA wraps: ``wanted`` (each must exist) or the first family of LORA_TARGETS
    the model has."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or
             type(m).__name__ == "Conv1D"}
    if wanted:
        missing = sorted(set(wanted) - names)
        if missing:
            raise InputError(f"LoRA targets {', '.join(missing)} are not linear layers of this LLM "
                             f"(it has: {', '.join(sorted(names))})")
        return list(wanted)
    for family in LORA_TARGETS:
        got = [t for t in family if t in names]
        if got:
            return got
    raise InputError(f"no known attention / MLP projections for LoRA in this LLM (it has: {', '.join(sorted(names))}); "
                     "set lora_targets")


def llm_fingerprint(model: nn.Module) -> str:
    """A short hash of the LLM's architecture and input embeddings: a checkpoint made on another
    LLM is refused by it."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = emb[: min(64, emb.shape[0])].detach().float().flatten()[:4096]
    key = f"{type(model).__name__}|{cfg.vocab_size}|{getattr(cfg, 'hidden_size', None)}|" \
          f"{getattr(cfg, 'num_hidden_layers', None)}|" + ",".join(f"{v:.5f}" for v in head.tolist())
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class FmriLM(nn.Module):
    """The LLM reading fMRI. ``llm``: a ``fmri_bench.lm.LoadedLM`` (its model becomes part of this
    module, LoRA layers are injected into it, and its tokenizer gains the two marker tokens: one
    FmriLM per loaded LLM) and ``cfg``."""

    def __init__(self, llm, cfg: FmriLMConfig | None = None):
        super().__init__()
        cfg = cfg or FmriLMConfig()
        self.config = cfg
        self.tokenizer = llm.tokenizer
        self.tokenizer.add_tokens([FMRI_START, FMRI_END], special_tokens=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.marker_ids = (self.tokenizer.convert_tokens_to_ids(FMRI_START),
                           self.tokenizer.convert_tokens_to_ids(FMRI_END))
        hf = llm.model
        if any("lora_" in n for n, _ in hf.named_modules()):
            raise InputError("this LLM already carries a LoRA adapter (one FmriLM per loaded LLM): load it afresh")
        self.llm_fingerprint = llm_fingerprint(hf)
        for p in hf.parameters():
            p.requires_grad_(cfg.finetune == "full")
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=lora_targets(hf, cfg.lora_targets), bias="none")
            self.llm = get_peft_model(hf, lcfg)
        else:
            self.llm = hf
        w = int(llm.hidden_size)
        self.width = w
        self.proj = nn.Sequential(nn.Linear(cfg.feat_dim, w), nn.GELU())
        self.parcel_pos = nn.Parameter(torch.randn(cfg.n_parcels, w) * 0.02)
        with torch.no_grad():  # the markers start at the mean word embedding
            mean = hf.get_input_embeddings().weight.float().mean(0)
        self.markers = nn.Parameter(mean.repeat(2, 1) + torch.randn(2, w) * 0.02)
        self.f2f_head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.n_codes))

    # the Hugging Face model under the (optional) peft wrapper, with LoRA layers in place
    @property
    def causal_lm(self) -> nn.Module:
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def autocast(self, device: torch.device):
        p = self.config.precision
        on = p == "bf16" or (p == "auto" and bf16_supported(device))
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)

    def check_inputs(self, features: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        c = self.config
        n = c.n_parcels * c.n_time_patches
        if features.ndim != 3 or tuple(features.shape[1:]) != (n, c.feat_dim):
            raise InputError(f"tokenizer features have shape {tuple(features.shape)}, the model expects "
                             f"(batch, {n}, {c.feat_dim}) = (batch, {c.n_parcels} parcels x {c.n_time_patches} "
                             f"time patches, feature dim)")
        if codes is not None and tuple(codes.shape) != tuple(features.shape[:2]):
            raise InputError(f"codes have shape {tuple(codes.shape)}, expected {tuple(features.shape[:2])}")

    def fmri_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, R * n_t, D) parcel-major -> (B, n_t * R, W) time-major LLM inputs."""
        c = self.config
        f = time_major(features, c.n_parcels, c.n_time_patches)  # (B, n_t, R, D)
        e = self.proj(f) + self.parcel_pos  # (B, n_t, R, W)
        return e.reshape(features.shape[0], -1, self.width)

    def layout(self, targets, with_fmri: bool, prompts=None) -> Layout:
        c = self.config
        return build_layout(self.tokenizer, targets, c.n_parcels if with_fmri else 0,
                            c.n_time_patches if with_fmri else 0, prompts, c.max_text_tokens)

    def embed(self, lay: Layout, features: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's input vectors (B, L, W) for a layout: word embeddings, the two learned
        markers, and the scans' projected features (B, N, D) in the fMRI slots."""
        lm = self.causal_lm
        dev = self.parcel_pos.device
        ids, kind = lay.ids.to(dev), lay.kind.to(dev)
        marker = (kind == MARKER)[..., None]
        # the marker ids lie outside the frozen vocabulary: their embeddings are self.markers
        emb = lm.get_input_embeddings()(ids.masked_fill(kind == MARKER, 0))
        emb = torch.where(marker & (ids == self.marker_ids[0])[..., None], self.markers[0].to(emb.dtype), emb)
        emb = torch.where(marker & (ids == self.marker_ids[1])[..., None], self.markers[1].to(emb.dtype), emb)
        if features is not None:
            f = self.fmri_embeds(features.to(dev)).to(emb.dtype)
            emb = emb.masked_scatter((kind == FMRI)[..., None], f)
        return emb

    def run_llm(self, emb: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor, past=None,
                use_cache: bool = False):
        """The LLM body on input vectors emb (B, Lq, W) -> its output (``last_hidden_state``,
        ``cache``, the keys / values, with use_cache). allowed (B, 1, Lq, Lpast + Lq) bool: which keys
        (cached ones first) each query sees; position_ids (B, Lq)."""
        lm = self.causal_lm
        mask = allowed
        if lm.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=emb.dtype, device=emb.device).masked_fill(~mask, torch.finfo(emb.dtype).min)
        return lm.base_model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids,
                             cache=past, use_cache=use_cache)

    def hidden(self, lay: Layout, features: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's last hidden states (B, L, W) for a layout (and its scans' features)."""
        dev = self.parcel_pos.device
        emb = self.embed(lay, features)
        mask = block_causal_mask(lay.block.to(dev), lay.valid.to(dev))
        return self.run_llm(emb, mask, lay.block.to(dev)).last_hidden_state

    def text_loss(self, hidden: torch.Tensor, lay: Layout) -> torch.Tensor:
        """Next-token cross-entropy on the layout's labelled positions -> scalar (nats/token)."""
        labels = lay.labels.to(hidden.device)
        sel = labels[:, 1:] != -100
        h = hidden[:, :-1][sel]  # (M, W): the state before each target token
        logits = self.causal_lm.get_output_embeddings()(h).float()
        return F.cross_entropy(logits, labels[:, 1:][sel])

    def f2f_logits(self, hidden: torch.Tensor, lay: Layout) -> torch.Tensor:
        """Hidden states -> F2F logits (B, n_t - 1, R, K): from time t for the codes of t + 1."""
        c = self.config
        h = hidden[lay.kind.to(hidden.device) == FMRI].reshape(hidden.shape[0], c.n_time_patches, c.n_parcels, -1)
        return self.f2f_head(h[:, :-1]).float()

    def f2f_targets(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, R * n_t) parcel-major -> targets (B, n_t - 1, R): the next time step's codes."""
        c = self.config
        return time_major(codes, c.n_parcels, c.n_time_patches)[:, 1:]

    def losses(self, features: torch.Tensor, codes: torch.Tensor, descriptors: list[str],
               plain: list[str] | None = None, prompts: list[str] | None = None) -> dict:
        """features (B, N, D), codes (B, N), descriptors (B,) texts after the scan (F2T; in
        instruction tuning the answers), plain: T2T texts, prompts (B,): context between the
        scan and its text (no loss) -> dict of scalars (f2f, f2f_acc, f2t, t2t, total)."""
        self.check_inputs(features, codes)
        c = self.config
        dev = self.parcel_pos.device
        out = {}
        total = torch.zeros((), device=dev)
        with self.autocast(dev):
            lay = self.layout(descriptors, with_fmri=True, prompts=prompts)
            h = self.hidden(lay, features)
            if c.f2f_weight:
                logits = self.f2f_logits(h, lay)
                tgt = self.f2f_targets(codes.to(dev))
                out["f2f"] = F.cross_entropy(logits.reshape(-1, c.n_codes), tgt.reshape(-1))
                out["f2f_acc"] = (logits.argmax(-1) == tgt).float().mean().detach()
                total = total + c.f2f_weight * out["f2f"]
            if c.f2t_weight:
                out["f2t"] = self.text_loss(h, lay)
                total = total + c.f2t_weight * out["f2t"]
            if plain and c.t2t_weight:
                lay_t = self.layout(plain, with_fmri=False)
                out["t2t"] = self.text_loss(self.hidden(lay_t), lay_t)
                total = total + c.t2t_weight * out["t2t"]
        out["total"] = total
        return out

    @torch.no_grad()
    def text_nll(self, texts: list[str], batch_size: int = 8) -> float:
        """Mean next-token NLL (nats/token) of plain texts; exp() of it is the perplexity."""
        tot, n = 0.0, 0
        dev = self.parcel_pos.device
        for i in range(0, len(texts), batch_size):
            lay = self.layout(texts[i:i + batch_size], with_fmri=False)
            m = int((lay.labels[:, 1:] != -100).sum())
            with self.autocast(dev):
                tot += float(self.text_loss(self.hidden(lay), lay)) * m
            n += m
        return tot / max(n, 1)

    # --- what a checkpoint holds ---
    def trainable_state_dict(self) -> dict:
        """The trained parameters only: LoRA adapter + heads (+ the LLM with finetune='full')."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, sd: dict, source=None) -> None:
        want = {n for n, p in self.named_parameters() if p.requires_grad}
        got = set(sd)
        if want != got:
            diff = sorted(want ^ got)
            raise InputError(f"checkpoint does not fit this model ({len(want - got)} parameters missing, "
                             f"{len(got - want)} unexpected, e.g. {diff[0]})", source)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for n, v in sd.items():
                if params[n].shape != v.shape:
                    raise InputError(f"checkpoint parameter {n} has shape {tuple(v.shape)}, the model "
                                     f"{tuple(params[n].shape)}", source)
                params[n].copy_(v)
