"""Training step of the flat-map MAE: the hidden-brain decoder against the all-token decoder, and
throughput against this machine's own matmul rate.

Part 1, the decoder (``--compare-model``, default ``mae_vit_tiny``, batch and pooling of
``configs/pretrain_tiny_cpu.yaml``): one full step (forward, backward, gradient clipping, AdamW)
of the model as it is, whose decoder reads its class token, the visible tokens and the *hidden
brain* tokens only, against the step before it (kept here, and only here, as the reference):
mask tokens at every grid position, brain or not, so the decoder reads 1 + L tokens. Both run on
the same weights, the same clips and the real fs_LR 32k brain mask (224 x 560, pooled as the
config pools it), alternating in rounds so that both see the same machine load; the step time
is the median over rounds (and the minimum, steadier on a shared machine; ``--threads 1`` is
steadier still where other jobs share the cores). ``--patch-sizes``: the same step at other
patch sizes on the same pixels (fewer, larger tokens), to size the token grid to a CPU.

Part 2, throughput (``--throughput``, default on): for ``mae_vit_tiny`` (112 x 280) and
``mae_vit_base`` (the paper config, 224 x 560, 490 tokens, mask 0.9) on the same mask: clips/s,
tokens/s, the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``: matmuls and
attention), the achieved FLOP rate and that rate as a fraction of the named alternative run in
the same process: a large dense ``torch.mm`` (fp32 on CPU, bf16 on a GPU). Peak memory: max RSS
(CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/bench_mae.py                                   # CPU, fp32
    python benchmarks/bench_mae.py --no-throughput --patch-sizes 14  # the decoder comparison only
    python benchmarks/bench_mae.py --device cuda --batch 32 --dtype bf16

The last line is machine-readable: ``step_ms_old=... step_ms_new=... speedup=... speedup_min=...
dec_tokens_old=... dec_tokens_new=... [step_ms_p14=...] [tiny_clips_s=... base_clips_s=... base_mfu=...]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fmri_bench.flatmap import FlatMapper
from fmri_bench.grid import FlatGrid
from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config
from fmri_bench.train import load_config, param_groups

TINY_CONFIG = Path(__file__).parents[1] / "configs" / "pretrain_tiny_cpu.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best-of rate of an n x n x n matmul (n = 2048 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best / 1e12


def fslr_mask(downsample: int) -> torch.Tensor:
    """The fs_LR 32k flat-map brain mask (224 x 560), pooled ``downsample`` x ``downsample``."""
    return FlatGrid(FlatMapper("fs_LR_32k").mask).coarse(downsample).mask.clone()


def clips_in(mask: torch.Tensor, batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """(batch, 1, frames, H, W) standard-normal values clipped at +-3 inside ``mask``, 0 outside
    (the content does not change the step's cost)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, frames, *mask.shape, generator=g).clamp(-3, 3)
    return x * mask


def all_token_loss(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The previous MAE step's loss (the reference): the whole clip patchified before the
    visible tokens are picked, the encoder's cls through ``decoder_embed`` as the decoder's class
    token, mask tokens at all L positions with the visible tokens scattered back, 1 + L tokens
    through the decoder, the loss over the whole (N, L, P) grid."""
    imgs, mask = model.check_inputs(imgs, mask)
    visible, ids_keep = model.random_masking(model.brain_patches(mask), model.config.mask_ratio, generator)
    patches = model.patchify(imgs)
    patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    N = patches.shape[0]
    pos = model._pos_embed().expand(N, -1, -1)
    x = model.patch_embed(patches) + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
    x = torch.cat([(model.cls_token + model.pos_embed_class).expand(N, -1, -1), x], dim=1)
    for blk in model.blocks:
        x = blk(x)
    x = model.decoder_embed(model.norm(x))  # (N, 1+K, Dd)
    N, _, Dd = x.shape
    tokens = model.mask_token.expand(N, model.config.num_patches, Dd)
    tokens = tokens.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), x[:, 1:]) + model._pos_embed(decoder=True)
    x = torch.cat([x[:, :1] + model.decoder_pos_embed_class, tokens], dim=1)  # (N, 1+L, Dd)
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x[:, 1:]))
    return model.forward_loss(imgs, pred, visible, mask)


def make_step(model, opt, bold, mask, gen, device, amp, old: bool = False):
    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = all_token_loss(model, bold, mask, gen) if old else model(bold, mask, gen)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_flops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def timed(step, n: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def decoder_tokens(model: MaskedAutoencoderViT, mask: torch.Tensor) -> tuple[int, int]:
    """(old, new) decoder sequence length for one clip on ``mask``: 1 + L, and 1 + brain tokens
    (K visible + the hidden rest)."""
    brain = int(model.brain_patches(mask[None].to(torch.bool))[0].sum())
    return 1 + model.config.num_patches, 1 + brain


def compare_decoders(name: str, overrides: dict, mask: torch.Tensor, batch: int, device, amp, rounds: int,
                     steps: int, old: bool = True) -> dict:
    """Median step time of the hidden-brain step (and of the all-token step when ``old``), same
    model, same clips, alternating rounds."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(preset_config(name, **overrides)).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    bold = clips_in(mask, batch, model.config.num_frames).to(device)
    m = mask.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    new_step = make_step(model, opt, bold, m, gen, device, amp)
    old_step = make_step(model, opt, bold, m, gen, device, amp, old=True) if old else None
    out = {"flops_new": step_flops(new_step)}
    if old:
        out["flops_old"] = step_flops(old_step)
    times = {"new": [], "old": []}
    for _ in range(rounds):
        times["new"].append(timed(new_step, steps, device))
        if old:
            times["old"].append(timed(old_step, steps, device))
    for k, v in times.items():
        if v:
            out[f"ms_{k}"], out[f"ms_{k}_min"] = 1e3 * statistics.median(v), 1e3 * min(v)
    out["tokens_old"], out["tokens_new"] = decoder_tokens(model, mask)
    out["grid"] = model.config.grid_size
    return out


def bench_model(name: str, batch: int, mask: torch.Tensor, device: torch.device, amp: torch.dtype | None,
                steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(preset_config(name)).to(device)
    cfg = model.config
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    bold = clips_in(mask, batch, cfg.num_frames).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    step = make_step(model, opt, bold, mask.to(device), gen, device, amp)
    for _ in range(warmup):
        step()
    flops = step_flops(step)
    dt = timed(step, steps, device)
    return {"clips_s": batch / dt, "tokens_s": batch * cfg.num_patches / dt, "step_s": dt,
            "tflops": flops / dt / 1e12, "gflop_per_step": flops / 1e9, "params_m": model.num_params() / 1e6}


def main() -> None:
    tiny = load_config(TINY_CONFIG)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compare-model", default=tiny.model, help="preset of the decoder comparison")
    ap.add_argument("--compare-batch", type=int, default=tiny.batch_size,
                    help="batch of the decoder comparison (default: configs/pretrain_tiny_cpu.yaml)")
    ap.add_argument("--downsample", type=int, default=tiny.data.downsample,
                    help="pooling of the fs_LR mask for the compared model (default: the tiny config's)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median reported)")
    ap.add_argument("--round-steps", type=int, default=2, help="steps per timing round")
    ap.add_argument("--patch-sizes", type=int, nargs="*", default=[],
                    help="also time the new step at these patch sizes (same pixels, other token grids)")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                    help="part 2: tiny and base clips/s and FLOP rate against matmul")
    ap.add_argument("--batch", type=int, default=8, help="batch of part 2")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model in part 2")
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}")

    mask = fslr_mask(args.downsample)
    c = compare_decoders(args.compare_model, {}, mask, args.compare_batch, device, amp, args.rounds,
                         args.round_steps)
    speedup, speedup_min = c["ms_old"] / c["ms_new"], c["ms_old_min"] / c["ms_new_min"]
    print(f"decoder comparison: {args.compare_model}, token grid {c['grid']}, batch {args.compare_batch}, "
          f"fs_LR mask pooled {args.downsample}x ({int(mask.sum())} brain pixels), median of {args.rounds} rounds")
    print(f"{'all-token decoder (previous)':>32}: {c['ms_old']:8.1f} ms/step (min {c['ms_old_min']:.1f}), "
          f"{c['tokens_old']:4d} decoder tokens, {c['flops_old'] / 1e9:7.1f} GFLOP/step")
    print(f"{'hidden-brain decoder (now)':>32}: {c['ms_new']:8.1f} ms/step (min {c['ms_new_min']:.1f}), "
          f"{c['tokens_new']:4d} decoder tokens, {c['flops_new'] / 1e9:7.1f} GFLOP/step   "
          f"speedup {speedup:.2f}x (of minima {speedup_min:.2f}x)")
    last = (f"step_ms_old={c['ms_old']:.1f} step_ms_new={c['ms_new']:.1f} speedup={speedup:.3f} "
            f"speedup_min={speedup_min:.3f} dec_tokens_old={c['tokens_old']} dec_tokens_new={c['tokens_new']}")

    for p in args.patch_sizes:
        cp = compare_decoders(args.compare_model, {"patch_size": p}, mask, args.compare_batch, device, amp,
                              args.rounds, args.round_steps, old=False)
        label = f"patch {p} (grid {cp['grid']})"
        print(f"{label:>32}: {cp['ms_new']:8.1f} ms/step, "
              f"{cp['tokens_new']:4d} decoder tokens, {cp['flops_new'] / 1e9:7.1f} GFLOP/step")
        last += f" step_ms_p{p}={cp['ms_new']:.1f}"

    if args.throughput:
        mm_dtype = torch.bfloat16 if amp is not None else torch.float32
        matmul = matmul_tflops(device, mm_dtype)
        print(f"throughput, batch {args.batch}; {'matmul':>14}: {matmul * 1e3:8.1f} GFLOP/s ({mm_dtype})")
        results = {}
        for short, name, ds in (("tiny", "mae_vit_tiny", 2), ("base", "mae_vit_base", 1)):
            r = results[short] = bench_model(name, args.batch, fslr_mask(ds), device, amp, args.steps, args.warmup)
            print(f"{name:>14}: {r['params_m']:6.1f}M params, {r['clips_s']:8.2f} clips/s, {r['tokens_s']:9.0f} tokens/s, "
                  f"{r['gflop_per_step']:8.1f} GFLOP/step, {r['tflops'] * 1e3:8.1f} GFLOP/s = "
                  f"{r['tflops'] / matmul:5.1%} of matmul")
        if device.type == "cuda":
            peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
        else:
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux
        t, b = results["tiny"], results["base"]
        last += (f" tiny_clips_s={t['clips_s']:.3f} tiny_tokens_s={t['tokens_s']:.0f} base_clips_s={b['clips_s']:.3f} "
                 f"base_tokens_s={b['tokens_s']:.0f} base_tflops={b['tflops']:.4f} matmul_tflops={matmul:.4f} "
                 f"base_mfu={b['tflops'] / matmul:.3f} peak_mem_gb={peak_gb:.2f}")
    print(last)


if __name__ == "__main__":
    main()
