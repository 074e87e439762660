"""The fMRI-LM neural tokenizer (stage 1): parcel series -> discrete codes, language-aligned.

Follows fMRI-LM (Wei et al., arXiv 2511.21760, section 3.1):

- Tokens: a window ``x`` (B, T, R) of T time points x R parcels is cut along time only into
  patches of ``patch_len`` frames, giving R x (T / patch_len) tokens (parcel-major). Each token
  is a linear embedding of its patch plus a per-parcel position embedding and a time-patch
  embedding.
- Encoder: a pre-norm transformer; a Tanh-MLP projects to ``code_dim``; the vector quantiser
  is ``vector_quantize_pytorch.VectorQuantize`` (k-means init, EMA decay 0.99, cosine /
  l2-normalised codes, commitment weight) or ``FSQ`` (``quantizer="fsq"``).
- Decoder: the mirror transformer, reconstructing the parcel series (MSE).
- Language consistency against a frozen LLM (inputs precomputed, the LLM never runs here):
  (a) domain-adversarial: encoder tokens -> LLM width -> gradient reversal (strength ramps
  2/(1+e^(-10p))-1 over training progress p) -> Linear-256-GELU-2 classifier that tells fMRI
  tokens from the LLM's input word embeddings of descriptor tokens; weight 0.5. The reversed
  gradient reaches the encoder (the public code detaches it; the paper describes the
  adversarial alignment of the encoder). Optionally (``adv_word_subspace``, ours, off by
  default) both kinds of token are first projected onto the words' top principal directions
  (``LanguageAlignment.word_subspace`` says why).
  (b) soft SigLIP between the pooled fMRI embedding and the LLM's last-token hidden state of
  the scan's descriptor text, both projected to 512-d, temperature 0.125 (the paper's value;
  the public code passes 0.125 but uses 0.07).

``forward`` returns a ``TokenizerOutput`` (quantized, indices, recon, losses dict).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fmri_bench.errors import InputError


@dataclass
class TokenizerConfig:
    """Neural tokenizer settings; defaults are CPU-sized. Presets: ``PRESETS``."""

    n_parcels: int = 360
    n_frames: int = 160
    patch_len: int = 40
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    decoder_depth: int = 2
    mlp_ratio: float = 4.0
    code_dim: int = 32
    codebook_size: int = 256
    quantizer: str = "vq"  # "vq" (VectorQuantize) or "fsq"
    fsq_levels: tuple = (8, 5, 5, 5)
    ema_decay: float = 0.99
    commitment_weight: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.0  # > 0: a code whose EMA use falls below it is re-seeded from the batch
    cosine: bool = True
    llm_dim: int = 576  # hidden size of the frozen LLM (SmolLM2-135M: 576)
    align_dim: int = 512
    adv_hidden: int = 256
    adv_weight: float = 0.5
    # True: the domain classifier sees both kinds of token inside the word embeddings' top principal
    # directions (as many as the encoder has dimensions): an option of ours, off as in the paper;
    # see LanguageAlignment.word_subspace
    adv_word_subspace: bool = False
    siglip_weight: float = 1.0
    siglip_temperature: float = 0.125

    def __post_init__(self):
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        if self.n_frames % self.patch_len:
            raise InputError(f"n_frames ({self.n_frames}) must be a multiple of patch_len ({self.patch_len})")
        if self.embed_dim % self.num_heads:
            raise InputError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.quantizer not in ("vq", "fsq"):
            raise InputError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")

    @property
    def n_time_patches(self) -> int:
        return self.n_frames // self.patch_len

    @property
    def n_tokens(self) -> int:
        return self.n_parcels * self.n_time_patches

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fsq_levels"] = list(self.fsq_levels)
        return d


PRESETS = {
    # CPU chapter / tests
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_depth=2, code_dim=32, codebook_size=256),
    # PAPERS: ViT-S encoder (384 / 12 layers / 6 heads), mirror decoder, codebook 8192 x 128
    "paper": dict(embed_dim=384, depth=12, num_heads=6, decoder_depth=12, code_dim=128, codebook_size=8192,
                  patch_len=16),
}


def tokenizer_config(preset: str = "tiny", **overrides) -> TokenizerConfig:
    if preset not in PRESETS:
        raise InputError(f"unknown tokenizer preset {preset!r} (known: {', '.join(PRESETS)})")
    names = {f.name for f in dataclasses.fields(TokenizerConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise InputError(f"unknown tokenizer setting(s) {', '.join(bad)} (known: {', '.join(sorted(names))})")
    return TokenizerConfig(**{**PRESETS[preset], **overrides})


# --- pieces ----------------------------------------------------------------------------------
class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = float(strength)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def grad_reverse(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-strength`` on the way back."""
    return _GradReverse.apply(x, strength)


