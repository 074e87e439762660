"""The spatiotemporal flat-map masked autoencoder (ViT MAE) of Lane et al. 2025 (arXiv 2510.13768).

In: clips of flat maps ``imgs (N, 1, T, H, W)`` float32 (per-frame z-scored, clipped to +-3) and
the brain mask of the flat-map grid, ``mask (H, W)`` or ``(N, H, W)`` bool.
Out: ``forward`` -> ``(loss, pred, visible)``: the masked-patch MSE, the predicted patches
``(N, L, u*p*p*C)`` and which tokens the encoder saw ``(N, L)``; ``forward_features`` -> the
frozen-feature dict ``cls (N, D)``, ``avg_patch (N, D)``, ``patch (N, L, D)`` for the probes.

A clip is cut into tubelets of ``t_patch_size`` frames x ``patch_size`` x ``patch_size`` pixels:
``L = (T / t) * (H / p) * (W / p)`` tokens, ordered time-major then row-major (``t, h, w``).
The paper's ViT-B: 16 frames x 224 x 560 with 16 x 16 x 16 tubelets -> 1 x 14 x 35 = 490 tokens.
The structure follows facebookresearch/mae (``patchify`` ... ``forward_loss``) and MAE-ST
(separable learned temporal + spatial position embeddings, ``t_pred_stride``).

The decoder reads only what the loss needs, as the paper's public code (MedARC-AI/fmri-fm,
``flat_mae/models_mae.py``) does: its own learned class token, the encoded visible tokens and one
mask token per *hidden brain* token (a token whose patch holds brain pixels and that the encoder
did not see). Tokens outside the brain never enter the decoder; their loss weight is zero
anyway (the paper's loss counts brain pixels of hidden tokens only). Two differences from that
code:

- where a batch mixes brain masks (clips of different spaces or sites), upstream trims every
  clip's hidden tokens to the batch's smallest count, dropping the raster-last ones, so those
  patches are never predicted; here each clip's list is padded to the batch's largest count and
  the padding is masked out of attention (no token attends to it), so every hidden brain token
  is predicted and a clip's output does not depend on its batch;
- upstream divides the batch's summed squared error by the batch's pixel count; here each clip
  is normalised by its own hidden brain pixels and clips are averaged (``forward_loss``; the
  same number when every clip has as many hidden brain pixels).

With one mask for the whole batch (the usual case) there is no padding and no attention mask.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmri_bench.errors import InputError
from fmri_bench.paths import atomic_save

# /2: the decoder has its own class token and decodes hidden brain tokens only (/1 files predate it)
CHECKPOINT_FORMAT = "fmri_bench.mae/2"


# --- blocks ----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D), attn_mask: bool broadcastable to (B, nh, L, L), True = attend -> (B, L, D)"""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, L, hs)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, L, hs)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


