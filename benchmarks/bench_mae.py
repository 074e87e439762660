"""Training throughput of the flat-map MAE against this machine's own matmul rate.

Measures, for ``mae_vit_tiny`` (its 112 x 280 grid) and ``mae_vit_base`` (the paper config,
224 x 560, 490 tokens, mask 0.9): training clips/s and tokens/s (a full step: forward, backward,
AdamW), the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``: matmuls and
attention), the achieved FLOP rate, and that rate as a fraction of the named alternative run in
the same process: a large dense ``torch.mm`` (fp32 on CPU, bf16 on a GPU), the best this
machine does. Peak memory: max RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/bench_mae.py                                   # CPU, batch 8, fp32
    python benchmarks/bench_mae.py --device cuda --batch 32 --dtype bf16

The last line is machine-readable: ``tiny_clips_s=... base_clips_s=... base_mfu=...``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config
from fmri_bench.train import SyntheticClips, param_groups


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


def bench_model(name: str, batch: int, device: torch.device, amp: torch.dtype | None, steps: int,
                warmup: int) -> dict:
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(preset_config(name)).to(device)
    cfg = model.config
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    clips = SyntheticClips(cfg.img_size, cfg.num_frames).batch(range(batch))
    bold, mask = clips["bold"].to(device), clips["mask"].to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _, _ = model(bold, mask, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    return {"clips_s": batch / dt, "tokens_s": batch * cfg.num_patches / dt, "step_s": dt,
            "tflops": flops / dt / 1e12, "gflop_per_step": flops / 1e9, "params_m": model.num_params() / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    mm_dtype = torch.bfloat16 if amp is not None else torch.float32

    matmul = matmul_tflops(device, mm_dtype)
    print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}, batch {args.batch}")
    print(f"{'matmul':>14}: {matmul * 1e3:8.1f} GFLOP/s ({mm_dtype})")
    results = {}
    for short, name in (("tiny", "mae_vit_tiny"), ("base", "mae_vit_base")):
        r = results[short] = bench_model(name, args.batch, device, amp, args.steps, args.warmup)
        print(f"{name:>14}: {r['params_m']:6.1f}M params, {r['clips_s']:8.2f} clips/s, {r['tokens_s']:9.0f} tokens/s, "
              f"{r['gflop_per_step']:8.1f} GFLOP/step, {r['tflops'] * 1e3:8.1f} GFLOP/s = "
              f"{r['tflops'] / matmul:5.1%} of matmul")
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is KiB on Linux
    t, b = results["tiny"], results["base"]
    print(f"tiny_clips_s={t['clips_s']:.3f} tiny_tokens_s={t['tokens_s']:.0f} base_clips_s={b['clips_s']:.3f} "
          f"base_tokens_s={b['tokens_s']:.0f} base_tflops={b['tflops']:.4f} matmul_tflops={matmul:.4f} "
          f"base_mfu={b['tflops'] / matmul:.3f} peak_mem_gb={peak_gb:.2f}")


if __name__ == "__main__":
    main()