def grl_strength(progress: float) -> float:
    """Ganin & Lempitsky's ramp 2 / (1 + e^(-10 p)) - 1 for training progress p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


def soft_siglip_loss(fmri: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft SigLIP: fmri, text (B, D) l2-normalised -> scalar.

    Logits S = f t^T / tau; soft targets P = sigmoid(t t^T / tau) (no gradient) with the
    diagonal set to 1; mean of BCE(S, P) and BCE(S^T, P^T), positives weighted B - 1.
    """
    b = fmri.shape[0]
    logits = fmri @ text.T / temperature
    with torch.no_grad():
        target = torch.sigmoid(text @ text.T / temperature)
        target.fill_diagonal_(1.0)
    pw = torch.tensor(float(max(b - 1, 1)), device=fmri.device)
    a = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
    c = F.binary_cross_entropy_with_logits(logits.T, target.T, pos_weight=pw)
    return 0.5 * (a + c)


def _encoder(dim, depth, heads, mlp_ratio) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


def build_quantizer(cfg: TokenizerConfig) -> nn.Module:
    """The vector quantiser of ``vector-quantize-pytorch`` (VQ with EMA or FSQ) on ``code_dim``."""
    from vector_quantize_pytorch import FSQ, VectorQuantize

    if cfg.quantizer == "fsq":
        return FSQ(levels=list(cfg.fsq_levels), dim=cfg.code_dim)
    return VectorQuantize(dim=cfg.code_dim, codebook_size=cfg.codebook_size, decay=cfg.ema_decay,
                          commitment_weight=cfg.commitment_weight, kmeans_init=cfg.kmeans_init,
                          kmeans_iters=cfg.kmeans_iters, use_cosine_sim=cfg.cosine,
                          threshold_ema_dead_code=cfg.dead_code_threshold,
                          # no cross-rank k-means / EMA: inside a data-parallel stage-2 run every rank
                          # tokenizes the same windows and must get the one-process codebook
                          sync_kmeans=False, sync_codebook=False)


class Quantiser(nn.Module):
    """Tanh-MLP to ``code_dim`` then VQ / FSQ: z (B, N, D) -> (quantized (B, N, code_dim),
    indices (B, N) long, commitment loss scalar)."""

    def __init__(self, cfg: TokenizerConfig, in_dim: int):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh(), nn.Linear(in_dim, cfg.code_dim))
        self.vq = build_quantizer(cfg)

    @property
    def n_codes(self) -> int:
        if self.cfg.quantizer == "fsq":
            return int(math.prod(self.cfg.fsq_levels))
        return self.cfg.codebook_size

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None):
        """``mask`` (B, N) bool, True for real tokens: the VQ's k-means init, EMA codebook update,
        dead-code re-seeding and commitment loss see only those (padding cannot pull codes)."""
        h = self.proj(z)
        if self.cfg.quantizer == "fsq":
            q, idx = self.vq(h)
            commit = h.new_zeros(())
        else:
            q, idx, commit = self.vq(h, mask=mask)
            commit = commit.sum()
        return q, idx.long(), commit


@dataclass
class TokenizerOutput:
    """quantized (B, N, code_dim); indices (B, N); recon (B, T, R) or None; features (B, N, D)
    (encoder output, continuous); losses: dict of scalars with ``total``."""

    quantized: torch.Tensor
    indices: torch.Tensor
    recon: torch.Tensor | None
    features: torch.Tensor
    losses: dict = field(default_factory=dict)