# --- config ----------------------------------------------------------------------------------
@dataclass
class MAEConfig:
    """Model settings. The defaults are the ``mae_vit_tiny`` preset (a CPU trains it in minutes).

    ``img_size`` is (H, W) of the flat-map grid the model reads. tiny reads the 224 x 560 fs_LR
    grid pooled 2 x 2 (112 x 280, ``data.downsample=2`` in training) with 8 x 8 patches, so it
    keeps the paper's 1 x 14 x 35 token grid at a quarter of the pixels (337 of the 490 tokens
    hold brain on the fs_LR mask). ``patch_size=14`` (1 x 8 x 20, 124 brain tokens) makes a CPU
    step ~2.2x cheaper (``benchmarks/bench_mae.py --patch-sizes 14``); whether it lowers the loss
    reached in a fixed time is not measured yet, so the preset keeps the paper's grid.
    """

    img_size: tuple[int, int] = (112, 280)
    num_frames: int = 16
    patch_size: int = 8
    t_patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mask_ratio: float = 0.9
    t_pred_stride: int = 2  # MAE-ST: the decoder predicts every t_pred_stride-th frame
    tube_masking: bool = False  # one spatial mask shared by all temporal tokens (VideoMAE)
    class_token: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        check_values(self, {"num_frames": 1, "patch_size": 1, "t_patch_size": 1, "in_chans": 1, "embed_dim": 1,
                            "depth": 0, "num_heads": 1, "mlp_ratio": 0, "decoder_embed_dim": 1,
                            "decoder_depth": 1, "decoder_num_heads": 1, "t_pred_stride": 1, "norm_eps": 0},
                     "MAE config", exclusive=("mlp_ratio", "norm_eps"))
        if not (isinstance(self.img_size, (list, tuple)) and len(self.img_size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.img_size)):
            raise InputError(f"bad MAE config: img_size must be [H, W] of positive whole numbers, got {self.img_size!r}")
        self.img_size = tuple(int(s) for s in self.img_size)
        H, W = self.img_size
        p, t = self.patch_size, self.t_patch_size
        problems = []
        if H % p or W % p:
            problems.append(f"img_size {self.img_size} is not divisible by patch_size {p}")
        if self.num_frames % t:
            problems.append(f"num_frames {self.num_frames} is not divisible by t_patch_size {t}")
        if t % self.t_pred_stride:
            problems.append(f"t_patch_size {t} is not divisible by t_pred_stride {self.t_pred_stride}")
        for dim, heads in ((self.embed_dim, self.num_heads), (self.decoder_embed_dim, self.decoder_num_heads)):
            if dim % heads:
                problems.append(f"width {dim} is not divisible by its {heads} heads")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio {self.mask_ratio} is not in [0, 1)")
        if not self.class_token:
            problems.append("class_token=False is not supported (the probes read the cls token)")
        if problems:
            raise InputError("bad MAE config: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid (t, h, w)."""
        return (self.num_frames // self.t_patch_size, self.img_size[0] // self.patch_size,
                self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_size
        return t * h * w

    @property
    def t_pred_patch_size(self) -> int:
        """Frames predicted per token: t_patch_size / t_pred_stride."""
        return self.t_patch_size // self.t_pred_stride

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "MAEConfig":
        """Build from a plain dict; an unknown key is an error naming the closest valid key."""
        check_keys(d, cls, source, what="MAE config")
        return cls(**d)


def check_keys(d: dict, cls, source: str | None = None, what: str = "config") -> None:
    """Raise InputError if ``d`` has a key that is not a field of dataclass ``cls``."""
    if not isinstance(d, dict):
        raise InputError(f"{what} must be a mapping, got {type(d).__name__}", source)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown {what} key {key!r}{hint}; valid keys: {', '.join(names)}", source)


def check_values(obj, minimum: dict[str, float], what: str = "config", exclusive=()) -> None:
    """Type and range check of a config dataclass: each ``int`` / ``float`` / ``bool`` field must hold
    that type (an int is a float; a bool is no number), and each field named in ``minimum`` must be
    >= its bound (> for names in ``exclusive``). Floats given as ints are converted in place."""
    problems = []
    for f in dataclasses.fields(obj):
        kind, value = str(f.type), getattr(obj, f.name)
        if kind == "bool" and not isinstance(value, bool):
            problems.append(f"{f.name} must be true or false, got {value!r}")
        elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{f.name} must be a whole number, got {value!r}")
        elif kind == "float":
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                    setattr(obj, f.name, value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{f.name} must be a number, got {value!r}")
            else:
                setattr(obj, f.name, float(value))
    for name, low in minimum.items():
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # reported above
        if not math.isfinite(value) or (value <= low if name in exclusive else value < low):
            problems.append(f"{name} must be {'>' if name in exclusive else '>='} {low:g}, got {value!r}")
    if problems:
        raise InputError(f"bad {what}: " + "; ".join(problems))


PRESETS: dict[str, dict] = {
    "mae_vit_tiny": {},
    "mae_vit_small": dict(
        img_size=(224, 560), patch_size=16, t_patch_size=16, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16,
    ),
    # The paper's ViT-B 16-16 (102.9M parameters, 88.6M in the encoder).
    "mae_vit_base": dict(
        img_size=(224, 560), patch_size=16, t_patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16,
    ),
}


def preset_config(name: str, **overrides) -> MAEConfig:
    """The config of preset ``name`` with ``overrides`` applied (unknown keys are errors)."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return MAEConfig.from_dict({**PRESETS[name], **overrides})


# --- model -----------------------------------------------------------------------------------
class MaskedAutoencoderViT(nn.Module):
    """Spatiotemporal ViT MAE with a brain-aware masking and loss.

    Only patches that contain brain (any in-mask pixel) can be visible to the encoder; the loss
    counts brain pixels of masked tokens only. Inputs outside the brain are zeroed on entry, so
    they never influence the output either.
    """

    def __init__(self, config: MAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or MAEConfig()
        t, h, w = cfg.grid_size
        D, Dd = cfg.embed_dim, cfg.decoder_embed_dim
        patch_dim = cfg.t_patch_size * cfg.patch_size ** 2 * cfg.in_chans

        # encoder. A linear map of the flattened tubelet == the usual Conv3d with stride = kernel.
        self.patch_embed = nn.Linear(patch_dim, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, D))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, D))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)

        # decoder. Its class token is its own learned token, as upstream (fmri-fm flat_mae and
        # its MAE-ST-based predecessor), not the encoder's cls through decoder_embed (the
        # facebookresearch/mae choice).
        self.decoder_embed = nn.Linear(D, Dd)
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, Dd))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, t, Dd))
        self.decoder_pos_embed_class = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(Dd, cfg.t_pred_patch_size * cfg.patch_size ** 2 * cfg.in_chans)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        # MAE: xavier-uniform linears (the patch embedding too), 0.02 truncated-normal tokens.
        for p in (self.cls_token, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class,
                  self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal,
                  self.decoder_pos_embed_class):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.decoder_cls_token)  # upstream starts the decoder's class token at zero
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- shapes -------------------------------------------------------------------------------
    def check_inputs(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs: (N, C, T, H, W), mask: (H, W) | (N, H, W) -> (imgs zeroed outside brain, mask (N, H, W) bool)"""
        cfg = self.config
        want = (cfg.in_chans, cfg.num_frames, *cfg.img_size)
        if imgs.ndim != 5 or tuple(imgs.shape[1:]) != want:
            raise InputError(f"clip has shape {tuple(imgs.shape)}, the model expects (N, {', '.join(map(str, want))})"
                             " = (batch, channels, frames, height, width)")
        if mask.ndim == 2:
            mask = mask.unsqueeze(0).expand(imgs.shape[0], -1, -1)
        if tuple(mask.shape) != (imgs.shape[0], *cfg.img_size):
            raise InputError(f"brain mask has shape {tuple(mask.shape)}, expected {tuple(cfg.img_size)} "
                             f"or ({imgs.shape[0]}, {cfg.img_size[0]}, {cfg.img_size[1]})")
        mask = mask.to(device=imgs.device, dtype=torch.bool)
        imgs = imgs.masked_fill(~mask[:, None, None], 0.0)  # also clears NaN fill values
        return imgs, mask

    def patchify(self, imgs: torch.Tensor, t_patch: int | None = None) -> torch.Tensor:
        """imgs: (N, C, T, H, W) -> patches (N, L, u*p*p*C), u = t_patch (default t_patch_size).

        Token order (t, h, w); within a patch (u, p, q, C).
        """
        N, C, T, H, W = imgs.shape
        p, u = self.config.patch_size, t_patch or self.config.t_patch_size
        t, h, w = T // u, H // p, W // p
        x = imgs.reshape(N, C, t, u, h, p, w, p)
        x = torch.einsum("nctuhpwq->nthwupqc", x)
        return x.reshape(N, t * h * w, u * p * p * C)

    def unpatchify(self, x: torch.Tensor, t_patch: int | None = None) -> torch.Tensor:
        """x: (N, L, u*p*p*C) -> imgs (N, C, T', H, W) with T' = (L / (h*w)) * u; inverse of patchify."""
        cfg = self.config
        p, u = cfg.patch_size, t_patch or cfg.t_patch_size
        _, h, w = cfg.grid_size
        N, L, P = x.shape
        C = P // (u * p * p)
        if L % (h * w) or P != u * p * p * C:
            raise InputError(f"patches of shape {tuple(x.shape)} do not fit grid (h={h}, w={w}), t_patch {u}")
        t = L // (h * w)
        x = x.reshape(N, t, h, w, u, p, p, C)
        x = torch.einsum("nthwupqc->nctuhpwq", x)
        return x.reshape(N, C, t * u, h * p, w * p)

    def patches_at(self, imgs: torch.Tensor, ids: torch.Tensor, t_patch: int | None = None) -> torch.Tensor:
        """imgs: (N, C, T, H, W), ids: (N, K) token indices -> (N, K, u*p*p*C): the rows ``ids`` of
        ``patchify(imgs, t_patch)``, cut out of a strided view (no copy of the whole clip)."""
        N, C, T, H, W = imgs.shape
        p, u = self.config.patch_size, t_patch or self.config.t_patch_size
        t, h, w = T // u, H // p, W // p
        view = imgs.reshape(N, C, t, u, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1)  # (N, t, h, w, u, p, q, C)
        ti, hw = ids // (h * w), ids % (h * w)
        rows = torch.arange(N, device=ids.device)[:, None]
        return view[rows, ti, hw // w, hw % w].reshape(N, ids.shape[1], u * p * p * C)

    def brain_patches(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (N, H, W) bool -> (N, L) bool, True where a token's patch holds any brain pixel."""
        p = self.config.patch_size
        t = self.config.grid_size[0]
        N, H, W = mask.shape
        spatial = mask.reshape(N, H // p, p, W // p, p).any(dim=4).any(dim=2).reshape(N, -1)  # (N, h*w)
        return spatial.repeat(1, t)  # token order is (t, h, w)

    # -- masking ------------------------------------------------------------------------------
    def draw_noise(self, n: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform masking noise: (n, L), or (n, h*w) with tube masking (one value per tube)."""
        t, h, w = self.config.grid_size
        size = (n, h * w) if self.config.tube_masking else (n, t * h * w)
        gen_device = generator.device if generator is not None else device
        return torch.rand(size, generator=generator, device=gen_device).to(device)

    def random_masking(self, brain: torch.Tensor, mask_ratio: float,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """Choose a random subset of brain tokens to show (facebookresearch/mae: argsort of uniform noise).

        brain: (N, L) bool patch mask; noise: optional (N, L) or (N, h*w) (tube)
        -> visible (N, L) bool, ids_keep (N, K).

        K = int(L * (1 - mask_ratio)) as upstream (48 of 490 at 0.9), capped by the fewest brain
        tokens in the batch; non-brain tokens get noise + 1 so they sort last and are never kept.
        """
        N, L = brain.shape
        t = self.config.grid_size[0]
        n_brain = int(brain.sum(dim=1).min())
        if n_brain == 0:
            raise InputError("a brain mask in the batch has no in-brain pixels")
        if noise is None:
            noise = self.draw_noise(N, generator, brain.device)
        noise = noise.to(brain.device)
        if self.config.tube_masking:
            # the same spatial draw for every temporal token: stable sort keeps each tube together
            hw = L // t
            keep_tubes = max(1, min(int(hw * (1 - mask_ratio)), n_brain // t))
            len_keep = keep_tubes * t
            noise = noise.repeat(1, t)
        else:
            len_keep = max(1, min(int(L * (1 - mask_ratio)), n_brain))
        noise = noise + (~brain).to(noise.dtype)
        ids_keep = torch.argsort(noise, dim=1, stable=True)[:, :len_keep]  # (N, K)
        visible = torch.zeros(N, L, dtype=torch.bool, device=brain.device).scatter_(1, ids_keep, True)
        return visible, ids_keep

    # -- encoder / decoder --------------------------------------------------------------------
    def _pos_embed(self, decoder: bool = False) -> torch.Tensor:
        """Separable learned position embedding (MAE-ST): temporal + spatial -> (1, t*h*w, D)."""
        if decoder:
            temporal, spatial = self.decoder_pos_embed_temporal, self.decoder_pos_embed_spatial
        else:
            temporal, spatial = self.pos_embed_temporal, self.pos_embed_spatial
        return (temporal[:, :, None] + spatial[:, None, :]).flatten(1, 2)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """imgs: (N, C, T, H, W) zeroed outside brain, mask: (N, H, W) bool
        -> latent (N, 1+K, D) (cls first), visible (N, L) bool, ids_keep (N, K)."""
        # choose the visible tokens first, then cut out and embed only those (the embedding is per token)
        visible, ids_keep = self.random_masking(self.brain_patches(mask), mask_ratio, generator, noise)
        patches = self.patches_at(imgs, ids_keep)  # (N, K, t*p*p*C)
        N, K, _ = patches.shape
        pos = self._pos_embed().expand(N, -1, -1)
        x = self.patch_embed(patches) + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        cls = (self.cls_token + self.pos_embed_class).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), visible, ids_keep

    def hidden_brain_ids(self, brain: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the decoder predicts. brain, visible: (N, L) bool
        -> ids (N, Q) long (each clip's hidden brain tokens in token order, then padding),
        valid (N, Q) bool (False on padding); Q = the batch's largest count of hidden brain tokens.

        A padding slot holds the index of a token that is not a hidden brain token (ids stay a
        permutation prefix, so a scatter back to the grid never collides)."""
        hidden = brain & ~visible
        count = hidden.sum(dim=1)  # (N,)
        Q = int(count.max())
        ids = torch.argsort((~hidden).to(torch.uint8), dim=1, stable=True)[:, :Q]  # hidden first
        valid = torch.arange(Q, device=ids.device) < count[:, None]
        return ids, valid

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor, pred_ids: torch.Tensor,
                        pred_valid: torch.Tensor) -> torch.Tensor:
        """latent: (N, 1+K, D) encoder output (cls first), ids_keep: (N, K), pred_ids / pred_valid:
        (N, Q) from ``hidden_brain_ids`` -> out (N, Q, u*p*p*C), u = t_patch / t_pred_stride: the
        prediction at each ``pred_ids`` token, zero on padding (``scatter_pred`` puts it on the grid).

        Decoder input: [own cls, K visible, Q mask tokens] (N, 1+K+Q, Dd), each with its decoder
        position embedding. The encoder's cls does not enter the decoder (as upstream)."""
        x = self.decoder_embed(latent[:, 1:])  # (N, K, Dd)
        N, K, Dd = x.shape
        pos = self._pos_embed(decoder=True).expand(N, -1, -1)  # (N, L, Dd)

        def pos_at(ids):
            return torch.gather(pos, 1, ids.unsqueeze(-1).expand(-1, -1, Dd))

        cls = (self.decoder_cls_token + self.decoder_pos_embed_class).expand(N, -1, -1)
        queries = self.mask_token + pos_at(pred_ids)  # (N, Q, Dd)
        x = torch.cat([cls, x + pos_at(ids_keep), queries], dim=1)  # (N, 1+K+Q, Dd)
        attn_mask = None
        if not bool(pred_valid.all()):  # clips with fewer hidden brain tokens: keys off on padding
            keys = torch.cat([torch.ones(N, 1 + K, dtype=torch.bool, device=x.device), pred_valid], dim=1)
            attn_mask = keys[:, None, None, :]  # (N, 1, 1, 1+K+Q)
        for blk in self.decoder_blocks:
            x = blk(x, attn_mask)
        out = self.decoder_pred(self.decoder_norm(x[:, 1 + K:]))  # (N, Q, P)
        return out * pred_valid.unsqueeze(-1).to(out.dtype)

    def scatter_pred(self, out: torch.Tensor, pred_ids: torch.Tensor) -> torch.Tensor:
        """out: (N, Q, P) at pred_ids (N, Q) -> pred (N, L, P) on the token grid, zero at tokens not
        decoded (visible, outside the brain, padding)."""
        N, _, P = out.shape
        pred = out.new_zeros(N, self.config.num_patches, P)
        return pred.scatter(1, pred_ids.unsqueeze(-1).expand(-1, -1, P), out)

    def pred_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, T, H, W) -> the frames the decoder predicts, patchified (N, L, u*p*p*C)."""
        s = self.config.t_pred_stride
        return self.patchify(imgs[:, :, ::s], t_patch=self.config.t_pred_patch_size)

    def loss_weight(self, mask: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """mask: (N, H, W) bool, visible: (N, L) bool -> per-pixel weight (N, L, u*p*p*C) =
        brain x (1 - visible)."""
        cfg = self.config
        N = mask.shape[0]
        brain = mask[:, None, None].expand(N, cfg.in_chans, cfg.num_frames, *cfg.img_size)
        return self.pred_target(brain.float()) * (~visible).unsqueeze(-1).float()

    def decoded_loss(self, imgs: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, pred_ids: torch.Tensor,
                     pred_valid: torch.Tensor) -> torch.Tensor:
        """``forward_loss`` computed on the decoded tokens only (what ``forward`` uses; the weight is
        zero everywhere else). imgs: (N, C, T, H, W), mask: (N, H, W), out: (N, Q, u*p*p*C) the
        decoder's output at ``pred_ids`` (N, Q), pred_valid: (N, Q) -> scalar."""
        cfg = self.config
        u, C, pp = cfg.t_pred_patch_size, cfg.in_chans, cfg.patch_size ** 2
        N, Q = pred_ids.shape
        target = self.patches_at(imgs[:, :, ::cfg.t_pred_stride], pred_ids, u)  # (N, Q, u*p*p*C)
        # the brain pixels of a token are the same in every frame and channel: cut them once
        _, h, w = cfg.grid_size
        brain = self.patches_at(mask[:, None, None].float(), pred_ids % (h * w), 1)  # (N, Q, p*p)
        brain = brain * pred_valid.unsqueeze(-1)
        weight = brain.view(N, Q, 1, pp, 1).expand(N, Q, u, pp, C).reshape(N, Q, u * pp * C)
        err = (out.float() - target.float()).pow(2) * weight
        per_clip = err.sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1.0)
        return per_clip.mean()

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, T, H, W), pred: (N, L, u*p*p*C), visible: (N, L), mask: (N, H, W) -> scalar.

        MSE over brain pixels of masked tokens, no per-patch target normalisation (the input is
        z-scored per frame). Each clip is normalised by its own pixel count and clips are averaged,
        so a global batch gives the same loss however it is split over DDP ranks.
        """
        target = self.pred_target(imgs)
        weight = self.loss_weight(mask, visible)
        err = (pred.float() - target.float()).pow(2) * weight
        per_clip = err.sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1.0)
        return per_clip.mean()

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """imgs: (N, C, T, H, W), mask: (H, W) | (N, H, W) bool
        -> loss (scalar), pred (N, L, u*p*p*C) (decoded at hidden brain tokens, zero elsewhere),
        visible (N, L) bool.

        ``generator`` draws the masking noise (reproducible masks); ``noise`` (from ``draw_noise``)
        overrides it, e.g. to share one draw across DDP ranks.
        """
        imgs, mask = self.check_inputs(imgs, mask)
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, visible, ids_keep = self.forward_encoder(imgs, mask, ratio, generator, noise)
        pred_ids, pred_valid = self.hidden_brain_ids(self.brain_patches(mask), visible)
        out = self.forward_decoder(latent, ids_keep, pred_ids, pred_valid)
        loss = self.decoded_loss(imgs, mask, out, pred_ids, pred_valid)
        return loss, self.scatter_pred(out, pred_ids), visible

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                    mask_ratio: float | None = None) -> dict[str, torch.Tensor]:
        """One masked reconstruction, as images on the predicted frames (T / t_pred_stride of them):
        dict target, masked_input (0 where hidden), pred (0 at visible tokens: only hidden brain
        tokens are decoded), all (N, C, T', H, W), and loss."""
        imgs, mask = self.check_inputs(imgs, mask)
        loss, pred, visible = self.forward(imgs, mask, generator, mask_ratio)
        u = self.config.t_pred_patch_size
        target = self.pred_target(imgs)
        shown = visible.unsqueeze(-1).float()
        return {
            "loss": loss,
            "target": self.unpatchify(target, u),
            "masked_input": self.unpatchify(target * shown, u),
            "pred": self.unpatchify(pred.float(), u) * mask[:, None, None],
        }

    def forward_features(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features, no masking: every brain token is visible, non-brain tokens are ignored
        (no token attends to them, as in training).

        imgs: (N, C, T, H, W), mask: (H, W) | (N, H, W) -> dict cls (N, D), avg_patch (N, D) (mean over
        brain tokens), patch (N, L, D) (zero at non-brain tokens), brain (N, L) bool.
        """
        imgs, mask = self.check_inputs(imgs, mask)
        N = imgs.shape[0]
        brain = self.brain_patches(mask)
        x = self.patch_embed(self.patchify(imgs)) + self._pos_embed()
        x = torch.cat([(self.cls_token + self.pos_embed_class).expand(N, -1, -1), x], dim=1)
        keys = torch.cat([torch.ones(N, 1, dtype=torch.bool, device=x.device), brain], dim=1)
        attn_mask = None if bool(keys.all()) else keys[:, None, None, :]  # (N, 1, 1, 1+L)
        for blk in self.blocks:
            x = blk(x, attn_mask)
        x = self.norm(x)
        patch = x[:, 1:] * brain.unsqueeze(-1)
        avg = patch.sum(dim=1) / brain.sum(dim=1, keepdim=True).clamp_min(1)
        return {"cls": x[:, 0], "avg_patch": avg, "patch": patch, "brain": brain}

    # -- parameters and files -----------------------------------------------------------------
    def num_params(self, part: str = "all") -> int:
        """Parameter count: part "all", "encoder" (patch/pos embeddings, cls, blocks, norm) or "decoder"."""
        enc, dec = 0, 0
        for name, p in self.named_parameters():
            if name.startswith(("decoder", "mask_token")):
                dec += p.numel()
            else:
                enc += p.numel()
        return {"all": enc + dec, "encoder": enc, "decoder": dec}[part]

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay: biases, norms, tokens, position embeddings."""
        return {n for n, p in self.named_parameters()
                if p.ndim <= 1 or "pos_embed" in n or n in ("cls_token", "decoder_cls_token", "mask_token")}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write weights + config to one file (atomic), readable by ``from_pretrained``."""
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(),
                               "state_dict": self.state_dict()})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location="cpu") -> "MaskedAutoencoderViT":
        """Rebuild a model from ``save_pretrained`` output or a training checkpoint."""
        return from_pretrained(path, map_location)


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """torch.save to ``path`` atomically (temporary file in the same directory, then rename).

    The archive is serialised to memory first: torch names the zip's record prefix after the
    file it writes to, so writing straight to the temporary file would put its (per-process)
    name inside the archive and the same seed would not give the same bytes. Temporary files
    left by an earlier killed save of the same ``path`` are removed first.
    """
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".tmp-*-{path.name}"):
            stale.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_save(lambda tmp: Path(tmp).write_bytes(data), path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with any failure (truncated, random, foreign or
    pickled-object file) as a one-line ``InputError``; the message never suggests unsafe loading."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        kind = type(err).__name__
        if "weights_only" in str(err) or kind == "UnpicklingError":
            why = "it holds objects other than tensors and plain values (not written by fmri_bench)"
        else:
            why = f"truncated or not a torch file ({kind})"
        raise InputError(f"cannot read as a torch checkpoint: {why}", path) from None


def check_format(ckpt, path) -> None:
    """InputError unless ``ckpt`` is a dict in this version's checkpoint format; an older
    fmri_bench format (format /1: the decoder had no class token of its own) is named as such."""
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if isinstance(fmt, str) and fmt.startswith("fmri_bench.mae/") and fmt != CHECKPOINT_FORMAT:
        raise InputError(f"written by an older fmri_bench (format {fmt!r}, this version reads {CHECKPOINT_FORMAT!r}): "
                         "train it again (pretrain without --resume, into a new --run-dir)", path)
    if fmt != CHECKPOINT_FORMAT:
        raise InputError(f"not an fmri_bench MAE checkpoint (expected format {CHECKPOINT_FORMAT!r})", path)


def from_pretrained(path: str | os.PathLike, map_location="cpu") -> MaskedAutoencoderViT:
    """Rebuild a ``MaskedAutoencoderViT`` from a file written by ``save_pretrained`` or by training."""
    if os.path.isdir(path):
        raise InputError("is a folder, not a model file (give the model.pt or checkpoint.pt inside it)", path)
    if not os.path.isfile(path):
        raise InputError("no such model file", path)
    ckpt = load_checkpoint(path, map_location)
    check_format(ckpt, path)
    model = MaskedAutoencoderViT(MAEConfig.from_dict(dict(ckpt["config"]), source=os.fspath(path)))
    model.load_state_dict(ckpt["state_dict"])
    return model


def forward_flops(cfg: MAEConfig, brain_tokens: int | None = None) -> float:
    """Analytic forward FLOPs of one clip at the config's mask ratio: matmuls (2 per multiply-add)
    and attention (QK^T and AV); norms and activations are left out. Training ~ 3x this.

    brain_tokens: tokens whose patch holds brain (default: all L); the decoder reads 1 + K + Q
    tokens, Q = brain_tokens - K hidden brain tokens."""
    L = cfg.num_patches
    B = L if brain_tokens is None else int(brain_tokens)
    K = max(1, min(int(L * (1 - cfg.mask_ratio)), B))
    Q = B - K
    D, Dd = cfg.embed_dim, cfg.decoder_embed_dim
    patch = cfg.t_patch_size * cfg.patch_size ** 2 * cfg.in_chans
    pred = cfg.t_pred_patch_size * cfg.patch_size ** 2 * cfg.in_chans

    def blocks(depth, n, d):  # qkv 3d^2 + proj d^2 + mlp 2 * ratio * d^2 per token, then attention
        return depth * (2 * n * d * d * (4 + 2 * cfg.mlp_ratio) + 4 * n * n * d)

    enc = 2 * K * patch * D + blocks(cfg.depth, K + 1, D)
    dec = 2 * K * D * Dd + blocks(cfg.decoder_depth, 1 + K + Q, Dd) + 2 * Q * Dd * pred
    return float(enc + dec)


def preset_table() -> list[dict]:
    """One row per preset: widths, depths, tokens, parameters and training GFLOPs per clip."""
    rows = []
    for name in PRESETS:
        cfg = preset_config(name)
        with torch.device("meta"):  # structure only, no memory
            model = MaskedAutoencoderViT(cfg)
        rows.append({
            "preset": name, "input (T x H x W)": f"{cfg.num_frames} x {cfg.img_size[0]} x {cfg.img_size[1]}",
            "tubelet": f"{cfg.t_patch_size} x {cfg.patch_size} x {cfg.patch_size}",
            "encoder (dim/depth/heads)": f"{cfg.embed_dim}/{cfg.depth}/{cfg.num_heads}",
            "decoder": f"{cfg.decoder_embed_dim}/{cfg.decoder_depth}/{cfg.decoder_num_heads}",
            "tokens": cfg.num_patches, "visible": int(cfg.num_patches * (1 - cfg.mask_ratio)),
            "params (M)": round(model.num_params() / 1e6, 2),
            "encoder params (M)": round(model.num_params("encoder") / 1e6, 2),
            "train GFLOP / clip": round(3 * forward_flops(cfg) / 1e9, 1),
        })
    return rows