class LanguageAlignment(nn.Module):
    """The two language-consistency heads (domain-adversarial and soft SigLIP)."""

    def __init__(self, cfg: TokenizerConfig, feat_dim: int):
        super().__init__()
        self.cfg = cfg
        self.to_llm = nn.Linear(feat_dim, cfg.llm_dim)
        self.domain = nn.Sequential(nn.Linear(cfg.llm_dim, cfg.adv_hidden), nn.GELU(), nn.Linear(cfg.adv_hidden, 2))
        self.fmri_proj = nn.Linear(feat_dim, cfg.align_dim)
        self.text_proj = nn.Linear(cfg.llm_dim, cfg.align_dim)
        # mean LLM state of the training texts (set_text_centre), subtracted before text_proj
        self.register_buffer("text_centre", torch.zeros(cfg.llm_dim))
        self.feat_dim = feat_dim
        self._subspace = None  # (key, mean, basis) of the last words seen (not saved: recomputed)

    def set_text_centre(self, states: torch.Tensor) -> None:
        """Centre the text states on the training texts' mean (states (n, llm_dim)).

        A causal LM's last-token states are highly anisotropic: on the synthetic descriptor
        corpus any two scans' SmolLM2 states have cosine ~0.98 (min 0.95). The soft SigLIP
        targets sigmoid(t t^T / tau) are then ~1 for every pair, so the loss asks every fMRI
        window to match every text and retrieval cannot rise above chance; centred, the mean
        cosine is ~0."""
        self.text_centre.copy_(states.mean(0).to(self.text_centre))

    def adversarial(self, feats: torch.Tensor, words: torch.Tensor, strength: float, gen=None, weight=None):
        """feats (B, N, D), words (M, llm_dim) -> (loss, accuracy). Class 0 fMRI, 1 text.
        weight (B, N, 1): tokens with weight 0 (padding, off-brain) are never sampled."""
        b, n, _ = feats.shape
        m = words.shape[0]
        valid = torch.arange(b * n) if weight is None else torch.nonzero(weight.reshape(-1).cpu() > 0).flatten()
        k = min(len(valid), m, 512)  # balanced sample of tokens of each kind
        fi = valid[torch.randperm(len(valid), generator=gen)[:k]].to(feats.device)
        wi = torch.randperm(m, generator=gen)[:k].to(feats.device)
        f = self.to_llm(feats.reshape(b * n, -1)[fi])
        x = torch.cat([f, words[wi].to(f.dtype)])
        if self.cfg.adv_word_subspace:
            x = self.word_subspace(x, words)
        y = torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(k, dtype=torch.long)]).to(f.device)
        out = self.domain(grad_reverse(x, strength))
        return F.cross_entropy(out, y), (out.argmax(1) == y).float().mean()

    def word_subspace(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """x (K, llm_dim) -> its projection onto the top-k principal directions of ``words``
        (k = the encoder's width, at most the words' rank), kept in llm_dim coordinates.

        An option of ours (``adv_word_subspace``). The encoder's D-d tokens, mapped linearly to
        the LLM width W > D, lie in a D-d affine subspace, while the word embeddings of a corpus
        span more than D dimensions: a classifier can then tell the two apart by the words'
        spread outside any D-d subspace, whatever the encoder does. Inside the words' top-D
        principal directions both kinds can fill the space. With D >= W (the paper's ViT-B into
        GPT-2, 768 into 768) nothing is projected. Measured in chapter 06 (tiny tokenizer, 64-d
        into SmolLM2's 576-d): it does not matter there, a fresh classifier tells the trained
        tokens from the words at 1.00 either way (their mean norm is ~11x the words'). The basis is an SVD of the words (deterministic; recomputed when
        they change, never saved)."""
        m, w = words.shape
        k = min(self.feat_dim, m - 1)
        if k >= w:
            return x
        key = (tuple(words.shape), words.device, float(words.double().sum()), float(words.double().square().sum()))
        if self._subspace is None or self._subspace[0] != key:
            wf = words.detach().float()
            mean = wf.mean(0)
            _, _, vh = torch.linalg.svd(wf - mean, full_matrices=False)
            self._subspace = (key, mean, vh[:k].T.contiguous())
        _, mean, basis = self._subspace
        mean, basis = mean.to(x.dtype), basis.to(x.dtype)
        return (x - mean) @ basis @ basis.T + mean

    def embed_fmri(self, feats: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, N, D) -> (B, 512) unit vectors of the token mean (``weight`` (B, N, 1): a
        weighted mean, e.g. over brain tokens only)."""
        pooled = feats.mean(1) if weight is None else (feats * weight).sum(1) / weight.sum(1).clamp_min(1)
        return F.normalize(self.fmri_proj(pooled), dim=-1)

    def add_losses(self, cfg: "TokenizerConfig", losses: dict, total: torch.Tensor, feats: torch.Tensor,
                   text_states=None, word_embeds=None, grl: float = 1.0, gen=None, weight=None) -> torch.Tensor:
        """Add the language-consistency terms that apply (domain-adversarial when ``word_embeds``
        are given, soft SigLIP when ``text_states`` are) to ``losses`` -> ``total`` with them."""
        if word_embeds is not None and cfg.adv_weight:
            adv, acc = self.adversarial(feats, word_embeds, grl, gen, weight)
            losses["adv"], losses["domain_acc"] = adv, acc.detach()
            total = total + cfg.adv_weight * adv
        if text_states is not None and cfg.siglip_weight:
            losses["siglip"] = soft_siglip_loss(self.embed_fmri(feats, weight), self.embed_text(text_states),
                                                cfg.siglip_temperature)
            total = total + cfg.siglip_weight * losses["siglip"]
        return total

    def embed_text(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(states - self.text_centre), dim=-1)


class NeuralTokenizer(nn.Module):
    """Parcel-series tokenizer. x (B, T, R) -> TokenizerOutput (N = R x T / patch_len tokens)."""

    def __init__(self, cfg: TokenizerConfig | None = None):
        super().__init__()
        cfg = cfg or TokenizerConfig()
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Linear(cfg.patch_len, d)
        self.parcel_pos = nn.Parameter(torch.randn(cfg.n_parcels, d) * 0.02)
        self.time_pos = nn.Parameter(torch.randn(cfg.n_time_patches, d) * 0.02)
        self.encoder = _encoder(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.quantiser = Quantiser(cfg, d)
        self.dec_embed = nn.Linear(cfg.code_dim, d)
        self.dec_parcel_pos = nn.Parameter(torch.randn(cfg.n_parcels, d) * 0.02)
        self.dec_time_pos = nn.Parameter(torch.randn(cfg.n_time_patches, d) * 0.02)
        self.decoder = _encoder(d, cfg.decoder_depth, cfg.num_heads, cfg.mlp_ratio)
        self.head = nn.Linear(d, cfg.patch_len)
        self.align = LanguageAlignment(cfg, d)

    def _pos(self, parcel, time):
        return (parcel[:, None, :] + time[None, :, :]).reshape(-1, parcel.shape[-1])  # parcel-major

    def check_inputs(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 3 or tuple(x.shape[1:]) != (c.n_frames, c.n_parcels):
            raise InputError(f"parcel windows have shape {tuple(x.shape)}, the tokenizer expects "
                             f"(batch, {c.n_frames}, {c.n_parcels}) = (batch, frames, parcels)")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, R) -> (B, R * n_t, patch_len), parcel-major."""
        b, t, r = x.shape
        c = self.config
        return x.transpose(1, 2).reshape(b, r, c.n_time_patches, c.patch_len).reshape(b, r * c.n_time_patches, c.patch_len)

    def unpatchify(self, p: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = p.shape[0]
        return p.reshape(b, c.n_parcels, c.n_frames).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, R) -> continuous encoder features (B, N, D)."""
        self.check_inputs(x)
        h = self.patch_embed(self.patchify(x)) + self._pos(self.parcel_pos, self.time_pos)
        return self.encoder(h)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """(B, N, code_dim) -> reconstructed (B, T, R)."""
        h = self.dec_embed(q) + self._pos(self.dec_parcel_pos, self.dec_time_pos)
        return self.unpatchify(self.head(self.decoder(h)))

    def frame_mask(self, lengths: torch.Tensor | None, batch: int) -> torch.Tensor:
        """lengths (B,) real frames of each window (None: all) -> (B, T, 1) float, 1 on real frames."""
        t = torch.arange(self.config.n_frames)
        if lengths is None:
            return torch.ones(batch, self.config.n_frames, 1)
        return (t[None, :] < torch.as_tensor(lengths).reshape(-1, 1)).float().unsqueeze(-1)

    def token_weight(self, lengths: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, N, 1) float: 1 for a token whose time patch holds at least one real frame, else 0."""
        c = self.config
        start = torch.arange(c.n_time_patches) * c.patch_len
        lengths = torch.full((batch,), c.n_frames) if lengths is None else torch.as_tensor(lengths).reshape(-1)
        w = (start[None, :] < lengths[:, None]).float()  # (B, n_t)
        return w[:, None, :].expand(batch, c.n_parcels, c.n_time_patches).reshape(batch, -1, 1)  # parcel-major

    def forward(self, x: torch.Tensor, text_states: torch.Tensor | None = None,
                word_embeds: torch.Tensor | None = None, grl: float = 1.0, gen=None,
                lengths: torch.Tensor | None = None) -> TokenizerOutput:
        """x (B, T, R); text_states (B, llm_dim) of each window's descriptor (or None);
        word_embeds (M, llm_dim) LLM input embeddings of descriptor tokens (or None); lengths (B,)
        real frames of each window (``parcels.model_windows`` pads short runs at the end): the
        reconstruction loss covers real frames only, and tokens of all-padding patches are left
        out of the pooled embedding and the domain classifier's sample (None: no padding)."""
        feats = self.encode(x)
        w = None if lengths is None else self.token_weight(lengths, len(x)).to(x.device)
        q, idx, commit = self.quantiser(feats, None if w is None else w[..., 0] > 0)
        recon = self.decode(q)
        m = self.frame_mask(lengths, len(x)).to(x.device)
        rec = (((recon - x) ** 2) * m).sum() / (m.sum() * x.shape[2]).clamp_min(1)
        losses = {"recon": rec, "commit": commit}
        losses["total"] = self.align.add_losses(self.config, losses, rec + commit, feats, text_states, word_embeds,
                                                grl, gen, weight=w)
        return TokenizerOutput(q, idx, recon, feats, losses)


# --- the flat-map MAE as tokenizer -----------------------------------------------------------
class MAETokenizer(nn.Module):
    """The flat-map MAE encoder as tokenizer: its frozen patch features, quantised like the
    parcel tokenizer's, with the same alignment heads. Only ``MAEFeatures`` touches the MAE.

    clips (B, C, T, H, W) + mask -> TokenizerOutput (recon: the decoder reconstructs the MAE's
    patch features, not the image; ``losses['recon']`` is their MSE).
    """

    def __init__(self, features: "MAEFeatures", cfg: TokenizerConfig | None = None):
        super().__init__()
        cfg = cfg or TokenizerConfig()
        self.config = cfg
        self.features = features
        d = features.dim
        self.quantiser = Quantiser(cfg, d)
        self.dec = nn.Sequential(nn.Linear(cfg.code_dim, d), nn.GELU(), nn.Linear(d, d))
        self.align = LanguageAlignment(cfg, d)

    def forward(self, clips, mask, text_states=None, word_embeds=None, grl: float = 1.0, gen=None) -> TokenizerOutput:
        feats, brain = self.features(clips, mask)
        return self.tokenize(feats, brain, text_states, word_embeds, grl, gen)

    def tokenize(self, feats, brain, text_states=None, word_embeds=None, grl: float = 1.0, gen=None) -> TokenizerOutput:
        """Precomputed frozen patch features (B, L, D) and brain (B, L) bool -> TokenizerOutput
        (the MAE is frozen, so its features can be computed once per clip)."""
        q, idx, commit = self.quantiser(feats)
        recon = self.dec(q)
        w = brain.unsqueeze(-1).float()
        rec = ((recon - feats) ** 2 * w).sum() / (w.sum() * feats.shape[-1]).clamp_min(1)
        losses = {"recon": rec, "commit": commit}
        losses["total"] = self.align.add_losses(self.config, losses, rec + commit, feats, text_states, word_embeds,
                                                grl, gen, weight=w)
        return TokenizerOutput(q, idx, recon, feats, losses)


class MAEFeatures(nn.Module):
    """Adapter: a frozen flat-map MAE -> patch features (B, L, D) and brain mask (B, L).

    The one place that depends on ``fmri_bench.models.mae`` (``from_pretrained`` and
    ``forward_features``)."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae.eval()
        for p in self.mae.parameters():
            p.requires_grad_(False)
        self.dim = int(mae.config.embed_dim)

    @classmethod
    def from_pretrained(cls, path) -> "MAEFeatures":
        from fmri_bench.models import mae

        return cls(mae.from_pretrained(path))

    def train(self, mode: bool = True):  # the MAE stays frozen in eval mode
        super().train(mode)
        self.mae.eval()
        return self

    @torch.no_grad()
    def forward(self, clips, mask):
        out = self.mae.forward_features(clips, mask)
        return out["patch"], out["brain"]


# --- diagnostics -----------------------------------------------------------------------------
def codebook_usage(indices: torch.Tensor, n_codes: int) -> dict:
    """indices (any shape) -> {perplexity, used, dead_fraction} over ``n_codes``."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=n_codes).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    perplexity = float(torch.exp(-(nz * nz.log()).sum()))
    used = int((counts > 0).sum())
    return {"perplexity": perplexity, "used": used, "dead_fraction": 1.0 - used / n_codes}
